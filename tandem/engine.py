"""Continuous (iteration-level) batching for a Hugging Face causal LM with LoRA adapters.

Requests join and leave the running batch at every decode step, each with its own adapter, sampling settings, stop
strings and `max_tokens`: a short request never waits for a long one, and a new one waits for at most one step and
its own prefill (interleaved with the running decode), instead of for the whole batch ahead of it.

The running rows share one KV cache (`DynamicCache`), left-padded to a common length. New requests are prefilled
together in a cache of their own, whose rows are then padded and appended; a finished or cancelled row is dropped
with `batch_select_indices`, and columns no remaining row uses are trimmed from the left. Each step is one forward
over every running row; with adapters loaded it is gathered LoRA (tandem/gathered_lora.py: one batched matmul
per layer over stacked adapters) when the caller provides it, else PEFT's mixed-adapter batch (`adapter_names=`,
`__base__` for none). Rotary positions come from each row's own token count, so padding never shifts them.

The engine runs in a thread of its own and hands every event to the `emit` callback its request came with.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

from tandem.structured import mask_logits

logger = logging.getLogger(__name__)
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Completion:
    """One request: its prompt (chat template applied), limits and sampling."""
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks; vLLM's extension of the same name)
    # structured output: an outlines-core Guide (tandem/structured.py) saying which tokens may come next
    guide: object = None
    # calibrated abstention: an Abstention (tandem/abstention.py) steering it to the abstention reply
    abstention: object = None


@dataclass(eq=False)
class Row:
    """A request in the engine: what it has generated and said so far. `emit` gets one event per step:
    {"text": delta, "finish_reason": None | "stop" | "length", "prompt_tokens", "completion_tokens"}, or
    {"error": message} when its forward failed."""
    completion: Completion
    adapter: str | None
    emit: Callable[[dict], None]
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already emitted
    finish: str | None = None
    cancelled: bool = False
    left: bool = False  # out of the engine: its adapter no longer counts it


class Engine:
    """`submit` a request from any thread; `cancel` stops it at the next step. `model()` is called for every
    forward, so a PEFT wrapper made after the first adapter load is picked up; `lock` is held around each forward so
    adapters are not loaded or deleted underneath (a re-entrant lock: `released(names)` is called with it held, with
    adapters the engine no longer has rows for, so their deletion can wait for their last row)."""

    def __init__(self, model: Callable, tokenizer, max_batch_size: int = 8, max_adapters: int = 4,
                 lock: threading.Lock | None = None, released: Callable[[set[str]], None] = lambda names: None,
                 gathered: Callable = lambda: None):
        self.model, self.tokenizer, self.gathered = model, tokenizer, gathered
        self.max_batch_size, self.max_adapters = max_batch_size, max_adapters
        self.lock = lock or threading.Lock()
        self.released = released
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.waiting: deque[Row] = deque()
        self.rows: list[Row] = []
        self.users: Counter = Counter()  # adapter -> rows waiting or running with it
        self.cache = self.mask = self.next_tokens = None  # the running batch's KV cache, attention mask, last tokens
        self._eos: set[int] | None = None
        self.wake = threading.Condition()
        self.steps = self.prefills = self.most_rows = self.most_adapters = self.cancelled = 0
        threading.Thread(target=self._run, daemon=True, name="engine").start()

    # requests
    def submit(self, completion: Completion, adapter: str | None, emit: Callable[[dict], None]) -> Row:
        row = Row(completion, adapter, emit)
        with self.wake:
            self.users[adapter] += 1
            self.waiting.append(row)
            self.wake.notify()
        return row

    def cancel(self, row: Row) -> None:
        row.cancelled = True
        with self.wake:
            self.wake.notify()

    def in_use(self, adapter: str) -> bool:
        return self.users[adapter] > 0

    def stats(self) -> dict:
        return {"running": len(self.rows), "waiting": len(self.waiting), "steps": self.steps,
                "prefills": self.prefills, "most_rows": self.most_rows, "most_adapters": self.most_adapters,
                "cancelled": self.cancelled}

    # the loop
    def _run(self) -> None:
        import torch

        while True:
            with self.wake:
                while not self.rows and not self.waiting:
                    self.wake.wait()
                admitted, gone = self._admit()
            if gone:
                self._release(gone)
            try:
                with self.lock, torch.no_grad():
                    self._drop_finished()  # rows that ended at the last step, or were cancelled since
                    if admitted:
                        self._prefill(admitted)
                        self._drop_finished()
                    if self.rows:
                        self._decode()
            except Exception as e:  # fails the rows in the batch, not the engine
                logger.exception("generation failed")
                failed = list(dict.fromkeys(admitted + self.rows))
                for row in failed:
                    if row.finish is None and not row.cancelled:
                        row.emit({"error": f"generation failed ({type(e).__name__})"})
                self.rows, self.cache, self.mask, self.next_tokens = [], None, None, None
                self._release(failed)

    def _admit(self) -> tuple[list[Row], list[Row]]:
        """Waiting rows, in order, while the batch has room and no more than max_adapters adapters run at once
        (a row whose adapter is already running may go ahead of one that waits for room); and the waiting rows
        whose callers went away."""
        adapters = {r.adapter for r in self.rows} - {None}
        admitted, gone, kept = [], [], deque()
        while self.waiting:
            row = self.waiting.popleft()
            if row.cancelled:
                self.cancelled += 1
                gone.append(row)
                continue
            room = len(self.rows) + len(admitted) < self.max_batch_size
            if room and (row.adapter is None or row.adapter in adapters or len(adapters) < self.max_adapters):
                admitted.append(row)
                if row.adapter:
                    adapters.add(row.adapter)
            else:
                kept.append(row)
        self.waiting = kept
        return admitted, gone

    def _forward(self, rows: list[Row], input_ids, mask, cache) -> list[int]:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        model, gathered = self.model(), self.gathered()
        kwargs, rows_adapters = {}, nullcontext()
        if gathered is not None:  # one batched matmul per layer over stacked adapters
            rows_adapters = gathered.rows([r.adapter for r in rows])
        elif hasattr(model, "peft_config") and model.peft_config:  # PEFT's mixed-adapter batch
            kwargs["adapter_names"] = [r.adapter or BASE for r in rows]
        # logits of the last position only: a prefill's full logits would cost more than all its decode steps
        with rows_adapters:
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1, **kwargs)
        self.steps += 1
        self.most_rows = max(self.most_rows, len(rows))
        self.most_adapters = max(self.most_adapters, len({r.adapter for r in rows}))
        return self._sample(out.logits[:, -1, :].float(), rows)

    def _prefill(self, rows: list[Row]) -> None:
        import torch
        from transformers import DynamicCache

        self.tokenizer.padding_side = "left"
        batch = self.tokenizer([r.completion.prompt for r in rows], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(self._device())
        for row, n in zip(rows, batch["attention_mask"].sum(dim=1).tolist()):
            row.prompt_ids = [0] * n  # only its length is reported
        cache = DynamicCache()
        tokens = self._forward(rows, batch["input_ids"], batch["attention_mask"], cache)
        self.prefills += 1
        self._check_cache(cache)
        new = torch.tensor(tokens, device=batch["input_ids"].device).unsqueeze(1)
        if self.rows:
            self._join(cache, batch["attention_mask"])
            self.next_tokens = torch.cat([self.next_tokens, new])
        else:
            self.cache, self.mask, self.next_tokens = cache, batch["attention_mask"], new
        self.rows += rows
        self._emit(rows, tokens)

    def _decode(self) -> None:
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        tokens = self._forward(self.rows, self.next_tokens, self.mask, self.cache)
        self.next_tokens = torch.tensor(tokens, device=self.mask.device).unsqueeze(1)
        self._emit(self.rows, tokens)

    @property
    def eos_ids(self) -> set[int]:
        if self._eos is None:
            eos = self.model().generation_config.eos_token_id
            self._eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        return self._eos

    def _emit(self, rows: list[Row], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens):
            if row.cancelled or row.finish is not None:
                continue
            row.emit(self._step(row, token, self.eos_ids))

    def _step(self, row: Row, token: int, eos_ids: set[int]) -> dict:
        c = row.completion
        if token in eos_ids and not c.ignore_eos:
            row.finish = "stop"
        else:
            row.ids.append(token)
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        cut = min((p for p in (text.find(s) for s in c.stop) if p >= 0), default=-1)
        if cut >= 0:
            text, row.finish = text[:cut], "stop"
        elif row.finish is None and len(row.ids) >= c.max_tokens:
            row.finish = "length"
        # Hold back a trailing partial character, and text that may yet become a stop string.
        hold = 0 if row.finish else max([len(s) - 1 for s in c.stop] + [1 if text.endswith("\ufffd") else 0])
        end = max(row.sent, len(text) - hold)
        delta, row.sent = text[row.sent:end], end
        return {"text": delta, "finish_reason": row.finish, "prompt_tokens": len(row.prompt_ids),
                "completion_tokens": len(row.ids)}

    def _sample(self, logits, rows: list[Row]) -> list[int]:
        import torch

        guided = [(i, r.completion.guide) for i, r in enumerate(rows)
                  if r.completion.guide is not None and r.finish is None and not r.cancelled]
        mask_logits(logits, guided)
        for i, r in enumerate(rows):
            if r.completion.abstention is not None and r.finish is None and not r.cancelled:
                r.completion.abstention.steer(r.ids, logits[i])
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            c = row.completion
            if c.temperature > 0:
                probs = torch.softmax(logits[i] / c.temperature, dim=-1)
                if c.top_p < 1.0:
                    ordered, order = probs.sort(descending=True)
                    outside = ordered.cumsum(-1) - ordered > c.top_p  # keep the smallest set reaching top_p
                    probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
                tokens[i] = torch.multinomial(probs / probs.sum(), 1)[0]
        tokens = tokens.tolist()
        for i, guide in guided:
            if tokens[i] not in self.eos_ids:
                guide.advance(tokens[i], return_tokens=False)
        return tokens

    # the cache
    def _check_cache(self, cache) -> None:
        from transformers.cache_utils import DynamicLayer

        odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
        if odd:
            raise ValueError(f"continuous batching joins and drops rows of plain DynamicLayer caches; this model's "
                             f"cache has {', '.join(sorted(odd))} layers")

    def _join(self, cache, mask) -> None:
        """Append the rows of a newly prefilled cache to the running one, left-padding the shorter to one length."""
        import torch
        import torch.nn.functional as F

        length = max(self.mask.shape[1], mask.shape[1])

        def pad(t, dim_from_end: int):
            missing = length - t.shape[-dim_from_end]
            if not missing:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return F.pad(t, spec)

        for running, new in zip(self.cache.layers, cache.layers):
            running.keys = torch.cat([pad(running.keys, 2), pad(new.keys, 2)])
            running.values = torch.cat([pad(running.values, 2), pad(new.values, 2)])
        self.mask = torch.cat([pad(self.mask, 1), pad(mask, 1)])

    def _drop_finished(self) -> None:
        import torch

        done = [r for r in self.rows if r.finish is not None or r.cancelled]
        if not done:
            return
        self.cancelled += sum(r.cancelled and r.finish is None for r in done)
        keep = [i for i, r in enumerate(self.rows) if r not in done]
        self.rows = [self.rows[i] for i in keep]
        if self.rows:
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.next_tokens = self.mask[index], self.next_tokens[index]
            unused = int((self.mask.sum(dim=0) == 0).long().cumprod(0).sum())  # leading all-padding columns
            if unused:
                self.mask = self.mask[:, unused:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
        else:
            self.cache = self.mask = self.next_tokens = None
        self._release(done)

    def _release(self, rows: list[Row]) -> None:
        gone = set()
        with self.wake:
            for row in (r for r in rows if not r.left):
                row.left = True
                self.users[row.adapter] -= 1
                if self.users[row.adapter] <= 0:
                    del self.users[row.adapter]
                    gone.add(row.adapter)
        if gone - {None}:
            self.released(gone - {None})

    def _device(self):
        return next(self.model().parameters()).device
