"""Structured output, as OpenAI's `response_format` asks for it, for the HF engine: outlines-core compiles a JSON
schema to a regular expression and an index over the tokenizer's vocabulary, and a guide per request says which
tokens may come next. Decoding under it can only produce text the schema accepts (unless `max_tokens` cuts it).

`json_object` is any JSON object, to the bounded nesting outlines-core's regex allows; `json_schema` is the
caller's schema. Compiling the generic object takes seconds, a typical schema milliseconds; both are cached.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

# Counted repetitions in the compiled regex (`{0,100000}` from a maxLength) grow its automaton with the count, and
# building it cannot be interrupted: a stranger's schema could hold an LLM replica for minutes. Bounded here.
MAX_REPEAT = 256
MAX_REGEX = 65536
REPEAT = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")


class SchemaError(ValueError):
    """A response_format the server cannot enforce: the caller's to fix (400)."""


def response_regex(response_format: dict | None) -> str | None:
    """The regex a response_format stands for (None for plain text); SchemaError for one that cannot be compiled.
    Cheap: the router calls it to refuse a bad schema before any work."""
    from outlines_core.json_schema import build_regex_from_schema

    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        schema = ((response_format.get("json_schema") or {}).get("schema"))
        if not isinstance(schema, dict):
            raise SchemaError("response_format.json_schema.schema must be a JSON schema object")
    else:
        raise SchemaError(f"response_format.type={kind!r}; expected text, json_object or json_schema")
    try:
        regex = build_regex_from_schema(json.dumps(schema))
    except (ValueError, TypeError, RuntimeError) as e:
        raise SchemaError(f"response_format.json_schema.schema cannot be enforced: {e}") from None
    counts = [int(n) for m in REPEAT.finditer(regex) for n in m.groups() if n]
    if len(regex) > MAX_REGEX or max(counts, default=0) > MAX_REPEAT:
        raise SchemaError(f"response_format.json_schema.schema is too complex to enforce: lengths and item counts "
                          f"(maxLength, maxItems, ...) up to {MAX_REPEAT}, and a compiled expression of up to "
                          f"{MAX_REGEX} characters (this one: {len(regex)}, largest count {max(counts, default=0)})")
    return regex


def mask_logits(logits, guided: list[tuple[int, object]]) -> None:
    """In place: each guided row's logits keep only the tokens its guide allows next. (row index, guide) pairs; the
    guides' bitmasks (32 tokens a word) are unpacked for all rows in one tensor op."""
    import torch

    if not guided:
        return
    vocab = logits.shape[1]
    words = torch.zeros(len(guided), (vocab + 31) // 32, dtype=torch.int32)
    for row, (_, guide) in enumerate(guided):
        guide.write_mask_into(words[row].data_ptr(), words.shape[1], words.element_size())
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.flatten(1)[:, :vocab].bool().to(logits.device)
    index = torch.tensor([i for i, _ in guided], device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


class GuidedLogits:
    """The same guides as a transformers logits processor, for `generate` (offline evaluation): one guide (or None)
    per row of the batch, advanced by the token each row chose at the previous step."""

    def __init__(self, guides: list, prompt_length: int, eos_ids: set[int]):
        self.guides, self.prompt_length, self.eos_ids = guides, prompt_length, eos_ids

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.prompt_length:
            for guide, token in zip(self.guides, input_ids[:, -1].tolist()):
                if guide is not None and token not in self.eos_ids and not guide.is_finished():
                    guide.advance(token, return_tokens=False)
        mask_logits(scores, [(i, g) for i, g in enumerate(self.guides) if g is not None])
        return scores


class Guides:
    """Per-tokenizer vocabulary and a cache of compiled indexes; `guide(regex)` is a fresh guide for one request."""

    def __init__(self, tokenizer, cache_size: int = 32):
        self.tokenizer, self.cache_size = tokenizer, cache_size
        self.indexes: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()
        self._vocabulary = None

    def vocabulary(self):
        """Each token's text (what it adds when decoded), EOS apart; special tokens are never allowed."""
        from outlines_core import Vocabulary

        if self._vocabulary is None:
            tok = self.tokenizer
            special = set(tok.all_special_ids)
            texts: dict[str, list[int]] = {}
            for token_id in range(len(tok)):
                if token_id in special:
                    continue
                text = tok.decode([token_id])
                if text:
                    texts.setdefault(text, []).append(token_id)
            self._vocabulary = Vocabulary(tok.eos_token_id, texts)
        return self._vocabulary

    def guide(self, regex: str):
        from outlines_core import Guide, Index

        with self.lock:
            index = self.indexes.get(regex)
            if index is None:
                index = self.indexes[regex] = Index(regex, self.vocabulary())
                while len(self.indexes) > self.cache_size:
                    self.indexes.popitem(last=False)
            self.indexes.move_to_end(regex)
        return Guide(index)
