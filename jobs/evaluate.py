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

`evaluate.calibrate=true` (on `evaluate.split=dev`) calibrates the adapter's abstention instead: tuned + RAG answers
undecided, each answer scored by the probability it gave abstaining, and the adapter version is tagged with the
threshold above which abstaining answers the most questions right, where that is significantly more than greedy
decoding answers (tandem/abstention.py); the threshold may drop with each question's top passage score, where that
answers more questions right. From then on its arms with RAG, `jobs.validate` and the app's RAG routes abstain
wherever the model gives abstaining that probability. With `evaluate.min_abstention=0.8` the threshold is instead the
one answering the most answerable questions right among those abstaining on at least 0.8 of the unanswerable dev
questions: the user's operating point.

`evaluate.freshness=N` also changes N facts in the QA set's documents, re-indexes just those documents into a
collection of its own and asks every arm again (tandem/freshness.py): the arms with RAG should give the new fact.
"""

from __future__ import annotations

import json
import sys

from tandem.abstention import calibrate, threshold_tag
from tandem.answers import Reply, served_grounding
from tandem.arms import parse_arm, run_matrix
from tandem.commandline import Job, run
from tandem.config import RANKING_KEYS, require
from tandem.errors import ConfigError
from tandem.freshness import check_freshness, freshness_lines
from tandem.registry import Registry
from tandem.runtime import write_json

JOB = Job("evaluate", __doc__, ("evaluate", *RANKING_KEYS, "store.uri", "model", "mlflow", "embedder.model", "ray"),
          shorthands={"adapter": "evaluate.adapter"})
CALIBRATED = "tuned+rag"  # the arm whose abstention `evaluate.calibrate` calibrates: what the RAG routes serve
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
    lines += [f"{arm} abstains where it gives abstaining at least {rule_text(s['abstain_threshold'])} (its adapter "
              f"version's calibration for {report['collection']})" for arm, s in report["arms"].items()
              if s.get("abstain_threshold") is not None]
    fresh = freshness_lines(report["freshness"]) if "freshness" in report else []
    return "\n".join(lines + [""] + report["verdict"] + fresh)


def rule_text(rule: dict) -> str:
    """{"threshold": 0.1578} -> 0.1578; with a retrieval weight, how it moves with the top passage's score; with
    min_grounded, the answers it withholds."""
    text = f"{rule['threshold']:.4f}" if "retrieval_weight" not in rule else \
        f"σ(logit {rule['threshold']:.4f} + {rule['retrieval_weight']:.1f}·(s − {rule['top_score']:.4f})) at top " \
        f"passage score s ({rule['mode']})"
    if "min_grounded" in rule:
        text += f", withholding answers whose cited passages hold under {rule['min_grounded']:.0%} of their words"
    return text


def calibrate_abstention(cfg, registry: Registry, matrix) -> dict:
    """The tuned + RAG arm's answers -> the adapter version's abstention threshold, tagged on it (or removed where
    none does significantly better than greedy decoding), with the curve it was picked from. The threshold may move
    with each question's top passage score (tandem/abstention.py)."""
    generated, scores = matrix.generated[CALIBRATED], matrix.scores[CALIBRATED]
    if any(s["answerable"] and "contains" not in s for s in scores):
        raise ConfigError(f"evaluate.qa={cfg.evaluate.qa}: calibration scores answers against reference answers; "
                          "this set's questions are answered by whole documents (use a span QA set such as wiki_qa)")
    top_scores = [ps[0]["score"] for ps in matrix.passages] if all(matrix.passages) else None
    grounded = [served_grounding(g.text, [p["text"] for p in ps]) for g, ps in zip(generated, matrix.passages)]
    found = calibrate([g.abstain_score for g in generated], [Reply.parse(g.text).abstained for g in generated],
                      [s["contains"] if s["answerable"] else None for s in scores], cfg.evaluate.bootstrap, top_scores,
                      cfg.evaluate.min_abstention, grounded)
    rule = found.rule(cfg.evaluate.mode)
    version = registry.resolve(cfg.evaluate.adapter)
    tag = threshold_tag(cfg.evaluate.collection)
    if rule is None:
        if tag in version.tags:
            registry.client.delete_model_version_tag(version.name, version.version, tag)
    else:
        registry.client.set_model_version_tag(version.name, version.version, tag, rule.tag())
    greedy, best = found.greedy, found.best
    return {"adapter": f"{version.name}@{version.version}", "threshold": rule and rule.to_dict(),
            "collection": cfg.evaluate.collection, "split": cfg.evaluate.split, "best": best[0],
            "retrieval_weight": found.retrieval_weight, "top_score": found.top_score,
            "min_grounded": found.min_grounded, "min_abstention": found.min_abstention, "gain": found.gain,
            "right": {"greedy": round(greedy[0], 4), "one_threshold": round(found.single, 4),
                      "best": round(best[1], 4)},
            "abstained": {"greedy": greedy[1], "best": best[2]},
            "curve": [{"threshold": t, "right": round(r, 4), "abstained": a} for t, r, a in found.curve]}


