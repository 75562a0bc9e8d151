"""Indexing throughput: the Ray Data pipeline (files -> flushed Milvus rows) vs raw SentenceTransformer.encode on the
same chunks and cores, and a re-index of the unchanged corpus vs the first index. One run, ratios printed.

    python bench/index.py [--docs 3000] [--workdir .tandem/bench] [key=value ...]

key=value overrides go to both the raw encoder and the pipeline (e.g. embedder.num_gpus=1 on a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from jobs.index import main as index_main  # noqa: E402
from tandem.chunking import Chunker, load_embedder_tokenizer  # noqa: E402
from tandem.config import load_config  # noqa: E402
from tandem.datasets import wiki  # noqa: E402
from tandem.documents import clean_text  # noqa: E402
from tandem.embedding import Embedder, resolve_model_path  # noqa: E402
from tandem.runtime import write_json  # noqa: E402


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--workdir", default=".tandem/bench")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    cfg = load_config("index", [f"workdir={work}", *args.overrides])

    wiki(work / "all")
    lines = (work / "all" / "wiki.jsonl").read_text().splitlines()[: args.docs]
    (work / "corpus").mkdir(parents=True)
    (work / "corpus" / "wiki.jsonl").write_text("\n".join(lines) + "\n")
    texts = [clean_text(json.loads(line)["text"]) for line in lines]
    chunker = Chunker(load_embedder_tokenizer(resolve_model_path(cfg.embedder.model)), cfg.chunking.max_tokens,
                      cfg.chunking.overlap_tokens)
    chunks = [c for doc in chunker.split_many(texts) for c in doc]

    embedder = Embedder.from_config(cfg.embedder)  # same threads as the pipeline's actor
    embedder_device = str(embedder.model.device)
    embedder.encode(chunks[:64])  # warm-up
    t = time.perf_counter()
    embedder.encode(chunks)
    raw_s = time.perf_counter() - t
    raw_rate = len(chunks) / raw_s
    print(f"raw SentenceTransformer.encode: {len(chunks)} chunks in {raw_s:.1f} s = {raw_rate:.1f} chunks/s")
    del embedder

    ray.init(include_dashboard=False)  # one cluster for both runs, as a long-lived cluster serves submitted jobs

    job = [f"workdir={work}", f"corpus.path={work / 'corpus'}", "store.collection=bench", *args.overrides]
    t = time.perf_counter()
    first = index_main(job)
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    again = index_main(job)
    again_s = time.perf_counter() - t

    pipeline_rate = first["chunks_written"] / first_s
    result = {
        "documents": len(lines), "chunks": len(chunks), "torch_threads": cfg.embedder.torch_threads,
        "device": embedder_device, "overrides": args.overrides,
        "raw_encode_chunks_per_s": round(raw_rate, 1),
        "pipeline_chunks_per_s": round(pipeline_rate, 1),
        "pipeline_vs_raw": round(pipeline_rate / raw_rate, 3),
        "first_index_s": round(first_s, 1), "reindex_unchanged_s": round(again_s, 1),
        "reindex_speedup": round(first_s / again_s, 1),
        "reindex_chunks_written": again["chunks_written"],
        "peak_memory_mb": first["peak_memory_mb"],
    }
    print(json.dumps(result, indent=2))
    write_json(Path(__file__).parent / "results" / "index.json", result)
    return result


if __name__ == "__main__":
    main()
