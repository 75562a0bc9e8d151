"""serve.llm.engine=vllm: the LLM deployment's requests run on vLLM (continuous batching, paged KV cache, its LoRA
kernels and structured outputs), in a Ray actor of vLLM's own environment (`serving/vllm_worker.py`).

The deployment keeps what Tandem checks: adapters come from the registry and are verified (sha256, base) before vLLM
sees their local path; failures are remembered; eviction follows Serve's multiplexed cache. The worker is pinned to
the replica's node (it reads the adapter files the replica downloaded) and dies with the replica.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import TaskCancelledError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serving.vllm_worker import VLLMWorker
from tandem.abstention import abstention_tokens
from tandem.errors import ConfigError
from tandem.models import load_tokenizer

logger = logging.getLogger("ray.serve")


def vllm_python(llm) -> Path:
    """The Python of vLLM's environment, checked with the rest of serve.llm where the app is built."""
    python = Path(llm.vllm.python).expanduser().absolute()
    if not python.exists():
        raise ConfigError(f"serve.llm.vllm.python={llm.vllm.python} does not exist: `make setup-vllm` builds vLLM's "
                          f"environment there, or point it at a Python that has vllm installed")
    if llm.quantization != "none":
        raise ConfigError(f"serve.llm.quantization={llm.quantization} is served by serve.llm.engine=hf only; "
                          f"serve.llm.engine=vllm serves the base in serve.llm.vllm.dtype={llm.vllm.dtype}")
    return python


class VLLMEngine:
    """Same calls as `serving/hf_engine.py`'s HFEngine: load / delete adapters, start / cancel requests."""

    def __init__(self, cfg, base, released: Callable[[set[str]], None]):
        llm, v = cfg.serve.llm, cfg.serve.llm.vllm
        python = vllm_python(llm)
        env = {"VLLM_CPU_KVCACHE_SPACE": str(v.cpu_kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": v.cpu_bind}
        engine_args = {"dtype": v.dtype, "max_model_len": llm.max_context or None, "max_loras": llm.max_adapters,
                       "max_lora_rank": v.max_lora_rank, "max_num_seqs": llm.max_batch_size,
                       "enforce_eager": v.enforce_eager, "gpu_memory_utilization": v.gpu_memory_utilization}
        tokenizer = load_tokenizer(base)  # the base's own: the abstention reply as vLLM's tokenizer writes it
        self.abstention, self.eos = abstention_tokens(tokenizer), tokenizer.eos_token_id
        here = ray.get_runtime_context().get_node_id()
        self.worker = ray.remote(VLLMWorker).options(
            num_cpus=v.num_cpus, num_gpus=llm.num_gpus,
            runtime_env={"py_executable": str(python), "env_vars": env},
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(str(base.path), engine_args)
        ray.get(self.worker.list_loras.remote(), timeout=v.start_timeout_s)  # up, or why not, before the replica is
        self.released = released
        self.ids: dict[str, int] = {}  # adapter -> vLLM's int id (1, 2, ...), one per adapter for the replica's life
        self.paths: dict[str, str] = {}  # adapters loaded -> their verified local paths
        self.users: Counter = Counter()  # adapter -> requests running
        self.tasks: dict[str, asyncio.Task] = {}  # request id -> the task relaying its events
        self.cancelled = 0

    async def load(self, name: str, path: Path) -> None:
        lora_id = self.ids.setdefault(name, len(self.ids) + 1)
        await self.worker.add_lora.remote(name, lora_id, str(path))
        self.paths[name] = str(path)

    def delete(self, name: str) -> bool:
        if self.paths.pop(name, None) is None:
            return False
        self.worker.remove_lora.remote(self.ids[name])
        return True

    async def start(self, request: dict, name: str | None, emit: Callable[[dict], None]) -> str:
        request_id = uuid.uuid4().hex
        sampling = {"max_tokens": request["max_tokens"], "temperature": request["temperature"],
                    "top_p": request["top_p"], "stop": list(request["stop"]) or None,
                    "ignore_eos": request.get("ignore_eos", False)}
        if threshold := request.get("abstain_threshold"):  # serving/vllm_abstention.py applies it
            sampling["extra_args"] = {"abstention": {"tokens": list(self.abstention), "threshold": threshold,
                                                     "eos": self.eos}}
        lora = (name, self.ids[name], self.paths[name]) if name is not None else None
        stream = self.worker.generate.options(num_returns="streaming").remote(
            request_id, request["prompt"], sampling, lora, request.get("regex"))
        self.users[name] += 1
        self.tasks[request_id] = asyncio.create_task(self._relay(request_id, stream, name, emit))
        return request_id

    async def _relay(self, request_id: str, stream, name: str | None, emit: Callable[[dict], None]) -> None:
        try:
            async for ref in stream:
                emit(await ref)
        except asyncio.CancelledError:
            raise
        except TaskCancelledError:
            # Ray cancelled the caller's call before `cancel` got here, and with it this stream (Ray cancels a task's
            # children): the worker's generate was cancelled, and vLLM aborts a cancelled request. Not a failure.
            self.cancelled += 1
        except Exception as e:  # the worker or its engine failed: this request's caller learns it, others go on
            logger.error("vLLM request %s failed: %s", request_id, e)
            emit({"error": f"the vLLM engine failed this request ({type(e).__name__})"})
        finally:
            self.tasks.pop(request_id, None)
            self.users[name] -= 1
            if name is not None and not self.users[name]:
                self.released({name})

    def cancel(self, request_id: str) -> None:
        if (task := self.tasks.get(request_id)) is not None:
            task.cancel()
            self.worker.abort.remote(request_id)
            self.cancelled += 1

    def in_use(self, name: str) -> bool:
        return self.users[name] > 0

    def loaded(self) -> list[str]:
        return sorted(self.paths)

    def stats(self) -> dict:
        return {"cancelled": self.cancelled, "running": sum(self.users.values())}

    def shutdown(self) -> None:
        try:
            ray.get(self.worker.shutdown.remote(), timeout=30)
        finally:
            ray.kill(self.worker)
