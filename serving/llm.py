"""The LLM deployment: one base model per replica, LoRA adapters loaded on demand, continuous batching, streaming.

- Generation is continuous (iteration-level) batching (`tandem.engine`): a request joins the running batch at the
  next decode step and leaves it when it ends, each row with its own adapter, sampling, stop strings and
  max_tokens, in one forward per step (PEFT's mixed-adapter batch, the S-LoRA/Punica idea). Serve's `@serve.batch`
  is not used: it forms the next batch while the current one runs, so under steady traffic its batches held one
  request each (bench/limits.py measured it).
- Adapters are cached per replica by `@serve.multiplexed` (LRU of `max_adapters`). Requests carry the adapter id in
  their payload, not as Serve's multiplexed model id (Serve would split the batch by it). An adapter evicted while
  rows still use it is deleted after its last row ends.
- Each request streams token events; a request's row stops on EOS, its max_tokens or a stop string, or when its
  caller goes away (the Router cancels the call, and the row leaves the batch at the next step).
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
from tandem.engine import Completion, Engine, Row
from tandem.gathered_lora import GatheredLoRA
from tandem.models import BaseModel, load_for_inference, load_tokenizer
from tandem.registry import Registry
from tandem.structured import Guides

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
        import torch

        llm = cfg.serve.llm
        if llm.torch_threads:
            torch.set_num_threads(llm.torch_threads)
        self.cfg = cfg
        self.base = base
        self.tokenizer = load_tokenizer(self.base)
        self.model = load_for_inference(self.base.path, quantization=llm.quantization, device=llm.device)
        self.peft = None  # the PeftModel around the base, made when the first adapter arrives
        self.lock = threading.RLock()  # each forward vs adapter load/delete
        self.doomed: set[str] = set()  # evicted from the cache while rows still used them: deleted after the last
        self.starting: Counter = Counter()  # adapter -> requests loading it, not yet in the engine
        self.loads = self.evictions = 0
        # adapter id -> (when, message): a load that failed is not retried for every request (a download and a
        # checksum of the weights each time) until serve.llm.retry_failed_adapter_s have passed
        self.failures: dict[str, tuple[float, str]] = {}
        self.retry_failed_s = llm.retry_failed_adapter_s
        self.metrics = AdapterMetrics()
        self.registry = Registry.from_config(cfg)
        self.max_adapters = llm.max_adapters
        self.lora_kernel = llm.lora_kernel
        self.gathered: GatheredLoRA | None = None  # stacks of the loaded adapters, remade at every load and delete
        self.engine = Engine(self._model, self.tokenizer, llm.max_batch_size, llm.max_adapters, self.lock,
                             self._released, lambda: self.gathered)
        self.guides = Guides(self.tokenizer)

        async def load(adapter_id: str) -> LoadedAdapter:
            return await self._load_adapter(adapter_id)

        # The cache size comes from config, so the multiplexed loader is made per replica.
        self.adapter = serve.multiplexed(max_num_models_per_replica=llm.max_adapters)(load)

    def _model(self):
        """What runs a forward: the PEFT model while any adapter is loaded, else the plain base."""
        return self.peft if self.peft is not None and self.peft.peft_config else self.model

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
            if name in self.doomed:  # evicted, but its rows kept it loaded: it stays
                self.doomed.discard(name)
            elif self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
            else:
                self.peft.load_adapter(str(path), adapter_name=name)
                if self.peft.active_adapter not in self.peft.peft_config:  # the active one was evicted
                    self.peft.set_adapter(name)
            self._restack()

    def _restack(self) -> None:
        """Gathered LoRA over the adapters now loaded (serve.llm.lora_kernel=gathered, plain LoRA on linear layers);
        else PEFT's mixed-batch forward. Called with the lock held, so no forward sees half-made stacks."""
        if self.lora_kernel != "gathered" or self.peft is None or not GatheredLoRA.supports(self.peft):
            self.gathered = None
        elif self.gathered is None:
            self.gathered = GatheredLoRA(self.peft)
        else:
            self.gathered.restack()

    def unload(self, name: str) -> None:
        with self.lock:
            if self._in_use(name):
                self.doomed.add(name)
            else:
                self._delete(name)

    def _released(self, names: set[str]) -> None:
        with self.lock:
            for name in {n for n in names & self.doomed if not self._in_use(n)}:
                self.doomed.discard(name)
                self._delete(name)

    def _delete(self, name: str) -> None:
        if self.peft is not None and name in self.peft.peft_config:
            self.peft.delete_adapter(name)
            self._restack()
            self.evictions += 1
            self.metrics.evictions.inc(1, {"adapter": name})

    def loaded(self) -> list[str]:
        return sorted(self.peft.peft_config) if self.peft is not None else []

    def stats(self) -> dict:
        engine = self.engine.stats()
        return {"loaded": self.loaded(), "loads": self.loads, "evictions": self.evictions,
                "max_adapters": self.max_adapters, "cancelled": engine["cancelled"], "steps": engine["steps"],
                "prefills": engine["prefills"], "most_rows": engine["most_rows"],
                "most_adapters_in_one_forward": engine["most_adapters"],
                "running": engine["running"], "waiting": engine["waiting"]}

    # generation
    async def __call__(self, request: dict):
        """{prompt, adapter (name@version or None), max_tokens, temperature, top_p, stop, ignore_eos, regex (a
        response_format's, or None)} -> token
        events {"text", "finish_reason", "prompt_tokens", "completion_tokens"}, or one {"error": message} when its
        adapter cannot be loaded or its batch failed."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        row = await self._start(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        if not isinstance(row, Row):  # why it cannot start: one error event
            yield row
            return
        ended = False
        try:
            while not ended:
                event = await events.get()
                ended = "error" in event or bool(event.get("finish_reason"))
                yield event
        finally:
            if not ended:  # the caller went away (Serve cancels this call): the row leaves the batch
                self.engine.cancel(row)

    async def _start(self, request: dict, emit) -> Row | dict:
        """The request's row in the engine, its adapter loaded first; or an error event saying why its adapter
        cannot be loaded (or, with status 400, why its response_format cannot be enforced). The
        adapter counts as in use from the start, so a load for another request cannot delete it in between."""
        name = request["adapter"]
        self.starting[name] += 1
        try:
            if name is not None:
                if (message := self._recent_failure(name)) is not None:
                    return {"error": message}
                try:
                    await self.adapter(name)
                except Exception as e:  # a corrupt or foreign adapter fails its own requests only
                    logger.error("adapter %s could not be loaded: %s", name, e)
                    # the client learns what failed, not the paths and checksums behind it
                    message = f"adapter {name} could not be loaded ({type(e).__name__}); it is retried after " \
                              f"{self.retry_failed_s:.0f} s"
                    self.failures[name] = (time.monotonic(), message)
                    return {"error": message}
            # an index for a new schema takes up to a second, the generic JSON object seconds (once): off the loop
            try:
                guide = await asyncio.to_thread(self.guides.guide, request["regex"]) if request.get("regex") else None
            except ValueError as e:  # a pattern in the caller's schema that the automaton cannot be built from
                return {"error": f"response_format cannot be enforced: {e}", "status": 400}
            completion = Completion(request["prompt"], request["max_tokens"], request["temperature"],
                                    request["top_p"], tuple(request["stop"]), request.get("ignore_eos", False),
                                    guide)
            return self.engine.submit(completion, name, emit)
        finally:
            self.starting[name] -= 1
            if name in self.doomed and not self._in_use(name):  # evicted while it started, then never ran
                self._released({name})

    def _in_use(self, name: str) -> bool:
        return self.starting[name] > 0 or self.engine.in_use(name)
