"""The one retriever used by jobs and serving: dense, BM25 or hybrid (dense + BM25 fused by Milvus's weighted or RRF
ranker) over Milvus."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pymilvus import AnnSearchRequest, MilvusClient, RRFRanker, WeightedRanker

from tandem.config import fusion_for
from tandem.errors import ConfigError
from tandem.milvus import has_bm25
from tandem.reranking import load_reranker

MODES = ("dense", "bm25", "hybrid")
FUSIONS = ("weighted", "rrf")
OUTPUT_FIELDS = ["doc_id", "source", "title", "chunk_no", "text", "meta"]


@dataclass
class Hit:
    id: int
    doc_id: str
    chunk_no: int
    text: str
    title: str
    source: str
    score: float
    meta: dict = field(default_factory=dict)


class Retriever:
    """Search a chunk collection. `embed` turns a list of queries into vectors (the indexing embedder).

    Filters are Milvus boolean expressions over the metadata fields (`doc_id`, `source`, `title`, `chunk_no`,
    `meta["key"]`). BM25 and hybrid need a collection made with a BM25 field (Milvus >= 2.5 or Milvus Lite).
    """

    def __init__(self, client: MilvusClient, collection: str, embed, search_params: dict, fusion, reranker,
                 candidates: int):
        self.client = client
        self.collection = collection
        self.embed = embed
        self.search_params = {"metric_type": "COSINE", "params": dict(search_params)}
        self.ranker = ranker(fusion)
        self.reranker, self.candidates = reranker, candidates
        self.bm25 = has_bm25(client, collection)
        client.load_collection(collection)  # a collection reopened from disk starts released

    @classmethod
    def from_config(cls, client: MilvusClient, collection: str, embed, cfg) -> "Retriever":
        """Search-time settings from the config (store.search_params, the collection's fusion or search.fusion), the
        same for every caller."""
        r = cfg.search.rerank
        reranker = load_reranker(r.model, r.device, r.batch_size) if r.model else None
        return cls(client, collection, embed, dict(cfg.store.search_params), fusion_for(cfg, collection), reranker,
                   r.candidates)

    def search(self, queries: list[str], k: int = 5, mode: str = "dense", filter: str = "") -> list[list[Hit]]:
        """Top-k chunks for each query, best first: the first stage's own, or, with a reranker, the k it scores
        highest among the first stage's `candidates`."""
        if self.reranker is None:
            return self._first_stage(queries, k, mode, filter)
        found = self._first_stage(queries, max(k, self.candidates), mode, filter)
        return self.reranker.rerank(queries, found, k)

    def _first_stage(self, queries: list[str], k: int, mode: str, filter: str) -> list[list[Hit]]:
        if mode not in MODES:
            raise ValueError(f"unknown retrieval mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode != "dense" and not self.bm25:
            raise ValueError(f"mode={mode} needs a BM25 field; collection {self.collection!r} has none "
                             f"(its Milvus has no BM25 functions, or store.bm25=false)")
        if not queries:
            return []
        if mode == "bm25":
            results = self.client.search(self.collection, data=list(queries), anns_field="sparse", limit=k,
                                         filter=filter, output_fields=OUTPUT_FIELDS,
                                         search_params={"metric_type": "BM25"})
        else:
            vectors = [list(map(float, v)) for v in self.embed(list(queries))]
            if mode == "dense":
                results = self.client.search(self.collection, data=vectors, anns_field="dense", limit=k,
                                             filter=filter, output_fields=OUTPUT_FIELDS,
                                             search_params=self.search_params)
            else:
                results = self._hybrid(queries, vectors, k, filter)
        return [[_hit(h) for h in hits] for hits in results]

    def _hybrid(self, queries: list[str], vectors: list[list[float]], k: int, filter: str):
        # All queries in one request; each list is widened to 2k candidates before the ranker fuses them.
        reqs = [AnnSearchRequest(vectors, "dense", self.search_params, limit=2 * k, expr=filter or None),
                AnnSearchRequest(list(queries), "sparse", {"metric_type": "BM25"}, limit=2 * k, expr=filter or None)]
        return self.client.hybrid_search(self.collection, reqs, self.ranker, limit=k, output_fields=OUTPUT_FIELDS)


def ranker(fusion):
    """Milvus's ranker for `search.fusion`. Weighted normalizes each list's scores (cosine and BM25 have different
    scales) before blending them; RRF uses ranks only, so a weak list counts as much as a strong one."""
    if fusion.rrf_k <= 0:
        raise ConfigError(f"search.fusion.rrf_k must be > 0, got {fusion.rrf_k}")
    if not 0.0 <= fusion.dense_weight <= 1.0:
        raise ConfigError(f"search.fusion.dense_weight must be within [0, 1], got {fusion.dense_weight}")
    if fusion.method == "rrf":
        return RRFRanker(fusion.rrf_k)
    if fusion.method == "weighted":
        return WeightedRanker(float(fusion.dense_weight), 1.0 - float(fusion.dense_weight))
    raise ConfigError(f"search.fusion.method must be one of {', '.join(FUSIONS)}, got {fusion.method!r}")


def _hit(h: dict) -> Hit:
    e = h.get("entity", h)
    meta = e.get("meta") or {}
    return Hit(id=int(h.get("id", h.get("pk"))), doc_id=e["doc_id"], chunk_no=int(e["chunk_no"]), text=e["text"],
               title=e["title"], source=e["source"], score=float(h["distance"]),
               meta=meta if isinstance(meta, dict) else json.loads(meta))
