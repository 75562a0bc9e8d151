"""Changing a fact in a document so that it then states the new fact alone: what the freshness check re-indexes, and
what counterfactual training rows show the model (a passage that contradicts what it knows, labelled with what the
passage says)."""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path

from tandem.answers import normalize

KINDS = ("year", "person", "place")  # span answers a document states; a title answer is the document itself


# One country's names, each a right answer to "In which country is ...?" (descriptions say "United States", "U.S."
# or "US" for one country) and each still naming it in a passage
COUNTRY_NAMES = [("United States", "U.S.", "US", "USA", "United States of America"), ("United Kingdom", "U.K.", "UK"),
                 ("Myanmar", "Burma")]
# Words for a country that do not start as its name does (the 4-letter rule below misses them): a passage that still
# says "Polish" still says Poland
DEMONYMS = {"Poland": ("Polish",), "Spain": ("Spanish",), "Netherlands": ("Dutch",), "United States": ("American",),
            "Philippines": ("Filipino",), "Myanmar": ("Burmese",), "France": ("French",),
            "United Kingdom": ("British",), "Denmark": ("Danish",), "Switzerland": ("Swiss",), "Ireland": ("Irish",)}


def country_names(country: str) -> list[str]:
    """The country as given first (the name a description uses, and the label a passage states), then its other
    names."""
    return list(dict.fromkeys([country, *next((g for g in COUNTRY_NAMES if country in g), ())]))


def _other_names(country: str) -> list[str]:
    names = country_names(country)
    return [*names[1:], *(word for name in names for word in DEMONYMS.get(name, ()))]


def states(text: str, answer: str) -> bool:
    """Whether `text` says `answer`, as a whole phrase after normalization (so a life span "(940–1025)" states both
    its years)."""
    return f" {normalize(answer)} " in f" {normalize(text)} "


def _word(name: str) -> re.Pattern:
    """`name` where it is whole: "India" in "Indian" is not India."""
    return re.compile(rf"(?<!\w){re.escape(name)}(?!\w)")


def _points_at(text: str, old: str) -> bool:
    """Whether `text` still points at `old` once `old` itself is replaced: a capitalised word starting as one of its
    words does ("Twain's" for Mark Twain, "German" for Germany, "Indian" for India), or another of its names. A
    change there would leave a passage that supports both the old fact and the new one."""
    rest = _word(old).sub(" ", text)
    stems = {w[:4] for w in re.findall(r"[A-Z][\w-]+", old)}
    return (any(w[:4] in stems for w in re.findall(r"(?<!\w)[A-Z][\w-]+", rest))
            or any(_word(name).search(rest) for name in _other_names(old)))


def read_corpus(root: Path) -> dict[str, dict]:
    return {d["id"]: d for path in sorted(root.glob("*.jsonl")) for line in path.read_text().splitlines()
            if line.strip() for d in [json.loads(line)]}


def changed_facts(questions: list[dict], docs: dict[str, dict], n: int, seed: int = 0) -> list[dict]:
    """Up to `n` changes, one per document: a year, person or place question whose gold document states its
    reference, that reference replaced in the document by another answer of the same kind that the document does
    not mention. Only thorough changes are made: not where the question itself names the old answer ("In which
    country is Constantine, Algeria?") or the document would still point at it (`_points_at`). Each: the question
    with `answers` = [the new fact] and `stale` = the old references, the `old` and `new` strings swapped, and the
    changed document."""
    pool = defaultdict(set)
    for q in questions:
        if q["kind"] in KINDS:
            pool[q["kind"]].update(q["answers"])
    rng, out, changed = random.Random(seed), [], set()
    for q in questions:
        doc = docs.get(q["gold_docs"][0]) if q["gold_docs"] else None
        if q["kind"] not in KINDS or doc is None or doc["id"] in changed:
            continue
        old = next((a for a in q["answers"] if _word(a).search(doc["text"])), None)
        if old and (states(q["question"], old) or _points_at(doc["text"], old)):
            continue
        others = sorted(a for a in pool[q["kind"]] if old and not states(doc["text"], a) and not states(a, old))
        if not others:
            continue
        new = rng.choice(others)
        out.append({"question": {**q, "answers": [new], "stale": q["answers"]}, "old": old, "new": new,
                    "doc": {**doc, "text": _word(old).sub(new, doc["text"])}})
        changed.add(doc["id"])
        if len(out) == n:
            break
    return out


def counterfactuals(questions: list[dict], passages: list[list[dict]], docs: dict[str, dict], n: int,
                    seed: int = 0) -> tuple[list[dict], list[list[dict]]]:
    """Up to `n` of the questions made counterfactual (`changed_facts`), among those whose retrieved passages include
    their gold document stating the answer: the new fact replaces the old one in those passages and becomes the
    reference, so the grounded label cites a passage for the new fact. The model learns to answer from a passage
    that contradicts what it knows, which labels that always agree with the world never show it."""
    from tandem.qa import grounded_label

    found = [q for q, ps in zip(questions, passages) if grounded_label(q, ps)[1]]
    changes = {f["question"]["id"]: f for f in changed_facts(found, docs, n, seed)}
    out_q, out_p = [], []
    for q, ps in zip(questions, passages):
        f = changes.get(q["id"])
        if f is not None:
            q = f["question"]
            ps = [{**p, "text": _word(f["old"]).sub(f["new"], p["text"])} if p["doc_id"] == f["doc"]["id"] else p
                  for p in ps]
        out_q.append(q)
        out_p.append(ps)
    return out_q, out_p
