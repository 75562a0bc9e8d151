"""The LLM deployment: one base model per replica, LoRA adapters loaded on demand, mixed-adapter batches, streaming.

- Adapters are cached per replica by `@serve.multiplexed` (LRU of `max_adapters`); an evicted adapter is deleted
  from the PEFT model, freeing its weights. Requests carry the adapter id in their payload, not as Serve's
  multiplexed model id: Serve splits a batch by that id, and the point here is the opposite.
- Requests for different adapters share one batch (`@serve.batch`) and one forward pass per step: PEFT's
  mixed-adapter batches (`adapter_names=`) route each row through its own LoRA weights (the S-LoRA/Punica idea),
  instead of serving one adapter at a time.
- Each request streams token events; a request's row stops on EOS, its max_tokens or a stop string, or when its
  caller goes away (the Router cancels the call; the row stops at the next step, and a batch whose callers have all
  gone stops generating).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ray import serve

from serving.metrics import AdapterMetrics
from tandem.adapters import verify_adapter
from tandem.generation import Completion, start_stream
from tandem.models import BaseModel, load_for_inference, load_tokenizer
from tandem.registry import Registry

logger = logging.getLogger("ray.serve")
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class LoadedAdapter:
    """What the multiplexed cache holds; Serve calls `__del__` on eviction, which deletes the adapter's weights."""

    def __init__(self, llm: "LLM", name: str, manifest: dict):
        self.llm, self.name, self.manifest = llm, name, manifest
        self.loaded = True

    def __del__(self):
        # Once only: Python calls __del__ again when the evicted object is collected, and by then the same adapter
        # may have been loaded anew.
        if self.loaded:
            self.loaded = False
            self.llm.unload(self.name)


