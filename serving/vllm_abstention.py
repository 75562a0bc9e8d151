"""Calibrated abstention inside vLLM (serve.llm.engine=vllm): `tandem/abstention.py`'s rule as a vLLM logits
processor, so an adapter version's threshold steers its answers on either engine.

Imported in vLLM's environment only (by `serving/vllm_worker.py`, and by the engine core process that vLLM starts,
which loads the class by name): the rule itself needs nothing but torch. A request carries the rule in its sampling
`extra_args["abstention"]` ({tokens, threshold, eos}); requests without it pass untouched.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from tandem.abstention import Abstention


class AbstentionLogitsProcessor(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False  # it forces tokens: greedy requests need it too

    def new_req_logits_processor(self, params):
        rule = (params.extra_args or {}).get("abstention")
        if not rule:
            return None
        abstention = Abstention(tuple(rule["tokens"]), rule["threshold"], rule["eos"])

        def steer(output_ids: list[int], logits):
            abstention.steer(output_ids, logits)
            return logits

        return steer
