"""Training micro-batches as tensors: rows padded to the longest, or short rows packed into full-length sequences.

A packed sequence carries no attention mask, only position ids that restart at 0 for every row: transformers then
builds a block-diagonal causal mask from the position ids (`find_packed_sequence_indices`), so no row attends to
another, for SDPA and eager attention alike (flash-attention reads the same boundaries), provided the forward
runs without a KV cache (`use_cache=False`; with a cache transformers skips that mask and rows see each other).
The first label of every row is ignored, so no row learns to predict the next one's first token.
"""

from __future__ import annotations

from tandem.data.features import IGNORE


def pack(rows: list[dict], max_length: int) -> list[list[dict]]:
    """Rows grouped into bins of at most `max_length` tokens, first-fit decreasing (few bins, little padding);
    the same rows give the same bins on every worker."""
    bins: list[list[dict]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r["input_ids"])):
        n = len(row["input_ids"])
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([])
            room.append(max_length)
            slot = len(bins) - 1
        bins[slot].append(row)
        room[slot] -= n
    return bins


def padded_batch(rows: list[dict], pad_id: int) -> dict:
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packed_batch(bins: list[list[dict]], pad_id: int) -> dict:
    """One sequence per bin; the padding after a bin's rows is a block of its own (positions from 0, no loss)."""
    import torch

    width = max(sum(len(r["input_ids"]) for r in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for i, b in enumerate(bins):
        at = 0
        for r in b:
            n = len(r["input_ids"])
            ids[i, at : at + n] = torch.tensor(r["input_ids"])
            labels[i, at + 1 : at + n] = torch.tensor(r["labels"][1:])
            positions[i, at : at + n] = torch.arange(n)
            at += n
        positions[i, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}
