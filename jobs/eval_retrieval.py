"""Index a BEIR dataset and compare dense, BM25 and hybrid retrieval side by side.

    python -m jobs.eval_retrieval eval.dataset=DIR [store.uri=URI] [store.collection=NAME]
    python -m jobs.eval_retrieval -m eval.dataset=DIR eval.k=5,10 search.rrf_k=20,60 eval.modes=[hybrid],[dense]

With -m, every combination of the comma-separated search-time values is scored over one index: one report per
combination beside eval.output (in <output>-sweep/) and a summary table.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from tandem.commandline import Job, run
from tandem.config import require
from tandem.embedding import Embedder
from tandem.evaluation import dedupe_docs, load_beir, retrieval_metrics
from tandem.indexing import run_index
from tandem.milvus import connect, milvus_endpoint
from tandem.retrieval import Retriever
from tandem.runtime import ray_session, write_json

JOB = Job("eval_retrieval", __doc__, ("eval", "search.rrf_k", "store", "embedder", "chunking", "ray"),
          # what changes only how the index is searched, so one index serves every combination
          sweeps=("eval.modes", "eval.k", "eval.max_queries", "search.rrf_k", "store.search_params"))


def index_corpus(cfg, uri: str, corpus: Path) -> dict:
    """Index exactly corpus.jsonl (not the queries beside it); the index job's summary."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.jsonl").symlink_to(corpus.resolve())
        return run_index(OmegaConf.merge(cfg, {"corpus": {"path": tmp}}), uri)


def score(cfg, client, embedder: Embedder, queries: dict, qrels: dict) -> dict:
    """Metrics per mode for one configuration's search-time settings."""
    retriever = Retriever.from_config(client, cfg.store.collection, embedder.encode, cfg)
    qids = list(queries)[: cfg.eval.max_queries or None]
    results = {}
    for mode in cfg.eval.modes:
        ranked = {}
        for i in range(0, len(qids), cfg.eval.batch_size):
            batch = qids[i : i + cfg.eval.batch_size]
            hits = retriever.search([queries[q] for q in batch], k=3 * cfg.eval.k, mode=mode)
            ranked.update({q: dedupe_docs([h.doc_id for h in hs])[: cfg.eval.k] for q, hs in zip(batch, hits)})
        results[mode] = retrieval_metrics(ranked, {q: qrels[q] for q in qids})
    return {"queries": len(qids), "metrics": results}


def format_table(report: dict) -> str:
    metrics = report["metrics"]
    names = list(next(iter(metrics.values())))
    lines = [f"{report['dataset']}: {report['queries']} queries, {report['documents']} documents, "
             f"{report['chunks']} chunks", "mode    " + "".join(f"{n:>11}" for n in names)]
    lines += [f"{mode:<8}" + "".join(f"{m[n]:>11.4f}" for n in names) for mode, m in metrics.items()]
    return "\n".join(lines)


def format_sweep(reports: list[dict]) -> str:
    swept = max((len(" ".join(r["overrides"])) for r in reports), default=0)
    names = sorted({n for r in reports for m in r["metrics"].values() for n in m})
    lines = [f"{'overrides':<{swept}}  mode    " + "".join(f"{n:>11}" for n in names)]
    for r in reports:
        for mode, m in r["metrics"].items():
            lines.append(f"{' '.join(r['overrides']):<{swept}}  {mode:<8}" +
                         "".join(f"{m[n]:>11.4f}" if n in m else f"{'-':>11}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    runs = JOB.sweep(sys.argv[1:] if argv is None else argv)
    cfg = runs[0][1]
    require(cfg.eval.dataset, "eval.dataset")
    corpus, queries, qrels = load_beir(cfg.eval.dataset, cfg.eval.split)
    with ray_session(cfg.ray), milvus_endpoint(cfg.store.uri) as uri:
        summary = index_corpus(cfg, uri, corpus)
        embedder = Embedder.from_config(cfg.embedder)
        client = connect(uri)
        try:
            reports = [{"dataset": str(cfg.eval.dataset), "documents": summary["documents_read"],
                        "chunks": summary["rows_after"], "overrides": swept,
                        **score(run_cfg, client, embedder, queries, qrels)} for swept, run_cfg in runs]
        finally:
            client.close()
    if len(runs) == 1:
        report = {k: v for k, v in reports[0].items() if k != "overrides"}
        print(format_table(report))
        print(f"report written to {write_json(cfg.eval.output, report)}")
        return report
    out = Path(cfg.eval.output).expanduser()
    folder = out.with_name(f"{out.stem}-sweep")
    for i, report in enumerate(reports):
        slug = re.sub(r"[^A-Za-z0-9=.,_-]+", "_", "_".join(report["overrides"]))[:120]
        report["path"] = str(write_json(folder / f"{i:03d}-{slug}.json", report))
    table = format_sweep(reports)
    print(table)
    sweep = {"dataset": str(cfg.eval.dataset), "runs": reports, "table": table}
    print(f"{len(reports)} reports and the summary written to {write_json(folder / 'summary.json', sweep).parent}")
    return sweep


if __name__ == "__main__":
    run(main)
