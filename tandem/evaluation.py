"""Evaluation: retrieval on BEIR-format data (recall@k, MRR@10, nDCG@10 at document level, with ranx's metrics and
significance tests), and model checks (perplexity on general text, for retention)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from tandem.errors import ConfigError
from tandem.splits import position

METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


def load_beir(root: str | Path, split: str = "test") -> tuple[Path, dict[str, str], dict[str, dict[str, int]]]:
    """(corpus.jsonl path, query id -> text, query id -> {doc id: relevance}) for the queries that have qrels."""
    root = Path(root)
    corpus, qfile, qrels_file = root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"
    for p in (corpus, qfile, qrels_file):
        if not p.is_file():
            raise ConfigError(f"{p} is missing (BEIR: corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    qrels: dict[str, dict[str, int]] = {}
    with qrels_file.open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if int(row["score"]) > 0:
                qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    queries = {}
    for line in qfile.read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            if q["_id"] in qrels:
                queries[q["_id"]] = q["text"]
    return corpus, queries, qrels


def dedupe_docs(doc_ids: list[str]) -> list[str]:
    """Chunks -> documents, keeping each document at its best rank."""
    return list(dict.fromkeys(doc_ids))


def ranked_documents(retriever, queries: dict[str, str], mode: str, k: int, batch_size: int) -> dict[str, list[str]]:
    """Query id -> its top-k documents, best first: chunks searched 3k deep, each document kept at its best rank."""
    qids, ranked = list(queries), {}
    for i in range(0, len(qids), batch_size):
        batch = qids[i : i + batch_size]
        hits = retriever.search([queries[q] for q in batch], k=3 * k, mode=mode)
        ranked.update({q: dedupe_docs([h.doc_id for h in hs])[:k] for q, hs in zip(batch, hits)})
    return ranked


def _run(ranked: dict[str, list[str]], name: str):
    from ranx import Run

    # ranx ranks by score: a rank's reciprocal keeps the order; queries with no documents are left to make_comparable
    return Run({q: {d: 1.0 / (i + 1) for i, d in enumerate(docs)} for q, docs in ranked.items() if docs}, name=name)


def retrieval_metrics(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], metrics=METRICS) -> dict:
    """ranx's metrics over the queries in `qrels`; a query missing from `ranked` scores 0."""
    from ranx import Qrels, evaluate

    scores = evaluate(Qrels(qrels), _run(ranked, "run"), list(metrics), make_comparable=True)
    return {m: round(float(scores[m]), 4) for m in metrics}


def significance(ranked: dict[str, dict[str, list[str]]], qrels: dict[str, dict[str, int]], metrics=METRICS,
                 max_p: float = 0.05) -> dict:
    """ranx's paired Fisher randomization test between every two runs: run -> other -> metric -> p-value, so a
    difference is claimed only where p < max_p."""
    from ranx import Qrels, compare

    report = compare(Qrels(qrels), [_run(r, name) for name, r in ranked.items()], list(metrics),
                     stat_test="fisher", max_p=max_p, make_comparable=True).to_dict()
    return {name: {other: {m: round(float(p), 4) for m, p in ps.items()}
                   for other, ps in report[name]["comparisons"].items()} for name in ranked}


def split_dev(qids: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(dev, test): a query is in dev when its id's hash falls under `fraction`, so the split never moves when
    queries are added or reordered."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"eval.dev_fraction must be within (0, 1), got {fraction}")
    dev = {q for q in qids if position(q) < fraction}
    return [q for q in qids if q in dev], [q for q in qids if q not in dev]


def perplexity(model, tokenizer, texts: list[str], max_length: int = 256) -> float:
    """exp of the mean token negative log-likelihood over the texts."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            ids = ids.to(model.device)
            loss = model(input_ids=ids, labels=ids).loss
            nll += loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))
