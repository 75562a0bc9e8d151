"""serve.llm.engine=hf: transformers + PEFT in the replica itself, with Tandem's continuous batching
(`tandem.engine`) and gathered LoRA (`tandem.gathered_lora`). The fallback where vLLM does not run, and the only
engine that serves a 4-bit (NF4) or 8-bit base.

Each row carries its own adapter, sampling, stop strings and max_tokens in one forward per step; structured output
is an outlines-core guide applied as a logits mask.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Callable

from tandem.abstention import Abstention, abstention_tokens
from tandem.engine import Completion, Engine, Row
from tandem.gathered_lora import GatheredLoRA
from tandem.models import load_for_inference, load_tokenizer
from tandem.structured import Guides


class HFEngine:
    """Same calls as `serving/vllm_engine.py`'s VLLMEngine. `lock` is held around each forward and each adapter load
    or delete, so no forward sees an adapter half loaded."""

    def __init__(self, cfg, base, released: Callable[[set[str]], None], lock: threading.RLock):
        import torch

        llm = cfg.serve.llm
        if llm.torch_threads:
            torch.set_num_threads(llm.torch_threads)
        self.tokenizer = load_tokenizer(base)
        self.model = load_for_inference(base.path, quantization=llm.quantization, device=llm.device)
        self.peft = None  # the PeftModel around the base, made when the first adapter arrives
        self.lock = lock
        self.lora_kernel = llm.lora_kernel
        self.gathered: GatheredLoRA | None = None  # stacks of the loaded adapters, remade at every load and delete
        self.engine = Engine(self._model, self.tokenizer, llm.max_batch_size, llm.max_adapters, lock, released,
                             lambda: self.gathered)
        self.guides = Guides(self.tokenizer)
        self.abstention = abstention_tokens(self.tokenizer)

    def _model(self):
        """What runs a forward: the PEFT model while any adapter is loaded, else the plain base."""
        return self.peft if self.peft is not None and self.peft.peft_config else self.model

    async def load(self, name: str, path: Path) -> None:
        await asyncio.to_thread(self._load, name, path)

    def _load(self, name: str, path: Path) -> None:
        from peft import PeftModel

        with self.lock:
            if self.peft is None:
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

    def delete(self, name: str) -> bool:
        with self.lock:
            if self.peft is None or name not in self.peft.peft_config:
                return False
            self.peft.delete_adapter(name)
            self._restack()
            return True

    async def start(self, request: dict, name: str | None, emit: Callable[[dict], None]) -> Row | dict:
        """The request's row in the engine, or (status 400) why its response_format cannot be enforced."""
        # an index for a new schema takes up to a second, the generic JSON object seconds (once): off the loop
        try:
            guide = await asyncio.to_thread(self.guides.guide, request["regex"]) if request.get("regex") else None
        except ValueError as e:  # a pattern in the caller's schema that the automaton cannot be built from
            return {"error": f"response_format cannot be enforced: {e}", "status": 400}
        threshold = request.get("abstain_threshold")
        completion = Completion(request["prompt"], request["max_tokens"], request["temperature"], request["top_p"],
                                tuple(request["stop"]), request.get("ignore_eos", False), guide,
                                Abstention(self.abstention, threshold, self.tokenizer.eos_token_id)
                                if threshold else None)
        return self.engine.submit(completion, name, emit)

    def cancel(self, row: Row) -> None:
        self.engine.cancel(row)

    def in_use(self, name: str) -> bool:
        return self.engine.in_use(name)

    def loaded(self) -> list[str]:
        return sorted(self.peft.peft_config) if self.peft is not None else []

    def stats(self) -> dict:
        engine = self.engine.stats()
        return {"cancelled": engine["cancelled"], "steps": engine["steps"], "prefills": engine["prefills"],
                "most_rows": engine["most_rows"], "most_adapters_in_one_forward": engine["most_adapters"],
                "running": engine["running"], "waiting": engine["waiting"]}

    def shutdown(self) -> None:
        """Nothing outside the replica to stop."""
