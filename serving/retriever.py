"""The Retriever deployment: the query embedder and the `tandem` retriever over Milvus, queries batched.

Concurrent requests are gathered by `@serve.batch` and searched together: one embedding call and one Milvus search
per group of requests that share mode, k and filter. A local `store.uri` opens Milvus Lite inside the replica (one
replica: Lite allows one process); a server URI lets any number of replicas share the store.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from itertools import groupby

from pymilvus import MilvusException
from ray import serve

from tandem.embedding import Embedder
from tandem.milvus import local_or_server
from tandem.retrieval import Retriever as MilvusRetriever


class Retriever:
    def __init__(self, cfg):
        self.cfg = cfg
        self.embedder = Embedder.from_config(cfg.embedder)
        self._stack = contextlib.ExitStack()
        self.client = self._stack.enter_context(local_or_server(cfg.store.uri))
        self.retrievers: dict[str, MilvusRetriever] = {}
        self.search.set_max_batch_size(cfg.serve.retriever.max_batch_size)
        self.search.set_batch_wait_timeout_s(cfg.serve.retriever.batch_wait_timeout_s)

    def _retriever(self, collection: str) -> MilvusRetriever:
        if collection not in self.retrievers:
            if not self.client.has_collection(collection):
                raise LookupError(f"collection {collection!r} does not exist; index it first (jobs.index)")
            self.retrievers[collection] = MilvusRetriever.from_config(self.client, collection, self.embedder.encode,
                                                                      self.cfg)
        return self.retrievers[collection]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def search(self, requests: list[dict]) -> list:
        """Each request: {query, collection, k, mode, filter} -> a list of hits, or the exception for that request."""
        out: list = [None] * len(requests)

        def key(i):
            r = requests[i]
            return r["collection"], r["mode"], r["k"], r["filter"]

        for (collection, mode, k, filter), group in groupby(sorted(range(len(requests)), key=key), key=key):
            rows = list(group)
            try:
                hits = self._retriever(collection).search([requests[i]["query"] for i in rows], k=k, mode=mode,
                                                          filter=filter)
                for i, h in zip(rows, hits):
                    out[i] = [asdict(x) for x in h]
            except (ValueError, LookupError, MilvusException) as e:  # a bad filter fails its own requests only
                reason = e.message if isinstance(e, MilvusException) else str(e)
                if not isinstance(e, LookupError):
                    reason = f"{mode} search in {collection!r} failed (filter {filter!r}): {reason}"
                for i in rows:
                    out[i] = ValueError(reason)
        return out

    async def __call__(self, request: dict) -> list[dict]:
        result = await self.search(request)
        if isinstance(result, Exception):
            raise result
        return result

    def __del__(self):
        self._stack.close()
