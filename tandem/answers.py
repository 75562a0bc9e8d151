"""Answer quality as a user sees it: right, cited, grounded, or honestly abstaining; and whether a difference is real.

Per question (`score_answer`): normalized exact match, token F1 and "contains the reference" against the reference
answers; format validity (the `{"answer", "sources"}` shape of tandem/prompts.py); citation precision and recall (the
cited passage numbers mapped to their documents, against the gold documents); groundedness (the share of the
answer's content words found in the cited passages); abstention (an empty answer citing nothing) on unanswerable
questions. `compare` puts a paired bootstrap confidence interval on the difference between two arms, so a gain is
claimed only when the interval excludes zero.
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from dataclasses import dataclass

from tandem.prompts import parse_rag_answer

# SQuAD's normalization, plus a small stop list for groundedness: function words prove nothing about a source.
ARTICLES = re.compile(r"\b(a|an|the)\b")
DASHES = re.compile(r"[-‐‑‒–—/]")  # part words: SQuAD's would join "(940–1025)" into one word, stating neither year
STOPWORDS = frozenset("""a an the of in on at to for from by with and or but is are was were be been being it its this
that these those as which who whom what when where why how not no do does did has have had i you he she we they them his
her their our your my me him us there here than then so such into over under about after before also""".split())


def normalize(text: str) -> str:
    """SQuAD's, with accents folded ("Eugene Delacroix" names the painter the reference spells "Eugène") and dashes
    and slashes parting words: one splitter for the answer metrics, groundedness and `tandem.facts.states`."""
    text = "".join(c for c in unicodedata.normalize("NFKD", DASHES.sub(" ", text.lower()))
                   if c not in string.punctuation and not unicodedata.combining(c))
    return " ".join(ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style word overlap between two answers (case, punctuation and articles ignored)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    common = sum(min(pred.count(w), ref.count(w)) for w in set(pred))
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def content_words(text: str) -> list[str]:
    return [w for w in normalize(text).split() if w not in STOPWORDS]


@dataclass
class Reply:
    """What a model said, read the way the app reads it: the JSON shape when it has one, else the raw text."""
    text: str
    valid: bool  # exactly the {"answer", "sources"} shape
    answer: str
    sources: list[int]

    @classmethod
    def parse(cls, text: str) -> "Reply":
        parsed = parse_rag_answer(text)
        if parsed is None:
            return cls(text, False, text.strip(), [])
        return cls(text, True, parsed["answer"].strip(), list(parsed["sources"]))

    @property
    def abstained(self) -> bool:
        return self.valid and not self.answer and not self.sources


def has_answer(references: list[str], gold_docs: list[str]) -> bool:
    """Whether a question has an answer in the index: reference answers or a gold document (none: the right reply
    abstains, whether its article is not indexed or says nothing of it)."""
    return bool(references or gold_docs)


def score_answer(reply: Reply, references: list[str], gold_docs: list[str], passages: list[dict]) -> dict:
    """Metrics for one question. `passages`: what the prompt numbered (each with `doc_id` and `text`), [] without
    retrieval; `references` and `gold_docs` are empty for an unanswerable question. A question whose answer is a
    whole document (the FAQ's) has `gold_docs` and no `references`: it is scored on citations and groundedness only."""
    answerable = has_answer(references, gold_docs)
    cited = [passages[i - 1] for i in dict.fromkeys(reply.sources) if 1 <= i <= len(passages)]
    out = {"valid": float(reply.valid), "answerable": answerable}
    if not answerable:
        out["abstained"] = float(reply.abstained)
        return out
    if references:
        out["exact"] = max(float(normalize(reply.answer) == normalize(r)) for r in references)
        out["f1"] = max(token_f1(reply.answer, r) for r in references)
        out["contains"] = max(float(bool(normalize(r)) and f" {normalize(r)} " in f" {normalize(reply.answer)} ")
                              for r in references)
    out["false_abstention"] = float(reply.abstained)
    if passages:
        retrieved = {p["doc_id"] for p in passages}
        out["retrieved_gold"] = float(bool(retrieved & set(gold_docs)))
        if reply.sources:
            out["citation_precision"] = sum(p["doc_id"] in gold_docs for p in cited) / len(reply.sources)
        if out["retrieved_gold"]:
            out["citation_recall"] = float(any(p["doc_id"] in gold_docs for p in cited))
        if (grounded := grounded_share(reply.answer, [p["text"] for p in cited])) is not None:
            out["grounded"] = grounded
    return out


def grounded_share(answer: str, cited: list[str]) -> float | None:
    """The share of the answer's content words found in the cited passages' text; None for an answer without any."""
    words = content_words(answer)
    if not words:
        return None
    support = set(content_words(" ".join(cited)))
    return sum(w in support for w in words) / len(words)


def served_grounding(text: str, passages: list[str]) -> float | None:
    """Groundedness of a served RAG answer, computed without a judge or a reference: its content words found in the
    passages it cites; 0 when it cites a passage that was never given or cites none. None where there is nothing to
    check: an answer out of the format, or an abstention."""
    reply = Reply.parse(text)
    if not reply.valid or reply.abstained:
        return None
    if not reply.sources or any(not 1 <= i <= len(passages) for i in reply.sources):
        return 0.0
    return grounded_share(reply.answer, [passages[i - 1] for i in dict.fromkeys(reply.sources)])


def mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict]) -> dict:
    """Each metric averaged over the questions it applies to, with how many those were."""
    keys = sorted({k for r in rows for k in r if k != "answerable"})
    return {k: {"mean": round(mean(rows, k), 4), "n": sum(k in r for r in rows)} for k in keys}


