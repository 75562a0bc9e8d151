"""Calibrated abstention: a tuned adapter abstains where it gives the abstention reply at least probability τ.

A tuned model decides to abstain at one token (on SmolLM2, ` "",` after `{"answer":`). Greedy decoding abstains only
where that token is the likeliest, so how often an adapter abstains swings from checkpoint to checkpoint (0.29 to
0.91 on the same unanswerable test questions), while the probability itself ranks unanswerable questions above
answerable ones. Calibration (`jobs.evaluate evaluate.calibrate=true`, on the dev split) reads that probability for
every question, picks the τ that answers the most questions right (a correct answer, or an abstention where the
passages hold none) and, where that is significantly more than greedy decoding answers right, records it on the
adapter version for the collection the questions were answered from (tag `abstain_threshold.<collection>`);
evaluation, validation and the app's RAG routes over that collection then decode that version with it. Per
collection, because the probability is not comparable across corpora: the τ that Wikipedia questions gave the
Wikipedia + FAQ adapter (0.025) made it abstain on all 95 FAQ test questions, 84 of them answerable.

Calibration also weighs the retrieval: where the top passage scored lower (on hybrid search, dense and BM25 did not
agree on it), the passages more often do not hold the answer (on the Wikipedia test split, 67 of 100 unanswerable
questions against 18 of 100 answerable ones), so the bar drops with that score: τ(s) = σ(logit τ + w·(s − s_top)).
The weight w is the one among a few that answers the most dev questions right (0: one τ, as before); the rule holds
for the search mode it was fitted on.

And it may withhold an answer its cited passages do not hold (`min_grounded`: the least share of the answer's content
words found in them; the reply then abstains). Asked "When was Charles Babbage born?" over his summary, which gives
no year, `make train`'s adapter answered with a year on 49 of 50 such test questions, 40 of them found in no cited
passage; its probability of abstaining was as low on them as on right answers: the passages tell them apart.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

from tandem.answers import compare, served_grounding
from tandem.prompts import rag_answer

TAG_PREFIX = "abstain_threshold."  # + a collection: the adapter version's tag holding its τ there


RETRIEVAL_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # tried, in spreads of the model's logit per spread of the score
GROUNDING = (None, 0.5, 1.0)  # min_grounded tried: none, half of the answer's content words, all of them


def threshold_tag(collection: str) -> str:
    return TAG_PREFIX + collection


@dataclass(frozen=True)
class Threshold:
    """An adapter version's abstention threshold on one collection: τ where the top passage scores `top_score` under
    `mode` search, and how far the logit of τ moves per unit of that score (`retrieval_weight`; 0: τ everywhere);
    with `min_grounded`, an answer whose cited passages hold less than that share of its content words abstains."""
    threshold: float
    retrieval_weight: float = 0.0
    top_score: float | None = None
    mode: str | None = None
    min_grounded: float | None = None

    def __post_init__(self):
        _check_probability(self.threshold)
        if self.min_grounded is not None:
            _check_probability(self.min_grounded, "min_grounded")
        if self.retrieval_weight and (self.top_score is None or self.mode is None):
            raise ValueError(f"retrieval weight {self.retrieval_weight} needs the top score and search mode it was "
                             f"fitted at: got {self.top_score}, {self.mode}")

    def at(self, score: float | None, mode: str) -> float:
        """τ for a question whose top passage scored `score` under `mode` search; τ itself where the rule was fitted
        on another mode or nothing was retrieved."""
        if not self.retrieval_weight or mode != self.mode or score is None:
            return self.threshold
        return _sigmoid(_logit(self.threshold) + self.retrieval_weight * (score - self.top_score))

    def reply(self, text: str, passages: list[str]) -> str:
        """The reply as served from `passages` (their text, as numbered): the abstention reply where its answer is not
        grounded enough in the passages it cites."""
        share = served_grounding(text, passages) if self.min_grounded is not None else None
        return rag_answer("", []) if share is not None and share < self.min_grounded else text

    def to_dict(self) -> dict:
        return ({"threshold": self.threshold}
                | ({"retrieval_weight": self.retrieval_weight, "top_score": self.top_score, "mode": self.mode}
                   if self.retrieval_weight else {})
                | ({"min_grounded": self.min_grounded} if self.min_grounded is not None else {}))

    def tag(self) -> str:
        """The tag's value: τ alone, as before weights, or the rule as JSON."""
        return repr(self.threshold) if self.to_dict().keys() == {"threshold"} else json.dumps(self.to_dict())

    @classmethod
    def parse(cls, value: str) -> "Threshold":
        return cls(**json.loads(value)) if value.lstrip().startswith("{") else cls(float(value))


