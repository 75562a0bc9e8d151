"""Index a corpus into Milvus with Ray Data.

    python -m jobs.index corpus.path=DIR [store.uri=URI] [store.collection=NAME] [index.prune=true]
"""

from __future__ import annotations

import sys

from tandem.commandline import Job, run
from tandem.config import require
from tandem.indexing import run_index
from tandem.milvus import milvus_endpoint
from tandem.runtime import ray_session, write_json

JOB = Job("index", __doc__, ("corpus", "store", "embedder", "chunking", "index", "ray"))


def format_summary(s: dict) -> str:
    lines = [
        f"indexed {s['corpus']} -> {s['store']['uri']} [{s['store']['collection']}]",
        f"  documents: {s['documents_read']} read, {s['documents_indexed']} (re)indexed, "
        f"{s['documents_unchanged']} unchanged, {s['documents_skipped']} skipped",
        f"  chunks: {s['chunks_written']} written, {s['chunks_deleted']} deleted ({s['chunks_pruned']} pruned); "
        f"rows {s['rows_before']} -> {s['rows_after']}",
        f"  {s['elapsed_s']} s, {s['chunks_per_s']} chunks/s, peak memory (PSS) {s['peak_memory_mb']} MiB",
    ]
    lines += [f"  skipped {r['source']}: {r['reason']}" for r in s["skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    require(cfg.corpus.path, "corpus.path")
    with ray_session(cfg.ray), milvus_endpoint(cfg.store.uri) as uri:
        summary = run_index(cfg, uri)
    print(format_summary(summary))
    print(f"summary written to {write_json(cfg.index.summary_path, summary)}")
    return summary


if __name__ == "__main__":
    run(main)
