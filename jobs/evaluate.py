"""The decision matrix, measured: base, base + RAG, tuned, tuned + RAG on the same held-out questions.

    python -m jobs.evaluate evaluate.qa=DIR adapter=rag_json@production [evaluate.split=test]
        [evaluate.arms=[base,base+rag,tuned,tuned+rag,rag_json@3+rag]] [evaluate.max_questions=200]

Every arm answers every question through the prompt (tandem/prompts.py), retriever and generation code the app
serves with; an arm without RAG gets the same instructions and no passages. Per arm and per question kind: exact
match, token F1 and "contains the reference"; format validity; citation precision and recall; groundedness;
abstention on unanswerable questions; retrieval recall@k; latency and tokens. Differences between arms carry
paired bootstrap 95% intervals, and the verdict claims only the real ones. Printed as a table, written as JSON
(with every answer beside it) and logged as an MLflow run.
"""

from __future__ import annotations

import json
import sys

from tandem.adapters import verify_adapter
from tandem.answers import Reply, comparisons, score_answer, summarize, verdict
from tandem.commandline import Job, run
from tandem.config import require
from tandem.errors import ConfigError
from tandem.generation import Generated, generate_replies
from tandem.models import load_for_inference, load_tokenizer, prepare_base
from tandem.prompts import rag_messages
from tandem.qa import load_qa, passages_for, pick
from tandem.registry import Registry
from tandem.runtime import write_json

JOB = Job("evaluate", __doc__, ("evaluate", "search.rrf_k", "store.uri", "model", "mlflow", "embedder.model", "ray"),
          shorthands={"adapter": "evaluate.adapter"})
COLUMNS = ("contains", "exact", "f1", "valid", "citation_precision", "citation_recall", "grounded", "abstained",
           "retrieved_gold")


def parse_arm(arm: str, tuned: str | None) -> tuple[str | None, bool]:
    """`tuned+rag` -> (the tuned adapter's ref, True); `base` -> (None, False); `name@3+rag` -> ("name@3", True)."""
    model, rag = arm.removesuffix("+rag"), arm.endswith("+rag")
    if model == "base":
        return None, rag
    if model == "tuned":
        if not tuned:
            raise ConfigError(f"arm {arm!r} needs evaluate.adapter=NAME@ALIAS|VERSION (adapter=... for short)")
        return tuned, rag
    if "@" not in model:
        raise ConfigError(f"arm {arm!r}: expected base, tuned or NAME@VERSION, each optionally +rag")
    return model, rag


def answer(cfg, arms: list[str], questions: list[dict], passages: list[list[dict]]) -> dict[str, list[Generated]]:
    """Each arm's answers: one base model, each adapter loaded beside it, the base arms with adapters disabled."""
    import contextlib

    from peft import PeftModel

    e = cfg.evaluate
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    tokenizer = load_tokenizer(base)
    model = load_for_inference(base.path)
    registry = Registry.from_config(cfg) if any(parse_arm(a, e.adapter)[0] for a in arms) else None
    out = {}
    for arm in arms:
        ref, rag = parse_arm(arm, e.adapter)
        if ref is not None:
            path = registry.download(ref)
            verify_adapter(path, base.sha256)
            if not isinstance(model, PeftModel):
                model = PeftModel.from_pretrained(model, str(path), adapter_name=ref).eval()
            elif ref not in model.peft_config:
                model.load_adapter(str(path), adapter_name=ref)
            model.set_adapter(ref)
        prompts = [rag_messages(q["question"], [p["text"] for p in ps] if rag else [])
                   for q, ps in zip(questions, passages)]
        without = model.disable_adapter() if ref is None and isinstance(model, PeftModel) else contextlib.nullcontext()
        with without:
            out[arm] = generate_replies(model, tokenizer, prompts, e.max_new_tokens, e.batch_size)
    return out


