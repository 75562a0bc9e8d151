"""Batched chat generation with a (PEFT) causal LM: greedy, left-padded, prompt tokens stripped from the output."""

from __future__ import annotations


def generate_chat(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96,
                  batch_size: int = 8) -> list[str]:
    import torch

    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    outputs = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        outputs += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in outputs]
