"""An optional second stage after retrieval: a cross-encoder reads each query with each candidate passage and
reorders them. Slower than the first stage (one forward per pair), better at telling the answer from a passage that
only shares its words. Set by `search.rerank.model`; off by default, as no cross-encoder ships with Tandem.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

from tandem.embedding import resolve_model_path, select_device


class Reranker:
    def __init__(self, model: str, device: str = "auto", batch_size: int = 32):
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(resolve_model_path(model), device=select_device(device))
        self.batch_size = batch_size

    def rerank(self, queries: list[str], found: list[list], k: int) -> list[list]:
        """For each query, the k of its hits the cross-encoder scores highest, best first, each with that score.
        All pairs of all queries go through the model together."""
        pairs = [(q, h.text) for q, hits in zip(queries, found) for h in hits]
        scores = iter(self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False).tolist()
                      if pairs else [])
        out = []
        for hits in found:
            ranked = sorted(((h, next(scores)) for h in hits), key=lambda pair: -pair[1])[:k]
            out.append([dataclasses.replace(h, score=float(s)) for h, s in ranked])
        return out


@lru_cache(maxsize=2)
def load_reranker(model: str, device: str, batch_size: int) -> Reranker:
    """One cross-encoder per process, shared by every collection's retriever."""
    return Reranker(model, device, batch_size)
