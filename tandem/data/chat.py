"""Measuring and fitting chat rows with the base model's own chat template: the length that counts is the length
the model will be trained on."""

from __future__ import annotations


class ChatTokens:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def count(self, messages: list[dict]) -> int:
        return len(self.tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])

    def truncate(self, messages: list[dict], max_tokens: int) -> list[dict] | None:
        """Cut the last assistant turn so the row fits; None when even an empty answer would not."""
        head = messages[:-1] + [{"role": "assistant", "content": ""}]
        budget = max_tokens - self.count(head)
        if budget <= 0:
            return None
        ids = self.tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        for keep in range(min(budget, len(ids)), 0, -1):  # decoding can re-merge into more tokens: step down
            fitted = messages[:-1] + [{"role": "assistant", "content": self.tokenizer.decode(ids[:keep])}]
            if self.count(fitted) <= max_tokens:
                return fitted
        return None
