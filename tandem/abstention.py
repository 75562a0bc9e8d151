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
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.answers import compare
from tandem.prompts import rag_answer

TAG_PREFIX = "abstain_threshold."  # + a collection: the adapter version's tag holding its τ there


def threshold_tag(collection: str) -> str:
    return TAG_PREFIX + collection


def thresholds(tags: dict) -> dict[str, float]:
    """An adapter version's calibrated thresholds by collection, read from its tags."""
    return {k.removeprefix(TAG_PREFIX): float(v) for k, v in tags.items() if k.startswith(TAG_PREFIX)}


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
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"abstain threshold {self.threshold}: expected a probability in (0, 1]")

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
    """`Abstention` as a transformers logits processor for `generate` (offline evaluation); `scores` holds each
    row's least probability of the abstention reply's tokens (1.0 for a row that never reached a choice)."""

    def __init__(self, abstention: Abstention, rows: int, prompt_length: int):
        self.abstention, self.prompt_length = abstention, prompt_length
        self.scores = [1.0] * rows

    def __call__(self, input_ids, scores):
        for i, written in enumerate(input_ids[:, self.prompt_length :].tolist()):
            p = self.abstention.steer(written, scores[i])
            if p is not None:
                self.scores[i] = min(self.scores[i], p)
        return scores


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` found: the curve [(τ, share right, abstention on unanswerable)], greedy decoding (τ None)
    first; its best point (ties go to the higher τ: fewer abstentions); and that point's gain in questions answered
    right over greedy decoding, with a paired bootstrap interval."""
    curve: list[tuple]
    best: tuple
    gain: dict

    @property
    def threshold(self) -> float | None:
        """The τ to record: the best one, where its gain is significant. A threshold fitted to a few unanswerable
        questions costs right answers on the next ones (the demo's 60-step adapter, 24 of them: +0.03 on dev, not
        significant; -0.04 correctness on test)."""
        return self.best[0] if self.gain["significant"] and self.gain["delta"] > 0 else None


def calibrate(scores: list[float], abstained: list[bool], right: list[float | None],
              samples: int = 2000) -> Calibration:
    """Each τ among the scores, against greedy decoding. Per question: the model's score, whether greedy decoding
    abstained, and whether its answer was right (None: the question has no answer, so abstaining is right). A
    question abstains under τ where greedy decoding did or its score reaches τ; it is answered right where it
    abstains without an answer, or answers right."""
    if not scores or not len(scores) == len(abstained) == len(right):
        raise ValueError(f"calibration needs one score, abstention and outcome per question: got {len(scores)}, "
                         f"{len(abstained)}, {len(right)}")
    unanswerable = sum(r is None for r in right)
    curve, outcomes = [], {}
    for tau in [None, *sorted({s for s, a in zip(scores, abstained) if not a}, reverse=True)]:
        abstains = [a or (tau is not None and s >= tau) for s, a in zip(scores, abstained)]
        outcomes[tau] = [float(a) if r is None else (0.0 if a else r) for a, r in zip(abstains, right)]
        curve.append((tau, sum(outcomes[tau]) / len(right),
                      sum(a for a, r in zip(abstains, right) if r is None) / unanswerable if unanswerable else None))
    best = max(curve, key=lambda c: c[1])  # the first best: the highest τ
    return Calibration(curve, best, compare([{"right": x} for x in outcomes[None]],
                                            [{"right": x} for x in outcomes[best[0]]], "right", samples))
