"""Index a BEIR dataset and compare dense, BM25 and hybrid retrieval side by side, with significance tests.

    python -m jobs.eval_retrieval eval.dataset=DIR [store.uri=URI] [store.collection=NAME]
    python -m jobs.eval_retrieval eval.dataset=DIR eval.tune_fusion=true
    python -m jobs.eval_retrieval -m eval.dataset=DIR eval.k=5,10 search.fusion.dense_weight=0.5,0.8 \\
        eval.modes=[hybrid],[dense]

With -m, every combination of the comma-separated search-time values is scored over one index: one report per
combination beside eval.output (in <output>-sweep/) and a summary table.

With eval.tune_fusion=true, hybrid's fusion (search.fusion) is chosen on a dev split of the queries by nDCG@10, and
every mode is scored on the remaining queries only; the report gives the overrides that set the chosen fusion.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from tandem.commandline import Job, run
from tandem.config import RANKING_KEYS, require
from tandem.embedding import Embedder
from tandem.errors import ConfigError
from tandem.evaluation import load_beir, ranked_documents, retrieval_metrics, significance, split_dev
from tandem.indexing import run_index
from tandem.milvus import connect, milvus_endpoint
from tandem.retrieval import Retriever
from tandem.runtime import ray_session, write_json

JOB = Job("eval_retrieval", __doc__, ("eval", *RANKING_KEYS, "store", "embedder", "chunking", "ray"),
          # what changes only how the index is searched, so one index serves every combination
          sweeps=("eval.modes", "eval.k", "eval.max_queries", "search.fusion", "search.rerank",
                  "store.search_params"))


def index_corpus(cfg, uri: str, corpus: Path) -> dict:
    """Index exactly corpus.jsonl (not the queries beside it); the index job's summary."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.jsonl").symlink_to(corpus.resolve())
        return run_index(OmegaConf.merge(cfg, {"corpus": {"path": tmp}}), uri)


def score(cfg, client, embedder: Embedder, queries: dict, qrels: dict) -> dict:
    """Metrics per mode for one configuration's search-time settings, and the paired tests between modes."""
    retriever = Retriever.from_config(client, cfg.store.collection, embedder.encode, cfg)
    asked = {q: queries[q] for q in list(queries)[: cfg.eval.max_queries or None]}
    judged = {q: qrels[q] for q in asked}
    ranked = {mode: ranked_documents(retriever, asked, mode, cfg.eval.k, cfg.eval.batch_size)
              for mode in cfg.eval.modes}
    return {"queries": len(asked), "metrics": {mode: retrieval_metrics(r, judged) for mode, r in ranked.items()},
            "significance": significance(ranked, judged) if len(ranked) > 1 else {}}


def fusion_candidates(e) -> list[dict]:
    return ([{"method": "weighted", "dense_weight": float(w)} for w in e.dense_weights] +
            [{"method": "rrf", "rrf_k": int(k)} for k in e.rrf_ks])


def tune_fusion(cfg, client, embedder: Embedder, queries: dict, qrels: dict) -> dict:
    """Each candidate's hybrid nDCG@10 on the dev queries, and every mode scored on the test queries with the best."""
    dev, test = split_dev(list(queries)[: cfg.eval.max_queries or None], cfg.eval.dev_fraction)
    if not dev or not test:
        raise ConfigError(f"eval.dev_fraction={cfg.eval.dev_fraction} leaves {len(dev)} dev and {len(test)} test "
                          "queries; both need some")
    tried, cfg = [], OmegaConf.merge(cfg)  # a copy: only the candidates count, not a collection's own fusion
    OmegaConf.set_readonly(cfg, False)
    cfg.search.collection_fusion = {}
    asked = {q: queries[q] for q in dev}
    vectors = dict(zip(asked.values(), embedder.encode(list(asked.values()))))  # once, not once per candidate
    for fusion in fusion_candidates(cfg.eval):
        retriever = Retriever.from_config(client, cfg.store.collection, lambda texts: [vectors[t] for t in texts],
                                          OmegaConf.merge(cfg, {"search": {"fusion": fusion}}))
        ranked = ranked_documents(retriever, asked, "hybrid", cfg.eval.k, cfg.eval.batch_size)
        tried.append({**fusion, "dev_ndcg@10": retrieval_metrics(ranked, {q: qrels[q] for q in dev})["ndcg@10"]})
    best = max(tried, key=lambda t: t["dev_ndcg@10"])
    chosen = {k: v for k, v in best.items() if k != "dev_ndcg@10"}
    tuned = OmegaConf.merge(cfg, {"search": {"fusion": chosen}, "eval": {"max_queries": 0}})
    report = score(tuned, client, embedder, {q: queries[q] for q in test}, qrels)
    return {**report, "fusion": {"dev_queries": len(dev), "test_queries": len(test), "candidates": tried,
                                 "chosen": chosen,
                                 "overrides": " ".join(f"search.fusion.{k}={v}" for k, v in chosen.items()),
                                 "collection_override": "+search.collection_fusion.COLLECTION={" +
                                 ", ".join(f"{k}: {v}" for k, v in chosen.items()) + "}"}}


def format_table(report: dict) -> str:
    metrics = report["metrics"]
    names = list(next(iter(metrics.values())))
    lines = [f"{report['dataset']}: {report['queries']} queries, {report['documents']} documents, "
             f"{report['chunks']} chunks", "mode    " + "".join(f"{n:>11}" for n in names)]
    lines += [f"{mode:<8}" + "".join(f"{m[n]:>11.4f}" for n in names) for mode, m in metrics.items()]
    if "hybrid" in metrics and len(metrics) > 1:
        ndcg, p = metrics["hybrid"]["ndcg@10"], report["significance"]["hybrid"]
        lines.append("hybrid vs " + ", ".join(f"{other}: nDCG@10 {ndcg - metrics[other]['ndcg@10']:+.4f} "
                                             f"(p={p[other]['ndcg@10']:.3f})" for other in p))
    if "fusion" in report:
        f = report["fusion"]
        lines[:0] = [f"fusion chosen on {f['dev_queries']} dev queries by nDCG@10: {f['overrides']} (for one "
                     f"collection: {f['collection_override']}); scored below on the other {f['test_queries']}"]
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
        counts = {"dataset": str(cfg.eval.dataset), "documents": summary["documents_read"],
                  "chunks": summary["rows_after"]}
        try:
            if cfg.eval.tune_fusion:
                if len(runs) > 1:
                    raise ConfigError("eval.tune_fusion=true chooses the fusion itself; run it without -m")
                reports = [{**counts, "overrides": [], **tune_fusion(cfg, client, embedder, queries, qrels)}]
            else:
                reports = [{**counts, "overrides": swept, **score(run_cfg, client, embedder, queries, qrels)}
                           for swept, run_cfg in runs]
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