def calibration_lines(c: dict) -> list[str]:
    def share(x):
        return "-" if x is None else f"{x:.2f}"

    gain = c["gain"]
    told = f"abstention threshold {rule_text(c['threshold'])} recorded on {c['adapter']} for {c['collection']}" \
        if c["threshold"] is not None else ("no threshold answers significantly more questions right than greedy "
                                            f"decoding: none on {c['adapter']} for {c['collection']}")
    best = "-" if c["best"] is None else f"{c['best']:.4f}"
    if c["min_abstention"] is not None:
        best += f", abstaining on at least {c['min_abstention']:.2f} of the unanswerable"
    return ["", f"calibration on the {c['split']} split: {told}",
            f"  answered right: greedy {c['right']['greedy']:.3f}, at one threshold for every question "
            f"{c['right']['one_threshold']:.3f}, at the best threshold ({best}, retrieval weight "
            f"{c['retrieval_weight']:.1f}) {c['right']['best']:.3f} ({gain['delta']:+.3f} on greedy, 95% CI "
            f"{gain['low']:+.3f}..{gain['high']:+.3f}); "
            f"abstained on unanswerable: greedy {share(c['abstained']['greedy'])}, at the best threshold "
            f"{share(c['abstained']['best'])}"]


def metric_name(arm: str) -> str:
    """MLflow metric names allow neither `+` nor `@`: base+rag is logged as base_rag, grounded_qa@1+rag as
    grounded_qa:1_rag."""
    return arm.replace("+", "_").replace("@", ":")


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    e = cfg.evaluate
    require(e.qa, "evaluate.qa")
    if e.calibrate:
        require(e.adapter, "evaluate.adapter")
    elif e.min_abstention is not None:
        raise ConfigError(f"evaluate.min_abstention={e.min_abstention} picks a calibrated threshold: it needs "
                          "evaluate.calibrate=true")
    arms = [CALIBRATED] if e.calibrate else list(e.arms)
    if e.freshness and not any(parse_arm(arm, e.adapter).rag for arm in arms):
        raise ConfigError(f"evaluate.freshness={e.freshness} changes facts in what the arms with RAG search; "
                          f"evaluate.arms={arms} has none (add base+rag or tuned+rag)")
    registry = Registry.from_config(cfg)
    matrix = run_matrix(cfg, arms)
    report = matrix.report
    if e.calibrate:
        report["calibration"] = calibrate_abstention(cfg, registry, matrix)
    if e.freshness:
        report["freshness"] = check_freshness(cfg, arms, matrix.models)
    print(format_table(report) + "\n".join(calibration_lines(report["calibration"]) if e.calibrate else []))
    out = write_json(e.output, report)
    answers = out.with_suffix(".answers.jsonl")
    answers.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in matrix.answer_rows()))
    run_id = registry.start_run(f"evaluate-{e.split}", {"qa": str(e.qa), "split": e.split, "arms": arms,
                                                        "adapter": e.adapter, "questions": report["questions"]},
                                {"kind": "evaluation"})
    metrics = {f"{metric_name(arm)}.{key}": v["mean"] for arm, s in report["arms"].items()
               for key, v in s["all"].items()}
    metrics |= {f"freshness.{metric_name(arm)}.{key}": v
                for arm, s in report.get("freshness", {}).get("arms", {}).items() for key, v in s.items()}
    registry.log_metrics(run_id, metrics, 0)
    registry.end_run(run_id)
    print(f"report written to {out}, every answer to {answers}")
    return report


if __name__ == "__main__":
    run(main)
