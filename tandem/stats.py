"""Percentiles, defined once: the rollout gate, the report's plots and the dataset statistics read the same p95."""

from __future__ import annotations

import math
from typing import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank percentile (`q` in [0, 1]): a value that occurred, at or above a share `q` of the values;
    None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
