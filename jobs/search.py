"""Ask the index a question from the shell.

    python -m jobs.search search.query="who directed 2001: A Space Odyssey" [search.mode=hybrid] [store.collection=NAME]
"""

from __future__ import annotations

import sys
import textwrap

from tandem.commandline import Job, run
from tandem.config import require
from tandem.embedding import Embedder
from tandem.milvus import local_or_server
from tandem.retrieval import Retriever

JOB = Job("search", __doc__, ("search", "store.uri", "store.collection", "store.search_params", "embedder.model",
                              "embedder.device"))


def main(argv: list[str] | None = None) -> list:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    query = require(cfg.search.query, "search.query")
    embedder = Embedder.from_config(cfg.embedder)
    with local_or_server(cfg.store.uri) as client:
        retriever = Retriever.from_config(client, cfg.store.collection, embedder.encode, cfg)
        hits = retriever.search([query], k=cfg.search.k, mode=cfg.search.mode, filter=cfg.search.filter)[0]
    print(f"{cfg.search.mode} top {cfg.search.k} for {query!r}:")
    for rank, h in enumerate(hits, start=1):
        print(f"{rank}. [{h.score:.4f}] {h.title or h.doc_id} (chunk {h.chunk_no}, {h.source})")
        print(textwrap.indent(textwrap.shorten(h.text, 300), "   "))
    return hits


if __name__ == "__main__":
    run(main)
