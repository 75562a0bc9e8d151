"""Model validation gates for an adapter version: it keeps its general ability and learns the task.

    python -m jobs.validate adapter=NAME@VERSION|NAME@candidate

- Retention: perplexity of base+adapter vs base on held-out Wikipedia summaries; fails above validate.max_ppl_ratio.
- Task: the dataset's eval split, base vs tuned: share of outputs in the exact JSON shape, answer overlap, sources;
  fails below validate.min_task_valid or when the tuned model is not better than the base.
- Quantization report: measured weight memory of the base in fp32 / bf16 / int8 / nf4.
Passing sets the `validated` alias; either way the metrics and reasons are tagged on the version and logged as an
MLflow run.
"""

from __future__ import annotations

import json
import sys

from tandem.adapters import verify_adapter
from tandem.commandline import Job, run
from tandem.config import require
from tandem.data.dataset_store import DatasetStore
from tandem.datasets import wiki_source
from tandem.evaluation import perplexity, rag_json_scores
from tandem.generation import generate_chat
from tandem.models import load_for_inference, load_tokenizer, prepare_base, quantization_report
from tandem.registry import Registry
from tandem.runtime import write_json

JOB = Job("validate", __doc__, ("validate", "model", "dataset.root", "mlflow"),
          shorthands={"adapter": "validate.adapter"})


def retention_texts(train_rows: list[dict], n: int) -> list[str]:
    """Summaries from the end of the list that no training row quotes."""
    seen = "\n".join(m["content"] for r in train_rows for m in r["messages"])
    items = list(json.loads(wiki_source().read_text()).values())
    return [v["extract"] for v in reversed(items) if v["extract"][:80] not in seen][:n]


def gates(cfg, retention: dict, task: dict) -> list[str]:
    v = cfg.validate
    reasons = []
    if retention["ratio"] > v.max_ppl_ratio:
        reasons.append(f"retention: perplexity ratio {retention['ratio']:.3f} > {v.max_ppl_ratio}")
    if task["tuned"]["valid"] < v.min_task_valid:
        reasons.append(f"task: {task['tuned']['valid']:.2%} valid outputs < {v.min_task_valid:.0%}")
    if task["tuned"]["valid"] <= task["base"]["valid"] and task["tuned"]["answer_f1"] <= task["base"]["answer_f1"]:
        reasons.append("task: the tuned model is not better than the base")
    return reasons


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    ref = require(cfg.validate.adapter, "validate.adapter")
    if cfg.validate.task != "rag_json":
        raise SystemExit(f"error: validate.task={cfg.validate.task}; only rag_json is defined")
    registry = Registry.from_config(cfg)
    version = registry.resolve(ref)
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    adapter_dir = registry.download(ref)
    verify_adapter(adapter_dir, base.sha256)
    dataset = DatasetStore(cfg.dataset.root).resolve(version.tags["dataset"])
    tokenizer = load_tokenizer(base)
    model = load_for_inference(base.path, adapter_dir)

    texts = retention_texts(dataset.rows(), cfg.validate.retention_docs)
    with model.disable_adapter():
        ppl_base = perplexity(model, tokenizer, texts)
    ppl_tuned = perplexity(model, tokenizer, texts)
    retention = {"docs": len(texts), "base": round(ppl_base, 3), "tuned": round(ppl_tuned, 3),
                 "ratio": round(ppl_tuned / ppl_base, 4)}

    rows = dataset.rows("eval")[: cfg.validate.max_eval_rows]
    prompts = [r["messages"][:-1] for r in rows]
    references = [r["messages"][-1]["content"] for r in rows]
    v = cfg.validate
    with model.disable_adapter():
        base_out = generate_chat(model, tokenizer, prompts, v.max_new_tokens, v.batch_size)
    tuned_out = generate_chat(model, tokenizer, prompts, v.max_new_tokens, v.batch_size)
    task = {"rows": len(rows), "base": rag_json_scores(base_out, references),
            "tuned": rag_json_scores(tuned_out, references), "examples": tuned_out[:3]}

    reasons = gates(cfg, retention, task) if rows else ["task: the dataset has no eval rows"]
    name, number = version.name, version.version
    summary = {"adapter": f"{name}@{number}", "dataset": dataset.ref, "passed": not reasons, "reasons": reasons,
               "retention": retention, "task": {k: task[k] for k in ("rows", "base", "tuned")}}
    registry.client.set_model_version_tag(name, number, "validation", json.dumps(summary))
    run_id = registry.start_run(f"validate-{name}-{number}", {"adapter": summary["adapter"], "dataset": dataset.ref},
                                {"kind": "validation", "passed": summary["passed"]})
    registry.log_metrics(run_id, {"ppl_ratio": retention["ratio"], "tuned_valid": task["tuned"]["valid"],
                                  "base_valid": task["base"]["valid"], "tuned_f1": task["tuned"]["answer_f1"]}, 0)
    registry.end_run(run_id)
    if summary["passed"]:
        registry.set_alias(name, "validated", number, reason="passed validation")
    report = {**summary, "task": task, "quantization_mb": quantization_report(base.path)}
    print(json.dumps({**summary, "quantization_mb": report["quantization_mb"]}, indent=2))
    print(f"report written to {write_json(cfg.validate.report, report)}")
    return report


if __name__ == "__main__":
    run(main)
