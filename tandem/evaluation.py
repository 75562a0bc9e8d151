"""Evaluation: retrieval on BEIR-format data (recall@k, MRR@10, nDCG@10 at document level), and model checks
(perplexity on general text, for retention)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from tandem.errors import ConfigError


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


def retrieval_metrics(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], ks=(1, 5, 10)) -> dict:
    totals = {f"recall@{k}": 0.0 for k in ks} | {"mrr@10": 0.0, "ndcg@10": 0.0}
    for qid, rel in qrels.items():
        docs = ranked.get(qid, [])
        for k in ks:
            totals[f"recall@{k}"] += len(set(docs[:k]) & set(rel)) / len(rel)
        totals["mrr@10"] += next((1.0 / (i + 1) for i, d in enumerate(docs[:10]) if d in rel), 0.0)
        dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(docs[:10]))
        ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(rel.values(), reverse=True)[:10]))
        totals["ndcg@10"] += dcg / ideal if ideal else 0.0
    n = max(len(qrels), 1)
    return {k: round(v / n, 4) for k, v in totals.items()}


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
