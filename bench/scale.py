"""Scale: index 100k+ chunks on this box within memory, report peak memory, then search latency p50/p99 at that size.

    python bench/scale.py [--corpus /usr/share/doc/linux-doc-6.1/Documentation] [--max-tokens 32] [--max-files 1320]

The default corpus is the Linux kernel documentation from Debian's `linux-doc-6.1` (3,184 .rst.gz files, 24 MB).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.index import main as index_main  # noqa: E402
from tandem.config import load_config  # noqa: E402
from tandem.embedding import Embedder  # noqa: E402
from tandem.milvus import connect, milvus_endpoint  # noqa: E402
from tandem.retrieval import Retriever  # noqa: E402
from tandem.runtime import write_json  # noqa: E402
from tandem.stats import percentile  # noqa: E402


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="/usr/share/doc/linux-doc-6.1/Documentation")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--overlap", type=int, default=0)
    ap.add_argument("--max-files", type=int, default=1320, help="the first N files: ~105k chunks, ~11 min here")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--workdir", default=".tandem/scale")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    root = Path(args.corpus)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(".rst.gz"))[: args.max_files]:
        link = corpus / str(f.relative_to(root)).replace("/", "__")
        if not link.exists():
            link.symlink_to(f)
    overrides = [f"workdir={work}", "store.collection=scale", f"chunking.max_tokens={args.max_tokens}",
                 f"chunking.overlap_tokens={args.overlap}"]
    summary = index_main(overrides + [f"corpus.path={corpus}"])

    cfg = load_config("search", overrides)
    embedder = Embedder.from_config(cfg.embedder)
    result = {"chunks": summary["rows_after"], "documents": summary["documents_read"],
              "index_s": summary["elapsed_s"], "chunks_per_s": summary["chunks_per_s"],
              "peak_memory_mb": summary["peak_memory_mb"], "skipped": summary["documents_skipped"]}
    with milvus_endpoint(cfg.store.uri) as uri:
        client = connect(uri)
        t = time.perf_counter()
        client.release_collection("scale")
        client.load_collection("scale")  # Milvus Lite builds the HNSW index while loading
        result["index_build_s"] = round(time.perf_counter() - t, 1)
        rows = client.query("scale", filter="chunk_no == 0", output_fields=["title"], limit=5000)
        titles = [r["title"] for r in rows if r["title"]]
        queries = random.Random(0).sample(titles, min(args.queries, len(titles)))
        retriever = Retriever.from_config(client, "scale", embedder.encode, cfg)
        for mode in ("dense", "bm25", "hybrid"):
            retriever.search(queries[:5], k=10, mode=mode)  # warm-up
            latencies = []
            for q in queries:
                t = time.perf_counter()
                retriever.search([q], k=10, mode=mode)
                latencies.append((time.perf_counter() - t) * 1000)
            result[f"{mode}_p50_ms"] = round(statistics.median(latencies), 1)
            result[f"{mode}_p99_ms"] = round(percentile(latencies, 0.99), 1)
        client.close()
    print(json.dumps(result, indent=2))
    write_json(Path(__file__).parent / "results" / "scale.json", result)
    return result


if __name__ == "__main__":
    main()
