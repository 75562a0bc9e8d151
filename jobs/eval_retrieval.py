"""Index a BEIR dataset and compare dense, BM25 and hybrid retrieval side by side.

    python -m jobs.eval_retrieval eval.dataset=DIR [store.uri=URI] [store.collection=NAME]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from tandem.config import config_from_argv, require
from tandem.embedding import Embedder
from tandem.evaluation import dedupe_docs, load_beir, retrieval_metrics
from tandem.indexing import run_index
from tandem.retrieval import Retriever
from tandem.runtime import ray_session, write_json
from tandem.store import connect, milvus_endpoint


def evaluate(cfg, uri: str) -> dict:
    corpus, queries, qrels = load_beir(cfg.eval.dataset, cfg.eval.split)
    with tempfile.TemporaryDirectory() as tmp:  # index exactly corpus.jsonl, not the queries beside it
        (Path(tmp) / "corpus.jsonl").symlink_to(corpus.resolve())
        index_cfg = OmegaConf.merge(cfg, {"corpus": {"path": tmp}})
        summary = run_index(index_cfg, uri)
    embedder = Embedder.from_config(cfg.embedder)
    client = connect(uri)
    retriever = Retriever(client, cfg.store.collection, embedder.encode, dict(cfg.store.search_params), cfg.eval.rrf_k)
    qids = list(queries)[: cfg.eval.max_queries or None]
    results = {}
    for mode in cfg.eval.modes:
        ranked = {}
        for i in range(0, len(qids), cfg.eval.batch_size):
            batch = qids[i : i + cfg.eval.batch_size]
            hits = retriever.search([queries[q] for q in batch], k=3 * cfg.eval.k, mode=mode)
            ranked.update({q: dedupe_docs([h.doc_id for h in hs])[: cfg.eval.k] for q, hs in zip(batch, hits)})
        results[mode] = retrieval_metrics(ranked, {q: qrels[q] for q in qids})
    client.close()
    return {"dataset": str(cfg.eval.dataset), "queries": len(qids), "documents": summary["documents_read"],
            "chunks": summary["rows_after"], "metrics": results}


def format_table(report: dict) -> str:
    metrics = report["metrics"]
    names = list(next(iter(metrics.values())))
    lines = [f"{report['dataset']}: {report['queries']} queries, {report['documents']} documents, "
             f"{report['chunks']} chunks", "mode    " + "".join(f"{n:>11}" for n in names)]
    lines += [f"{mode:<8}" + "".join(f"{m[n]:>11.4f}" for n in names) for mode, m in metrics.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_argv("eval_retrieval", sys.argv[1:] if argv is None else argv)
    require(cfg.eval.dataset, "eval.dataset")
    with ray_session(cfg.ray), milvus_endpoint(cfg.store.uri) as uri:
        report = evaluate(cfg, uri)
    print(format_table(report))
    print(f"report written to {write_json(cfg.eval.output, report)}")
    return report


if __name__ == "__main__":
    main()
