"""The decision matrix, measured: base, base + RAG, tuned, tuned + RAG on the same held-out questions.

    python -m jobs.evaluate evaluate.qa=DIR adapter=grounded_qa@production [evaluate.split=test]
        [evaluate.arms=[base,base+rag,tuned,tuned+rag,grounded_qa@3+rag]] [evaluate.max_questions=200]
        [evaluate.freshness=20]

Every arm answers every question through the prompt (tandem/prompts.py), retriever and generation code the app
serves with; an arm without RAG gets the same instructions and no passages. Per arm and per question kind: exact
match, token F1 and "contains the reference"; format validity; citation precision and recall; groundedness;
abstention on unanswerable questions; retrieval recall@k; latency and tokens. Differences between arms carry
paired bootstrap 95% intervals, and the verdict claims only the real ones. Printed as a table, written as JSON
(with every answer beside it) and logged as an MLflow run.

`evaluate.freshness=N` also changes N facts in the QA set's documents, re-indexes just those documents into a
collection of its own and asks every arm again (tandem/freshness.py): the arms with RAG should give the new fact.
"""

from __future__ import annotations

import json
import sys

from tandem.arms import run_matrix
from tandem.commandline import Job, run
from tandem.config import RANKING_KEYS, require
from tandem.freshness import check_freshness, freshness_lines
from tandem.registry import Registry
from tandem.runtime import write_json

JOB = Job("evaluate", __doc__, ("evaluate", *RANKING_KEYS, "store.uri", "model", "mlflow", "embedder.model", "ray"),
          shorthands={"adapter": "evaluate.adapter"})
COLUMNS = ("contains", "exact", "f1", "valid", "citation_precision", "citation_recall", "grounded", "abstained",
           "retrieved_gold")


def format_table(report: dict) -> str:
    width = max(len(a) for a in report["arms"]) + 2
    lines = [f"{report['qa']} [{report['split']}]: {report['questions']} questions "
             f"({', '.join(f'{k} {n}' for k, n in report['kinds'].items())})",
             f"{'arm':<{width}}" + "".join(f"{c[:10]:>11}" for c in (*COLUMNS, "latency_ms", "tokens"))]
    for arm, s in report["arms"].items():
        cells = [f"{s['all'][c]['mean']:>11.3f}" if c in s["all"] else f"{'-':>11}" for c in COLUMNS]
        lines.append(f"{arm:<{width}}" + "".join(cells) + f"{s['latency_ms']:>11.0f}{s['completion_tokens']:>11.1f}")
    fresh = freshness_lines(report["freshness"]) if "freshness" in report else []
    return "\n".join(lines + [""] + report["verdict"] + fresh)


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    e = cfg.evaluate
    require(e.qa, "evaluate.qa")
    matrix = run_matrix(cfg, list(e.arms))
    report = matrix.report
    if e.freshness:
        report["freshness"] = check_freshness(cfg, list(e.arms), matrix.models)
    print(format_table(report))
    out = write_json(e.output, report)
    answers = out.with_suffix(".answers.jsonl")
    answers.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in matrix.answer_rows()))
    registry = Registry.from_config(cfg)
    run_id = registry.start_run(f"evaluate-{e.split}", {"qa": str(e.qa), "split": e.split, "arms": list(e.arms),
                                                        "adapter": e.adapter, "questions": report["questions"]},
                                {"kind": "evaluation"})
    # MLflow metric names allow no `+`: base+rag.contains is logged as base_rag.contains
    metrics = {f"{arm.replace('+', '_')}.{key}": v["mean"] for arm, s in report["arms"].items()
               for key, v in s["all"].items()}
    metrics |= {f"freshness.{arm.replace('+', '_')}.{key}": v
                for arm, s in report.get("freshness", {}).get("arms", {}).items() for key, v in s.items()}
    registry.log_metrics(run_id, metrics, 0)
    registry.end_run(run_id)
    print(f"report written to {out}, every answer to {answers}")
    return report


if __name__ == "__main__":
    run(main)
