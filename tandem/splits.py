"""Splits by hash: an item's place in [0, 1) comes from a hash of its id, so a split never moves when items are added
or reordered, and every job that splits the same ids agrees on it."""

from __future__ import annotations

import hashlib


def position(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
