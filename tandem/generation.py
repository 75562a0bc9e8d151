"""Batched generation with a (PEFT) causal LM: left-padded batches, prompt tokens stripped from the output.

`generate_replies` is the offline form (validation, evaluation); `start_stream` streams a batch token by token, each
row with its own adapter and limits, for serving.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from transformers.generation.streamers import BaseStreamer


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # of the batch it was generated in: what its caller waited


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96,
                     batch_size: int = 8) -> list[Generated]:
    """Greedy answers to chat conversations, in batches, with their token counts and time."""
    import torch

    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    outputs = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        latency = (time.perf_counter() - started) * 1000
        new = out[:, batch["input_ids"].shape[1] :]
        for row, prompt_len, text in zip(new, batch["attention_mask"].sum(dim=1).tolist(),
                                         tokenizer.batch_decode(new, skip_special_tokens=True)):
            ended = (row == tokenizer.eos_token_id).nonzero()
            completion = int(ended[0]) + 1 if len(ended) else len(row)
            outputs.append(Generated(text.strip(), prompt_len, completion, round(latency, 1)))
    return outputs


@dataclass
class Completion:
    """One request of a streamed batch: its prompt (chat template applied), limits and sampling."""
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks; vLLM's extension of the same name)


class BatchStream(BaseStreamer):
    """Token-by-token events for every row of one `generate` call over a batch.

    `generate` runs in a thread and `put`s each step's tokens; rows stop on EOS, their own max_tokens or a stop
    string (a per-row stopping criterion pads them out while the others go on). `events()` yields, per step, one
    event per row: {"text": delta, "finish_reason": None | "stop" | "length", ...}.
    """

    def __init__(self, tokenizer, completions: list[Completion], eos_ids: set[int], prompt_tokens: list[int]):
        self.tokenizer = tokenizer
        self.completions = completions
        self.eos_ids = eos_ids
        self.prompt_tokens = prompt_tokens
        self.ids: list[list[int]] = [[] for _ in completions]
        self.sent = [0] * len(completions)  # characters of each row's text already emitted
        self.finish: list[str | None] = [None] * len(completions)
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt ids
            self._prompt_seen = True
            return
        events = []
        for i, token in enumerate(value.reshape(-1).tolist()):
            events.append(self._step(i, token) if self.finish[i] is None else None)
        self.queue.put(events)

    def _step(self, i: int, token: int) -> dict:
        c = self.completions[i]
        if token in self.eos_ids and not c.ignore_eos:
            self.finish[i] = "stop"
        else:
            self.ids[i].append(token)
        text = self.tokenizer.decode(self.ids[i], skip_special_tokens=True)
        cut = min((p for p in (text.find(s) for s in c.stop) if p >= 0), default=-1)
        if cut >= 0:
            text, self.finish[i] = text[:cut], "stop"
        elif self.finish[i] is None and len(self.ids[i]) >= c.max_tokens:
            self.finish[i] = "length"
        # Hold back a trailing partial character, and text that may yet become a stop string.
        hold = 0 if self.finish[i] else max([len(s) - 1 for s in c.stop] + [1 if text.endswith("\ufffd") else 0])
        end = max(self.sent[i], len(text) - hold)
        delta, self.sent[i] = text[self.sent[i] : end], end
        return {"text": delta, "finish_reason": self.finish[i], "prompt_tokens": self.prompt_tokens[i],
                "completion_tokens": len(self.ids[i])}

    def cancel(self, i: int) -> None:
        """Stop row i at the next step (its caller went away); once every row has stopped, generation ends."""
        if self.finish[i] is None:
            self.finish[i] = "cancelled"

    def end(self) -> None:
        self.queue.put(None)

    def fail(self, error: Exception) -> None:
        self.queue.put(error)

    def rows_done(self, input_ids, scores, **kwargs):
        """The stopping criterion: True for rows that have finished."""
        import torch

        return torch.tensor([f is not None for f in self.finish], device=input_ids.device)

    def events(self) -> Iterator[list[dict | None]]:
        """Blocking: one list per generation step until the batch ends; None for rows already finished."""
        while (item := self.queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item


def start_stream(model, tokenizer, completions: list[Completion], adapter_names: list[str] | None = None,
                 lock: threading.Lock | None = None) -> BatchStream:
    """Start generating a batch in a background thread; read its events from the returned stream.

    `adapter_names` (PEFT mixed-adapter batches) runs each row through its own LoRA adapter, `__base__` for none,
    in one forward pass. `lock` is held while generating, so adapters are not loaded or deleted underneath.
    """
    import torch
    from transformers import StoppingCriteriaList

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer([c.prompt for c in completions], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    stream = BatchStream(tokenizer, completions, eos_ids, batch["attention_mask"].sum(dim=1).tolist())
    first = completions[0]  # a batch shares its sampling settings and ignore_eos (the caller groups them)
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=max(c.max_tokens for c in completions), pad_token_id=tokenizer.pad_token_id,
                  do_sample=first.temperature > 0, temperature=first.temperature or None,
                  top_p=first.top_p if first.temperature > 0 else None, top_k=None)
    if first.ignore_eos:
        config.eos_token_id = None
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}

    def run():
        try:
            with lock or contextlib.nullcontext(), torch.no_grad():
                model.generate(**batch, generation_config=config, streamer=stream,
                               stopping_criteria=StoppingCriteriaList([stream.rows_done]), **kwargs)
            stream.end()
        except Exception as e:  # handed to the reader, which raises it where the request is
            stream.fail(e)

    threading.Thread(target=run, daemon=True, name="generate").start()
    return stream