def compare(a: list[dict], b: list[dict], key: str, samples: int = 2000, seed: int = 0) -> dict | None:
    """Paired bootstrap of mean(b) - mean(a) over the questions both arms have `key` for: the difference and its
    95% interval; `significant` when the interval excludes zero."""
    pairs = [(x[key], y[key]) for x, y in zip(a, b) if key in x and key in y]
    if not pairs:
        return None
    rng = random.Random(seed)
    n = len(pairs)
    diffs = sorted(sum(pairs[j][1] - pairs[j][0] for j in (rng.randrange(n) for _ in range(n))) / n
                   for _ in range(samples))
    low, high = diffs[int(0.025 * samples)], diffs[int(0.975 * samples) - 1]
    delta = sum(y - x for x, y in pairs) / n
    return {"delta": round(delta, 4), "low": round(low, 4), "high": round(high, 4), "n": n,
            "significant": low > 0 or high < 0}


# The decision matrix's questions: which arm pairs, on which metric, answer "is knowledge missing?" and "is
# behaviour missing?" (Tandem's argument: RAG supplies the what, fine-tuning the how), and, with constrained
# decoding, "is fine-tuning still needed once decoding enforces the format?"
QUESTIONS = (
    ("knowledge", "RAG", "base", "base+rag", "contains", "correctness"),
    ("knowledge", "RAG", "tuned", "tuned+rag", "contains", "correctness"),
    ("behaviour", "fine-tuning", "base+rag", "tuned+rag", "valid", "format validity"),
    ("behaviour", "fine-tuning", "base+rag", "tuned+rag", "citation_precision", "citation precision"),
    ("behaviour", "fine-tuning", "base+rag", "tuned+rag", "abstained", "abstention on unanswerable questions"),
    ("behaviour", "fine-tuning", "base+rag", "tuned+rag", "contains", "correctness"),
    ("behaviour", "fine-tuning", "base+rag+guided", "tuned+rag", "contains", "correctness"),
    ("behaviour", "fine-tuning", "base+rag+guided", "tuned+rag", "citation_precision", "citation precision"),
    ("behaviour", "fine-tuning", "base+rag+guided", "tuned+rag", "abstained", "abstention on unanswerable questions"),
)


# what a pair of arms that differ in one thing is compared on
PAIR_METRICS = (("contains", "correctness"), ("f1", "token F1"), ("valid", "format validity"),
                ("citation_precision", "citation precision"), ("grounded", "groundedness"),
                ("abstained", "abstention on unanswerable questions"))


def pair_questions(arms) -> list[tuple]:
    """The pairs the arms' names make: a named adapter version (`grounded_qa@1+rag`) against the tuned adapter with
    the same passages and decoding (is the candidate better than the version it would replace?), and any arm with
    constrained decoding against the same arm without it (what does holding this model to the format change?)."""
    out = []
    for arm in arms:
        model = arm.split("+")[0]
        if "@" in model and (tuned := "tuned" + arm.removeprefix(model)) in arms:
            out += [(None, "the tuned adapter", arm, tuned, key, what) for key, what in PAIR_METRICS]
        if "+guided" in arm and (free := arm.replace("+guided", "")) in arms:
            out += [("behaviour", "constrained decoding", free, arm, key, what) for key, what in PAIR_METRICS]
    return out


def comparisons(rows: dict[str, list[dict]], samples: int = 2000) -> list[dict]:
    """Each of QUESTIONS whose two arms were run, and each pair the arms' names make, with its paired bootstrap
    interval."""
    out = []
    for aspect, step, a, b, key, what in (*QUESTIONS, *pair_questions(rows)):
        if a in rows and b in rows and (c := compare(rows[a], rows[b], key, samples)) is not None:
            out.append({"aspect": aspect, "step": step, "from": a, "to": b, "metric": key, "what": what, **c})
    return out


def verdict(summaries: dict[str, dict], compared: list[dict]) -> list[str]:
    """Plain sentences: what RAG adds, what fine-tuning adds, claimed only where the interval excludes zero; and
    which arm is best on each headline metric."""
    lines = []
    for c in compared:
        interval = f"{c['delta']:+.2f}, 95% CI {c['low']:+.2f}..{c['high']:+.2f}, n={c['n']}"
        step = c["step"]
        if c["significant"] and c["delta"] > 0:
            missing = f"missing {c['aspect']}: " if c["aspect"] else ""
            lines.append(f"{missing}{step} adds {c['what']} to {c['from']} ({interval})")
        elif c["significant"]:
            lines.append(f"{step} costs {c['what']} against {c['from']} ({interval})")
        else:
            lines.append(f"{step} makes no significant difference to {c['what']} from {c['from']} ({interval})")
    for key in ("contains", "valid", "citation_precision", "grounded", "abstained"):
        scored = {arm: s[key]["mean"] for arm, s in summaries.items() if key in s}
        if scored:
            best = max(scored.values())
            lines.append(f"best on {key}: {', '.join(a for a, v in scored.items() if v == best)} ({best:.2f})")
    return lines
