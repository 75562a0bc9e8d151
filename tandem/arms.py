"""The decision matrix's arms: one base model, with or without an adapter, with or without the retriever's passages,
answering the same questions through the prompt, retriever and generation code the app serves with.

Shared by `jobs.evaluate` (every arm, the full report) and `jobs.validate` (base + RAG against tuned + RAG on a fixed
test split, the gate an adapter passes before it may serve).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from tandem.abstention import Abstention, Threshold, abstention_tokens, thresholds
from tandem.answers import Reply, comparisons, score_answer, summarize, verdict
from tandem.errors import ConfigError
from tandem.generation import Generated, generate_replies
from tandem.prompts import answer_format, rag_messages
from tandem.qa import load_qa, passages_for, pick
from tandem.structured import Guides, response_regex


class Arm(NamedTuple):
    ref: str | None  # the adapter, None for the base alone
    rag: bool  # answers from the retriever's passages
    guided: bool  # decoding constrained to the answer's JSON shape (tandem/structured.py)


def parse_arm(arm: str, tuned: str | None) -> Arm:
    """`tuned+rag` -> the tuned adapter's ref, with passages; `base+rag+guided` -> the base, with passages, its
    decoding held to the answer's shape; `name@3` -> that adapter version, without passages."""
    model, *flags = arm.split("+")
    if any(f not in ("rag", "guided") for f in flags) or len(set(flags)) < len(flags):
        raise ConfigError(f"arm {arm!r}: expected base, tuned or NAME@VERSION, then optionally +rag and +guided")
    if model == "tuned":
        if not tuned:
            raise ConfigError(f"arm {arm!r} needs evaluate.adapter=NAME@ALIAS|VERSION (adapter=... for short)")
        model = tuned
    elif model != "base" and "@" not in model:
        raise ConfigError(f"arm {arm!r}: expected base, tuned or NAME@VERSION, then optionally +rag and +guided")
    return Arm(None if model == "base" else model, "rag" in flags, "guided" in flags)


class Models:
    """One base model and the registry's adapters loaded beside it on demand, so every arm shares the weights."""

    def __init__(self, cfg):
        from tandem.models import load_for_inference, load_tokenizer, prepare_base

        self.cfg = cfg
        self.base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
        self.tokenizer = load_tokenizer(self.base)
        self.model = load_for_inference(self.base.path)
        self.guides = Guides(self.tokenizer)
        self.abstention = abstention_tokens(self.tokenizer)
        self._registry = None

    @property
    def registry(self):
        from tandem.registry import Registry

        if self._registry is None:
            self._registry = Registry.from_config(self.cfg)
        return self._registry

    def threshold(self, ref: str, collection: str) -> Threshold | None:
        """The adapter version's abstention threshold calibrated on `collection` (tandem/abstention.py), None before
        calibration there."""
        return thresholds(self.registry.resolve(ref).tags).get(collection)

    @contextlib.contextmanager
    def use(self, ref: str | None):
        """The model as the adapter `ref` (checked against the base's checksum), or as the base alone for None."""
        from peft import PeftModel

        from tandem.adapters import verify_adapter

        if ref is None:
            isolated = isinstance(self.model, PeftModel)
            with self.model.disable_adapter() if isolated else contextlib.nullcontext():
                yield self.model
            return
        if not isinstance(self.model, PeftModel) or ref not in self.model.peft_config:
            path = self.registry.download(ref)
            verify_adapter(path, self.base.sha256)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=ref)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=ref).eval()
        self.model.set_adapter(ref)
        yield self.model

    def answer(self, ref: str | None, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
               formats: list[dict] | None = None, thresholds: list[float | None] | None = None) -> list[Generated]:
        """Greedy answers, each scored for how likely it was to abstain; `formats` (a response_format per prompt)
        constrain their decoding, and `thresholds` (one per prompt) steer them to the abstention reply
        (tandem/abstention.py)."""
        guides = [self.guides.guide(response_regex(f)) for f in formats] if formats else None
        abstentions = [Abstention(self.abstention, t, self.tokenizer.eos_token_id)
                       for t in thresholds or [None] * len(prompts)]
        with self.use(ref) as model:
            return generate_replies(model, self.tokenizer, prompts, max_new_tokens, batch_size, guides, abstentions)


