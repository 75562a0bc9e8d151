"""Offline batched generation with a (PEFT) causal LM (validation, evaluation): left-padded batches, prompt tokens
stripped from the output. Serving streams through the continuous-batching engine (`tandem.engine`) instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # of the batch it was generated in: what its caller waited
    abstain_score: float | None = None  # the probability it gave abstaining (tandem/abstention.py), when measured


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96, batch_size: int = 8,
                     guides: list | None = None, abstentions: list | None = None) -> list[Generated]:
    """Greedy answers to chat conversations, in batches, with their token counts and time; `guides` (one
    outlines-core guide or None per conversation, tandem/structured.py) constrain what each answer may be;
    `abstentions` (one tandem/abstention.py rule per conversation) steer them to the abstention reply and score how
    likely they were to take it."""
    import torch
    from transformers import LogitsProcessorList

    from tandem.abstention import AbstentionLogits
    from tandem.structured import GuidedLogits

    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    outputs = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        width = batch["input_ids"].shape[1]
        processors = LogitsProcessorList()  # the constraint first: abstention's probabilities are among what it allows
        if guides:
            processors.append(GuidedLogits(guides[i : i + batch_size], width,
                                           {tokenizer.eos_token_id, tokenizer.pad_token_id}))
        steered = AbstentionLogits(abstentions[i : i + batch_size], width) if abstentions else None
        if steered:
            processors.append(steered)
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, logits_processor=processors)
        latency = (time.perf_counter() - started) * 1000
        new = out[:, width:]
        for j, (row, prompt_len, text) in enumerate(zip(new, batch["attention_mask"].sum(dim=1).tolist(),
                                                        tokenizer.batch_decode(new, skip_special_tokens=True))):
            ended = (row == tokenizer.eos_token_id).nonzero()
            completion = int(ended[0]) + 1 if len(ended) else len(row)
            outputs.append(Generated(text.strip(), prompt_len, completion, round(latency, 1),
                                     steered.scores[j] if steered else None))
    return outputs
