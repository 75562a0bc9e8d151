"""Model validation gates for an adapter version: it keeps its general ability and answers right on questions it was
never trained on.

    python -m jobs.validate adapter=NAME@VERSION|NAME@candidate [validate.max_questions=60]

- Retention: perplexity of base+adapter vs base on held-out Wikipedia summaries; fails above validate.max_ppl_ratio.
- Answers: base + RAG and tuned + RAG answer the same questions of the fixed test split of evaluate.qa (split by
  document, so no test fact was trained on; never the eval split of the dataset being validated, which its own
  traffic may have shaped), scored as `jobs.evaluate` scores them; tuned + RAG abstains by the version's calibrated
  threshold for evaluate.collection, if it has one (tandem/abstention.py), as the app will serve it. Fails when
  tuned + RAG falls below validate.min_valid (format), min_contains (correctness), min_citation_precision or
  min_abstained (on unanswerable questions), or is not better than base + RAG.
- Quantization report: measured weight memory of the base in fp32 / bf16 / int8 / nf4.
Passing sets the `validated` alias; either way the metrics and reasons are tagged on the version and logged as an
MLflow run.
"""

from __future__ import annotations

import json
import sys

from omegaconf import OmegaConf

from tandem.arms import Models, run_matrix
from tandem.commandline import Job, run
from tandem.config import require
from tandem.data.dataset_store import DatasetStore
from tandem.datasets import wiki_source
from tandem.evaluation import perplexity
from tandem.models import quantization_report
from tandem.registry import Registry
from tandem.runtime import write_json

JOB = Job("validate", __doc__, ("validate", "evaluate.qa", "evaluate.collection", "evaluate.k", "evaluate.mode",
                                "model", "dataset.root", "store.uri", "mlflow"),
          shorthands={"adapter": "validate.adapter"})
ARMS = ("base+rag", "tuned+rag")
# (metric of tuned + RAG, its floor in validate, what it measures)
FLOORS = (("valid", "min_valid", "format validity"), ("contains", "min_contains", "correctness (contains)"),
          ("citation_precision", "min_citation_precision", "citation precision"),
          ("abstained", "min_abstained", "abstention on unanswerable questions"))


def retention_texts(train_rows: list[dict], n: int) -> list[str]:
    """Summaries from the end of the list that no training row quotes."""
    seen = "\n".join(m["content"] for r in train_rows for m in r["messages"])
    items = list(json.loads(wiki_source().read_text()).values())
    return [v["extract"] for v in reversed(items) if v["extract"][:80] not in seen][:n]


def gates(cfg, retention: dict, answers: dict) -> list[str]:
    v = cfg.validate
    reasons = []
    if retention["ratio"] > v.max_ppl_ratio:
        reasons.append(f"retention: perplexity ratio {retention['ratio']:.3f} > {v.max_ppl_ratio}")
    tuned, base = answers["tuned+rag"]["all"], answers["base+rag"]["all"]
    for key, floor, what in FLOORS:
        if key in tuned and tuned[key]["mean"] < v[floor]:
            reasons.append(f"answers: {what} {tuned[key]['mean']:.2f} < validate.{floor}={v[floor]} "
                           f"(n={tuned[key]['n']})")
    if all(tuned.get(k, {}).get("mean", 0) <= base.get(k, {}).get("mean", 0) for k in ("valid", "contains")):
        reasons.append("answers: tuned + RAG is not better than base + RAG on format or correctness")
    return reasons


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    v = cfg.validate
    ref = require(v.adapter, "validate.adapter")
    registry = Registry.from_config(cfg)
    version = registry.resolve(ref)
    name, number = version.name, version.version
    dataset = DatasetStore(cfg.dataset.root).resolve(version.tags["dataset"])
    models = Models(cfg)

    texts = retention_texts(dataset.rows(), v.retention_docs)
    with models.use(None) as model:
        ppl_base = perplexity(model, models.tokenizer, texts)
    with models.use(f"{name}@{number}") as model:
        ppl_tuned = perplexity(model, models.tokenizer, texts)
    retention = {"docs": len(texts), "base": round(ppl_base, 3), "tuned": round(ppl_tuned, 3),
                 "ratio": round(ppl_tuned / ppl_base, 4)}

    asked = OmegaConf.merge(cfg, {"evaluate": {
        "adapter": f"{name}@{number}", "arms": list(ARMS), "split": v.split, "max_questions": v.max_questions,
        "unanswerable_share": v.unanswerable_share, "max_new_tokens": v.max_new_tokens, "batch_size": v.batch_size,
        "bootstrap": v.bootstrap}})
    matrix = run_matrix(asked, list(ARMS), models)
    answers = {arm: matrix.report["arms"][arm] for arm in ARMS}

    reasons = gates(cfg, retention, answers)
    summary = {"adapter": f"{name}@{number}", "dataset": dataset.ref, "passed": not reasons, "reasons": reasons,
               "retention": retention, "qa": {"path": str(cfg.evaluate.qa), "split": v.split,
                                              "questions": matrix.report["questions"]},
               "answers": {arm: {k: s["mean"] for k, s in a["all"].items()} for arm, a in answers.items()}}
    registry.client.set_model_version_tag(name, number, "validation", json.dumps(summary))
    run_id = registry.start_run(f"validate-{name}-{number}", {"adapter": summary["adapter"], "dataset": dataset.ref},
                                {"kind": "validation", "passed": summary["passed"]})
    registry.log_metrics(run_id, {"ppl_ratio": retention["ratio"], **{
        f"{arm.replace('+', '_')}.{k}": m for arm, a in summary["answers"].items() for k, m in a.items()}}, 0)
    registry.end_run(run_id)
    if summary["passed"]:
        registry.set_alias(name, "validated", number, reason="passed validation")
    report = {**summary, "matrix": matrix.report, "examples": matrix.answer_rows()[-3:],
              "quantization_mb": quantization_report(models.base.path)}
    print(json.dumps({**summary, "verdict": matrix.report["verdict"], "quantization_mb": report["quantization_mb"]},
                     indent=2))
    print(f"report written to {write_json(v.report, report)}")
    return report


if __name__ == "__main__":
    run(main)
