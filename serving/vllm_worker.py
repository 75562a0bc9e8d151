"""The vLLM engine's own process: a Ray actor running vLLM's `AsyncLLM` in vLLM's environment.

vLLM pins transformers and torch extras that the project's environment must not take, so this actor is started with
`runtime_env={"py_executable": <serve.llm.vllm.python>}` (the LLM deployment does it, `serving/vllm_engine.py`) and
imports from the project only what runs on torch alone: the calibrated-abstention rule, as a vLLM logits processor
(`serving/vllm_abstention.py`). It receives prompts with the chat template applied, sampling settings as a dict (an
abstention rule in `extra_args`) and LoRA adapters as (name, id, local path) already checked by the deployment, and
streams one event per engine step in the HF engine's shape.
"""

from __future__ import annotations


class VLLMWorker:
    def __init__(self, model: str, engine_args: dict):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from serving.vllm_abstention import AbstentionLogitsProcessor

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=model, enable_lora=True, logits_processors=[AbstentionLogitsProcessor], **engine_args))

    async def add_lora(self, name: str, lora_id: int, path: str) -> None:
        """Loads the adapter now, so one vLLM cannot load fails where it is asked for, not inside a batch."""
        from vllm.lora.request import LoRARequest

        if not await self.engine.add_lora(LoRARequest(name, lora_id, path)):
            raise RuntimeError(f"vLLM did not load adapter {name} from {path}")

    async def remove_lora(self, lora_id: int) -> bool:
        return await self.engine.remove_lora(lora_id)

    async def list_loras(self) -> list[int]:
        return sorted(await self.engine.list_loras())

    async def generate(self, request_id: str, prompt: str, sampling: dict, lora: tuple | None, regex: str | None):
        """Events {"text" (the new text), "finish_reason", "prompt_tokens", "completion_tokens"}; one
        {"error", "status": 400} when vLLM refuses the request itself (a pattern it cannot compile, a setting out of
        range)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        completion_tokens = 0
        try:
            params = SamplingParams(**sampling, output_kind=RequestOutputKind.DELTA,
                                    structured_outputs=StructuredOutputsParams(regex=regex) if regex else None)
            stream = self.engine.generate(prompt, params, request_id,
                                          lora_request=LoRARequest(*lora) if lora else None)
            async for out in stream:
                step = out.outputs[0]
                completion_tokens += len(step.token_ids)
                yield {"text": step.text, "finish_reason": step.finish_reason,
                       "prompt_tokens": len(out.prompt_token_ids or ()), "completion_tokens": completion_tokens}
        except (VLLMClientError, ValueError) as e:
            yield {"error": f"vLLM refused the request: {e}", "status": 400}

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def shutdown(self) -> None:
        self.engine.shutdown()