def summary(scores: list[dict], generated: list[Generated], questions: list[dict], kinds: list[str]) -> dict:
    """One arm: its metrics over all questions and per kind, and its mean latency and tokens."""
    by_kind = {k: summarize([s for s, q in zip(scores, questions) if q["kind"] == k]) for k in kinds}
    return {"all": summarize(scores), "by_kind": by_kind,
            **{key: round(sum(getattr(g, key) for g in generated) / len(generated), 1)
               for key in ("latency_ms", "prompt_tokens", "completion_tokens")}}


def format_table(report: dict) -> str:
    width = max(len(a) for a in report["arms"]) + 2
    lines = [f"{report['qa']} [{report['split']}]: {report['questions']} questions "
             f"({', '.join(f'{k} {n}' for k, n in report['kinds'].items())})",
             f"{'arm':<{width}}" + "".join(f"{c[:10]:>11}" for c in (*COLUMNS, "latency_ms", "tokens"))]
    for arm, s in report["arms"].items():
        cells = [f"{s['all'][c]['mean']:>11.3f}" if c in s["all"] else f"{'-':>11}" for c in COLUMNS]
        lines.append(f"{arm:<{width}}" + "".join(cells) + f"{s['latency_ms']:>11.0f}{s['completion_tokens']:>11.1f}")
    return "\n".join(lines + [""] + report["verdict"])


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    e = cfg.evaluate
    require(e.qa, "evaluate.qa")
    arms = list(e.arms)
    # each arm's passages, or none; a bad arm fails here, before anything is indexed or loaded
    rag = {arm: parse_arm(arm, e.adapter)[1] for arm in arms}
    questions = pick(load_qa(e.qa, e.split), e.max_questions)
    if not questions:
        raise ConfigError(f"{e.qa} has no questions in split {e.split!r}")
    passages = passages_for(cfg, e.qa, questions, e.collection, e.k, e.mode) \
        if any(rag.values()) else [[] for _ in questions]
    generated = answer(cfg, arms, questions, passages)
    scores = {arm: [score_answer(Reply.parse(g.text), q["answers"], q["gold_docs"], ps if rag[arm] else [])
                    for q, ps, g in zip(questions, passages, gs)] for arm, gs in generated.items()}
    kinds = sorted({q["kind"] for q in questions})
    summaries = {arm: summary(scores[arm], generated[arm], questions, kinds) for arm in arms}
    compared = comparisons(scores, e.bootstrap)
    report = {"qa": str(e.qa), "split": e.split, "adapter": e.adapter, "questions": len(questions),
              "kinds": {k: sum(q["kind"] == k for q in questions) for k in kinds}, "k": e.k, "mode": e.mode,
              "arms": summaries, "comparisons": compared, "verdict": verdict({a: s["all"] for a, s in
                                                                              summaries.items()}, compared)}
    print(format_table(report))
    out = write_json(e.output, report)
    answers = out.with_suffix(".answers.jsonl")
    answers.write_text("".join(
        json.dumps({"arm": arm, "id": q["id"], "kind": q["kind"], "question": q["question"], "references": q["answers"],
                    "passages": [p["doc_id"] for p in ps] if rag[arm] else [], "reply": g.text,
                    "scores": s, "latency_ms": g.latency_ms, "completion_tokens": g.completion_tokens},
                   ensure_ascii=False) + "\n"
        for arm in arms for q, ps, g, s in zip(questions, passages, generated[arm], scores[arm])))
    registry = Registry.from_config(cfg)
    run_id = registry.start_run(f"evaluate-{e.split}", {"qa": str(e.qa), "split": e.split, "arms": arms,
                                                        "adapter": e.adapter, "questions": len(questions)},
                                {"kind": "evaluation"})
    # MLflow metric names allow no `+`: base+rag.contains is logged as base_rag.contains
    registry.log_metrics(run_id, {f"{arm.replace('+', '_')}.{key}": v["mean"] for arm, s in summaries.items()
                                  for key, v in s["all"].items()}, 0)
    registry.end_run(run_id)
    print(f"report written to {out}, every answer to {answers}")
    return report


if __name__ == "__main__":
    run(main)
