"""The LLM deployment: one base model per replica, LoRA adapters loaded on demand, streaming, on one of two engines.

- `serve.llm.engine=hf` (serving/hf_engine.py): transformers + PEFT in the replica with continuous (iteration-level)
  batching and gathered LoRA; the only engine for a 4-bit base. `serve.llm.engine=vllm` (serving/vllm_engine.py):
  vLLM in an actor of its own environment. Both batch across adapters, sampling settings, stop strings and
  max_tokens at every step.
- This deployment keeps what does not depend on the engine: adapters come from the registry and are checked
  (sha256, base) before an engine sees them; they are cached per replica by `@serve.multiplexed` (LRU of
  `max_adapters`), and requests carry Serve's multiplexed model id, so Serve routes an adapter's requests to
  replicas that have it loaded. An adapter evicted while requests still use it is deleted after its last one ends.
- Each request streams token events; it stops on EOS, its max_tokens or a stop string, or when its caller goes away
  (the Router cancels the call, and the request leaves the batch at the next step).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter

from ray import serve

from serving.metrics import AdapterMetrics
from tandem.adapters import verify_adapter
from tandem.models import BaseModel
from tandem.registry import Registry

logger = logging.getLogger("ray.serve")


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
        llm = cfg.serve.llm
        self.cfg = cfg
        self.base = base
        self.lock = threading.RLock()  # adapter loads and deletes vs the engine's forwards and releases
        self.doomed: set[str] = set()  # evicted from the cache while requests used them: deleted after the last
        self.starting: Counter = Counter()  # adapter -> requests loading it, not yet in the engine
        self.loads = self.evictions = 0
        # adapter id -> (when, message): a load that failed is not retried for every request (a download and a
        # checksum of the weights each time) until serve.llm.retry_failed_adapter_s have passed
        self.failures: dict[str, tuple[float, str]] = {}
        self.retry_failed_s = llm.retry_failed_adapter_s
        self.metrics = AdapterMetrics()
        self.registry = Registry.from_config(cfg)
        self.max_adapters = llm.max_adapters
        if llm.engine == "vllm":
            from serving.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(cfg, base, self._released)
        else:
            from serving.hf_engine import HFEngine

            self.engine = HFEngine(cfg, base, self._released, self.lock)

        async def load(adapter_id: str) -> LoadedAdapter:
            return await self._load_adapter(adapter_id)

        # The cache size comes from config, so the multiplexed loader is made per replica.
        self.adapter = serve.multiplexed(max_num_models_per_replica=llm.max_adapters)(load)

    def __del__(self):
        """Serve calls it when the replica stops: an engine outside the replica (vLLM's actor) stops with it."""
        if hasattr(self, "engine"):
            self.engine.shutdown()

    # adapters
    async def _load_adapter(self, adapter_id: str) -> LoadedAdapter:
        """`name@version` from the registry, checked against this base, loaded next to the other adapters."""
        path = await asyncio.to_thread(self.registry.download, adapter_id)
        manifest = verify_adapter(path, self.base.sha256)
        logger.info("loading adapter %s from %s (sha256 %s, dataset %s)", adapter_id, path, manifest["sha256"][:12],
                    manifest.get("dataset"))
        with self.lock:
            kept = adapter_id in self.doomed  # evicted, but its requests kept it loaded: it stays
            self.doomed.discard(adapter_id)
        if not kept:  # (it is in use from here on: `starting` counts this request, so no release deletes it)
            await self.engine.load(adapter_id, path)
        self.loads += 1
        self.metrics.loads.inc(1, {"adapter": adapter_id})
        return LoadedAdapter(self, adapter_id, manifest)

    def _recent_failure(self, name: str) -> str | None:
        when, message = self.failures.get(name, (None, None))
        if when is None or time.monotonic() - when > self.retry_failed_s:
            self.failures.pop(name, None)
            return None
        return message

    def unload(self, name: str) -> None:
        with self.lock:
            if self._in_use(name):
                self.doomed.add(name)
            else:
                self._delete(name)

    def _released(self, names: set[str]) -> None:
        """The engine has no more requests for `names`: the doomed among them are deleted now."""
        with self.lock:
            for name in {n for n in names & self.doomed if not self._in_use(n)}:
                self.doomed.discard(name)
                self._delete(name)

    def _delete(self, name: str) -> None:
        if self.engine.delete(name):
            self.evictions += 1
            self.metrics.evictions.inc(1, {"adapter": name})

    def loaded(self) -> list[str]:
        return self.engine.loaded()

    def stats(self) -> dict:
        return {"engine": self.cfg.serve.llm.engine, "loaded": self.loaded(), "loads": self.loads,
                "evictions": self.evictions, "max_adapters": self.max_adapters, **self.engine.stats()}

    # generation
    async def __call__(self, request: dict):
        """{prompt, adapter (name@version or None), max_tokens, temperature, top_p, stop, ignore_eos, regex (a
        response_format's, or None)} -> token events {"text", "finish_reason", "prompt_tokens",
        "completion_tokens"}, the last with "adapter_load_ms"; or one {"error": message} when its adapter cannot be
        loaded or the engine failed it (with "status": 400 when the request itself cannot be served as asked, e.g.
        its response_format)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        handle, load_ms = await self._start(request, lambda event: loop.call_soon_threadsafe(events.put_nowait,
                                                                                            event))
        if isinstance(handle, dict):  # why it cannot start: one error event
            yield handle
            return
        ended = False
        try:
            while not ended:
                event = await events.get()
                ended = "error" in event or bool(event.get("finish_reason"))
                # the last event says how long this request waited for its adapter to load on this replica, a
                # one-time cost the rollout's latency gate leaves out
                yield {**event, "adapter_load_ms": load_ms} if ended else event
        finally:
            if not ended:  # the caller went away (Serve cancels this call): the request leaves the batch
                self.engine.cancel(handle)

    async def _start(self, request: dict, emit) -> tuple[object, float]:
        """The engine's handle on the request, its adapter loaded first, and the milliseconds spent waiting for that
        load (0 when this replica had it); or an error event saying why its adapter cannot be loaded or why the
        engine refuses it. The adapter counts as in use from the start, so a load for another request cannot delete
        it in between."""
        name = request["adapter"]
        self.starting[name] += 1
        try:
            waited = time.perf_counter()
            if name is not None:
                if (message := self._recent_failure(name)) is not None:
                    return {"error": message}, 0.0
                try:
                    await self.adapter(name)
                except Exception as e:  # a corrupt or foreign adapter fails its own requests only
                    logger.error("adapter %s could not be loaded: %s", name, e)
                    # the client learns what failed, not the paths and checksums behind it
                    message = f"adapter {name} could not be loaded ({type(e).__name__}); it is retried after " \
                              f"{self.retry_failed_s:.0f} s"
                    self.failures[name] = (time.monotonic(), message)
                    return {"error": message}, 0.0
            load_ms = round((time.perf_counter() - waited) * 1000, 1)
            return await self.engine.start(request, name, emit), load_ms
        finally:
            self.starting[name] -= 1
            if name in self.doomed and not self._in_use(name):  # evicted while it started, then never ran
                self._released({name})

    def _in_use(self, name: str) -> bool:
        return self.starting[name] > 0 or self.engine.in_use(name)
