"""Tokenized training features, with the loss on completion tokens only, cached per (dataset version, tokenizer,
max length) beside the version they come from."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IGNORE = -100  # label value the loss skips: prompt and template tokens
FEATURES = pa.schema([("split", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      # a preference pair's rejected answer after the same prompt (null for other rows)
                      ("rejected_input_ids", pa.list_(pa.int32())), ("rejected_labels", pa.list_(pa.int32()))])


def chat_features(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat, and labels that are the ids on assistant turns and IGNORE elsewhere, also on an
    assistant turn of weight 0 (context the model must not learn to say, such as a client-supplied history)."""
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True)["input_ids"]
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True)["input_ids"]
        if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
            raise ValueError("the chat template is not prefix-stable; cannot mask prompts")
        answer = full[len(prompt) :]
        labels += [IGNORE] * (len(prompt) - len(ids)) + (answer if m.get("weight") != 0 else [IGNORE] * len(answer))
        ids = full
    return ids[:max_length], labels[:max_length]


def build_features(rows: list[dict], tokenizer, max_length: int, cache: Path) -> Path:
    """Write (or reuse) the features file for these rows; returns its path."""
    if cache.is_file():
        return cache
    cols = {name: [] for name in FEATURES.names}
    for r in rows:
        ids, labels = chat_features(tokenizer, r["messages"], max_length)
        rejected = (chat_features(tokenizer, [*r["messages"][:-1], {"role": "assistant", "content": r["rejected"]}],
                                  max_length) if r.get("rejected") is not None else (None, None))
        for name, value in zip(FEATURES.names, (r["split"], ids, labels, *rejected)):
            cols[name].append(value)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".partial")
    pq.write_table(pa.Table.from_pydict(cols, schema=FEATURES), tmp)
    tmp.rename(cache)
    return cache