@dataclass
class Matrix:
    """Every arm's answers to the same questions, scored, with the report `jobs.evaluate` prints and writes."""
    questions: list[dict]
    passages: list[list[dict]]
    rag: dict[str, bool]
    generated: dict[str, list[Generated]]
    scores: dict[str, list[dict]]
    report: dict
    models: Models  # loaded, for more questions to the same arms

    def answer_rows(self) -> list[dict]:
        """Every answer beside its question, the passages it saw and its scores."""
        return [{"arm": arm, "id": q["id"], "kind": q["kind"], "question": q["question"], "references": q["answers"],
                 "passages": [p["doc_id"] for p in ps] if self.rag[arm] else [], "reply": g.text, "scores": s,
                 "latency_ms": g.latency_ms, "completion_tokens": g.completion_tokens, "abstain_score": g.abstain_score}
                for arm in self.generated
                for q, ps, g, s in zip(self.questions, self.passages, self.generated[arm], self.scores[arm])]


def arm_threshold(models: Models, cfg, arm: str) -> Threshold | None:
    """The abstention threshold an arm answers with: its adapter version's for the QA set's collection, with RAG,
    as the app's RAG routes over that collection serve it; none while that threshold is being calibrated
    (`evaluate.calibrate`)."""
    ref, rag, _ = parse_arm(arm, cfg.evaluate.adapter)
    return models.threshold(ref, cfg.evaluate.collection) if ref and rag and not cfg.evaluate.calibrate else None


def ask(models: Models, cfg, arm: str, questions: list[dict], passages: list[list[dict]]) -> list[Generated]:
    """One arm's answers; an arm without RAG gets the same instructions and no passages. Each question is answered
    with its arm's threshold at its top passage's score, and the answers its rule withholds abstain, as the app's RAG
    routes answer it."""
    ref, rag, guided = parse_arm(arm, cfg.evaluate.adapter)
    given = [ps if rag else [] for ps in passages]
    prompts = [rag_messages(q["question"], [p["text"] for p in ps]) for q, ps in zip(questions, given)]
    formats = [answer_format(len(ps)) for ps in given] if guided else None
    rule = arm_threshold(models, cfg, arm)
    taus = [rule.at(ps[0]["score"] if ps else None, cfg.evaluate.mode) for ps in given] if rule else None
    generated = models.answer(ref, prompts, cfg.evaluate.max_new_tokens, cfg.evaluate.batch_size, formats, taus)
    if rule is None:
        return generated
    return [replace(g, text=rule.reply(g.text, [p["text"] for p in ps])) for g, ps in zip(generated, given)]


def summary(scores: list[dict], generated: list[Generated], questions: list[dict], kinds: list[str],
            threshold: Threshold | None) -> dict:
    """One arm: its metrics over all questions and per kind, its abstention threshold, mean latency and tokens."""
    by_kind = {k: summarize([s for s, q in zip(scores, questions) if q["kind"] == k]) for k in kinds}
    return {"all": summarize(scores), "by_kind": by_kind, "abstain_threshold": threshold and threshold.to_dict(),
            **{key: round(sum(getattr(g, key) for g in generated) / len(generated), 1)
               for key in ("latency_ms", "prompt_tokens", "completion_tokens")}}


def run_matrix(cfg, arms: list[str], models: Models | None = None) -> Matrix:
    """Each arm answers `evaluate.max_questions` questions of `evaluate.split` in `evaluate.qa`, scored per arm,
    compared pairwise with bootstrap intervals and summed up in a verdict. A bad arm fails before anything loads."""
    e = cfg.evaluate
    rag = {arm: parse_arm(arm, e.adapter).rag for arm in arms}
    questions = pick(load_qa(e.qa, e.split), e.max_questions, e.unanswerable_share)
    if not questions:
        raise ConfigError(f"{e.qa} has no questions in split {e.split!r}")
    passages = passages_for(cfg, [Path(e.qa) / "corpus"], questions, e.collection, e.k, e.mode) \
        if any(rag.values()) else [[] for _ in questions]
    models = models or Models(cfg)
    rules = {arm: arm_threshold(models, cfg, arm) for arm in arms}
    generated = {arm: ask(models, cfg, arm, questions, passages) for arm in arms}
    scores = {arm: [score_answer(Reply.parse(g.text), q["answers"], q["gold_docs"], ps if rag[arm] else [])
                    for q, ps, g in zip(questions, passages, gs)] for arm, gs in generated.items()}
    kinds = sorted({q["kind"] for q in questions})
    summaries = {arm: summary(scores[arm], generated[arm], questions, kinds, rules[arm]) for arm in arms}
    compared = comparisons(scores, e.bootstrap)
    report = {"qa": str(e.qa), "split": e.split, "collection": e.collection, "adapter": e.adapter,
              "questions": len(questions),
              "kinds": {k: sum(q["kind"] == k for q in questions) for k in kinds}, "k": e.k, "mode": e.mode,
              "arms": summaries, "comparisons": compared,
              "verdict": verdict({a: s["all"] for a, s in summaries.items()}, compared)}
    return Matrix(questions, passages, rag, generated, scores, report, models)