def thresholds(tags: dict) -> dict[str, Threshold]:
    """An adapter version's calibrated thresholds by collection, read from its tags."""
    return {k.removeprefix(TAG_PREFIX): Threshold.parse(v) for k, v in tags.items() if k.startswith(TAG_PREFIX)}


def _check_probability(value: float, name: str = "abstain threshold") -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} {value}: expected a probability in (0, 1]")


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-min(max(z, -30.0), 30.0)))  # never 0 or 1: still a probability in (0, 1]


def abstention_tokens(tokenizer) -> tuple[int, ...]:
    """The abstention reply as the model writes it."""
    return tuple(tokenizer(rag_answer("", []), add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Abstention:
    """While a row has written only the abstention reply's first tokens, the reply's next token is forced where the
    model gives it at least `threshold` (None: measured, never forced), and under a threshold a written reply ends
    there (`eos`). `steer` returns the probability of the reply's next token, or None where there is none (the row
    left the reply, or wrote all of it); a row's score is the least of them (where it left, if it did)."""
    tokens: tuple[int, ...]
    threshold: float | None = None
    eos: int | None = None

    def __post_init__(self):
        if self.threshold is not None:
            _check_probability(self.threshold)

    def steer(self, written: list[int], logits) -> float | None:
        """In place on one row's next-token logits (after any constraint has masked them)."""
        import torch

        t = len(written)
        if t > len(self.tokens) or tuple(written) != self.tokens[:t]:
            return None
        if t == len(self.tokens):
            if self.threshold is not None and self.eos is not None:
                _force(logits, self.eos)
            return None
        token = self.tokens[t]
        p = float(torch.softmax(logits.float(), dim=-1)[token])
        if self.threshold is not None and p >= self.threshold:
            _force(logits, token)
        return p


def _force(logits, token: int) -> None:
    kept = logits[token].clone()
    logits.fill_(float("-inf"))
    logits[token] = kept


class AbstentionLogits:
    """`Abstention` as a transformers logits processor for `generate` (offline evaluation), one per row (each
    question has its own threshold); `scores` holds each row's least probability of the abstention reply's tokens
    (1.0 for a row that never reached a choice)."""

    def __init__(self, abstentions: list[Abstention], prompt_length: int):
        self.abstentions, self.prompt_length = abstentions, prompt_length
        self.scores = [1.0] * len(abstentions)

    def __call__(self, input_ids, scores):
        for i, written in enumerate(input_ids[:, self.prompt_length :].tolist()):
            p = self.abstentions[i].steer(written, scores[i])
            if p is not None:
                self.scores[i] = min(self.scores[i], p)
        return scores


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` found: the curve [(τ, share right, abstention on unanswerable)], greedy decoding (τ None)
    first; its best point (ties go to the higher τ: fewer abstentions; with `min_abstention`, the one answering the
    most answerable questions right among those abstaining on at least that share); that point's gain in questions
    answered right over greedy decoding, with a paired bootstrap interval; the retrieval weight it was found at (τ is
    then the threshold at `top_score`) and the grounding it asks of answers (`min_grounded`, which the curve includes:
    its τ None is greedy decoding with answers withheld); the share right at the best single threshold (weight 0, no
    grounding), and greedy decoding's own (share right, abstention on unanswerable), for comparison."""
    curve: list[tuple]
    best: tuple
    gain: dict
    greedy: tuple
    retrieval_weight: float = 0.0
    top_score: float | None = None
    single: float | None = None
    min_abstention: float | None = None
    min_grounded: float | None = None

    @property
    def threshold(self) -> float | None:
        """The τ to record: the best one, where its gain is significant, or where greedy decoding abstains less than
        the asked `min_abstention` (the user chose that trade); 1 where the best point withholds ungrounded answers
        and otherwise decodes greedily. A threshold fitted to a few unanswerable questions costs right answers on the
        next ones (the demo's 60-step adapter, 24 of them: +0.03 on dev, not significant; -0.04 correctness on
        test)."""
        asked = self.min_abstention is not None and self.greedy[1] < self.min_abstention
        if not asked and not (self.gain["significant"] and self.gain["delta"] > 0):
            return None
        return 1.0 if self.best[0] is None and self.min_grounded is not None else self.best[0]

    def rule(self, mode: str) -> Threshold | None:
        """What to record for questions searched with `mode`, or None."""
        if self.threshold is None:
            return None
        weighted = bool(self.retrieval_weight)
        return Threshold(self.threshold, self.retrieval_weight, self.top_score if weighted else None,
                         mode if weighted else None, self.min_grounded)


def calibrate(scores: list[float], abstained: list[bool], right: list[float | None], samples: int = 2000,
              top_scores: list[float] | None = None, min_abstention: float | None = None,
              grounded: list[float | None] | None = None) -> Calibration:
    """Each τ among the scores, against greedy decoding. Per question: the model's score, whether greedy decoding
    abstained, and whether its answer was right (None: the question has no answer, so abstaining is right). A
    question abstains under τ where greedy decoding did or its score reaches τ; it is answered right where it
    abstains without an answer, or answers right.

    With `top_scores` (each question's top passage score), each of RETRIEVAL_WEIGHTS too: a score p becomes
    σ(logit p − w·(s − s_top)), which reaches τ exactly where p reaches τ(s) (`Threshold.at`). The weight that
    answers the most questions right is kept (ties: the smaller).

    With `grounded` (each greedy answer's share of content words found in the passages it cites, None for an
    abstention or an answer out of the format: `served_grounding`), each of GROUNDING too: an answer below it
    abstains at every τ. Kept where it answers more questions right (ties: none).

    With `min_abstention`, the best point (and weight) is the one answering the most answerable questions right among
    those abstaining on at least that share of the unanswerable ones: an operating point for users who want that
    abstention, and otherwise as many answers as they can get."""
    if not scores or not len(scores) == len(abstained) == len(right) == len(top_scores or scores) \
            == len(grounded or scores):
        raise ValueError(f"calibration needs one score, abstention, outcome (and top passage score, groundedness, if "
                         f"any) per question: got {len(scores)}, {len(abstained)}, {len(right)}, "
                         f"{len(top_scores or [])}, {len(grounded or [])}")
    if min_abstention is not None:
        _check_probability(min_abstention, "min_abstention")
        if None not in right:
            raise ValueError(f"min_abstention {min_abstention} needs unanswerable questions to measure abstention "
                             f"on: all {len(right)} questions have answers")
    greedy = _curve(scores, abstained, right, min_abstention)
    weighed, top = {0.0: scores}, max(top_scores) if top_scores else None
    if top_scores and len(set(top_scores)) > 1 and len(set(scores)) > 1:
        spread = statistics.pstdev([_logit(p) for p in scores]) / statistics.pstdev(top_scores)
        weighed |= {m * spread: [_sigmoid(_logit(p) - m * spread * (s - top)) for p, s in zip(scores, top_scores)]
                    for m in RETRIEVAL_WEIGHTS if m}
    found = (*greedy, 0.0, None)
    for g in GROUNDING if grounded else (None,):
        withheld = [a or (g is not None and x is not None and x < g) for a, x in zip(abstained, grounded or scores)]
        for w, ps in weighed.items():
            if (g, w) != (None, 0.0) and (c := _curve(ps, withheld, right, min_abstention))[3] > found[3]:
                found = (*c, w, g)
    curve, best, outcomes, _, weight, min_grounded = found
    gain = compare([{"right": x} for x in greedy[2][None]], [{"right": x} for x in outcomes[best[0]]], "right",
                   samples)  # once, for the kept point, against greedy decoding
    return Calibration(curve, best, gain, greedy[0][0][1:], weight, top if weight else None, greedy[1][1],
                       min_abstention, min_grounded)


def _curve(scores: list[float], abstained: list[bool], right: list[float | None],
           min_abstention: float | None = None) -> tuple[list, tuple, dict, float]:
    """The curve, its best point (the first best: the highest τ), each τ's outcome per question and the best point's
    value: the share answered right, or with `min_abstention` the answerable questions answered right among the
    points abstaining on at least that share (the lowest τ abstains on every question)."""
    unanswerable = sum(r is None for r in right)
    curve, outcomes = [], {}
    for tau in [None, *sorted({s for s, a in zip(scores, abstained) if not a}, reverse=True)]:
        abstains = [a or (tau is not None and s >= tau) for s, a in zip(scores, abstained)]
        outcomes[tau] = [float(a) if r is None else (0.0 if a else r) for a, r in zip(abstains, right)]
        curve.append((tau, sum(outcomes[tau]) / len(right),
                      sum(a for a, r in zip(abstains, right) if r is None) / unanswerable if unanswerable else None))
    if min_abstention is None:
        best = max(curve, key=lambda c: c[1])
        return curve, best, outcomes, best[1]
    answered = {tau: sum(o for o, r in zip(os, right) if r is not None) for tau, os in outcomes.items()}
    best = max((c for c in curve if c[2] >= min_abstention), key=lambda c: answered[c[0]])
    return curve, best, outcomes, answered[best[0]]