class LLM:
    def __init__(self, cfg, base: BaseModel):
        import torch

        llm = cfg.serve.llm
        if llm.torch_threads:
            torch.set_num_threads(llm.torch_threads)
        self.cfg = cfg
        self.base = base
        self.tokenizer = load_tokenizer(self.base)
        self.model = load_for_inference(self.base.path, quantization=llm.quantization, device=llm.device)
        self.peft = None  # the PeftModel around the base, made when the first adapter arrives
        self.lock = threading.Lock()  # generation vs adapter load/delete
        self.loads = self.evictions = 0
        self.cancelled = 0  # rows stopped before their end because their caller went away
        # adapter id -> (when, message): a load that failed is not retried for every request (a download and a
        # checksum of the weights each time) until serve.llm.retry_failed_adapter_s have passed
        self.failures: dict[str, tuple[float, str]] = {}
        self.retry_failed_s = llm.retry_failed_adapter_s
        self.passes = self.most_rows = self.most_adapters = 0  # generate calls, and the widest of them
        self.metrics = AdapterMetrics()
        self.registry = Registry.from_config(cfg)
        self.generate.set_max_batch_size(llm.max_batch_size)
        self.generate.set_batch_wait_timeout_s(llm.batch_wait_timeout_s)
        self.max_adapters = llm.max_adapters

        async def load(adapter_id: str) -> LoadedAdapter:
            return await self._load_adapter(adapter_id)

        # The cache size comes from config, so the multiplexed loader is made per replica.
        self.adapter = serve.multiplexed(max_num_models_per_replica=llm.max_adapters)(load)

    # adapters
    async def _load_adapter(self, adapter_id: str) -> LoadedAdapter:
        """`name@version` from the registry, checked against this base, loaded next to the other adapters."""
        path = await asyncio.to_thread(self.registry.download, adapter_id)
        manifest = verify_adapter(path, self.base.sha256)
        logger.info("loading adapter %s from %s (sha256 %s, dataset %s)", adapter_id, path, manifest["sha256"][:12],
                    manifest.get("dataset"))
        await asyncio.to_thread(self._load, adapter_id, path)
        self.loads += 1
        self.metrics.loads.inc(1, {"adapter": adapter_id})
        return LoadedAdapter(self, adapter_id, manifest)

    def _recent_failure(self, name: str) -> str | None:
        when, message = self.failures.get(name, (None, None))
        if when is None or time.monotonic() - when > self.retry_failed_s:
            self.failures.pop(name, None)
            return None
        return message

    def _load(self, name: str, path) -> None:
        from peft import PeftModel

        with self.lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
            else:
                self.peft.load_adapter(str(path), adapter_name=name)
                if self.peft.active_adapter not in self.peft.peft_config:  # the active one was evicted
                    self.peft.set_adapter(name)

    def unload(self, name: str) -> None:
        with self.lock:
            if self.peft is not None and name in self.peft.peft_config:
                self.peft.delete_adapter(name)
                self.evictions += 1
                self.metrics.evictions.inc(1, {"adapter": name})

    def loaded(self) -> list[str]:
        return sorted(self.peft.peft_config) if self.peft is not None else []

    def stats(self) -> dict:
        return {"loaded": self.loaded(), "loads": self.loads, "evictions": self.evictions,
                "max_adapters": self.max_adapters, "cancelled": self.cancelled, "generate_calls": self.passes,
                "most_rows": self.most_rows, "most_adapters_in_one_call": self.most_adapters}

    # generation
    def _groups(self, requests: list[dict]) -> list[list[int]]:
        """Rows that can share one generate call: same sampling, at most max_adapters distinct adapters."""
        groups: list[list[int]] = []
        by_sampling: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            by_sampling.setdefault((r["temperature"], r["top_p"], r.get("ignore_eos", False)), []).append(i)
        for rows in by_sampling.values():
            current, adapters = [], set()
            for i in rows:
                a = requests[i]["adapter"]
                if a and a not in adapters and len(adapters) == self.max_adapters:
                    groups.append(current)
                    current, adapters = [], set()
                current.append(i)
                if a:
                    adapters.add(a)
            groups.append(current)
        return groups

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate(self, requests: list[dict]):
        """Each request: {prompt, adapter (name@version or None), max_tokens, temperature, top_p, stop, ignore_eos}.

        Yields, per step, one event per request: {"text", "finish_reason", "prompt_tokens", "completion_tokens"},
        {"error": message} when its adapter cannot be loaded, StopIteration once it has finished.
        """
        n = len(requests)
        done = [False] * n
        for group in self._groups(requests):
            failed = {}
            for name in {requests[i]["adapter"] for i in group} - {None}:
                if (message := self._recent_failure(name)) is not None:
                    failed[name] = message
                    continue
                try:
                    await self.adapter(name)
                except Exception as e:  # a corrupt or foreign adapter fails its own requests only
                    logger.error("adapter %s could not be loaded: %s", name, e)
                    # the client learns what failed, not the paths and checksums behind it
                    failed[name] = f"adapter {name} could not be loaded ({type(e).__name__}); it is retried after " \
                                   f"{self.retry_failed_s:.0f} s"
                    self.failures[name] = (time.monotonic(), failed[name])
            rows = [i for i in group if requests[i]["adapter"] not in failed]
            if len(rows) < len(group):
                events = [StopIteration if done[i] else {"text": ""} for i in range(n)]
                for i in group:
                    if requests[i]["adapter"] in failed:
                        events[i] = {"error": failed[requests[i]["adapter"]]}
                        done[i] = True
                yield events
            if not rows:
                continue
            completions = [Completion(requests[i]["prompt"], requests[i]["max_tokens"], requests[i]["temperature"],
                                      requests[i]["top_p"], tuple(requests[i]["stop"]),
                                      requests[i].get("ignore_eos", False)) for i in rows]
            if self.peft is not None and self.peft.peft_config:
                model, names = self.peft, [requests[i]["adapter"] or BASE for i in rows]
            else:  # no adapter loaded yet: the plain model
                model, names = self.model, None
            self.passes += 1
            self.most_rows = max(self.most_rows, len(rows))
            self.most_adapters = max(self.most_adapters, len({requests[i]["adapter"] for i in rows}))
            stream = start_stream(model, self.tokenizer, completions, names, self.lock)
            steps = stream.events()
            while (step := await asyncio.to_thread(next, steps, None)) is not None:
                for row, i in enumerate(rows):
                    if requests[i].get("cancelled") and not done[i]:
                        stream.cancel(row)
                        done[i], self.cancelled = True, self.cancelled + 1
                events = [StopIteration if done[i] else {"text": ""} for i in range(n)]
                for i, event in zip(rows, step):
                    if event is not None and not done[i]:
                        events[i] = event
                yield events
                for i, event in zip(rows, step):
                    if event is not None and event["finish_reason"]:
                        done[i] = True

    async def __call__(self, request: dict):
        try:
            async for event in self.generate(request):
                yield event
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away: its row stops at the next step
            request["cancelled"] = True
            raise
