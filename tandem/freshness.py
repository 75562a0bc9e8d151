"""Freshness, the "data changes daily" case: change a fact in indexed documents, re-index only those documents, and
ask again. An arm that retrieves should give the new fact at once; an arm without retrieval cannot know it.

The check runs on its own collection (`evaluate.freshness_collection`), so the collection users query never holds a
made-up fact: each run first re-indexes the QA set's corpus there (incremental: only the documents the last run
changed are embedded again), then the changed copies of the picked documents.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from collections import defaultdict
from pathlib import Path

from tandem.answers import Reply, normalize
from tandem.qa import load_qa, passages_for, pick

KINDS = ("year", "person", "place")  # span answers a document states; a title answer is the document itself


# Other names of a country that do not start as it does (the 4-letter rule below misses them): a passage that still
# says "Polish" or "U.S." still says the old country
OTHER_NAMES = {"Poland": ("Polish",), "Spain": ("Spanish",), "Netherlands": ("Dutch",),
               "United States": ("American", "U.S.", "US"), "U.S.": ("American", "United States", "US"),
               "Philippines": ("Filipino",), "Myanmar": ("Burmese", "Burma"), "France": ("French",),
               "United Kingdom": ("British", "U.K.", "UK"), "Denmark": ("Danish",), "Switzerland": ("Swiss",),
               "Ireland": ("Irish",)}


def _states(text: str, answer: str) -> bool:
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
            or any(_word(name).search(rest) for name in OTHER_NAMES.get(old, ())))


def read_corpus(root: Path) -> dict[str, dict]:
    return {d["id"]: d for path in sorted(root.glob("*.jsonl")) for line in path.read_text().splitlines()
            if line.strip() for d in [json.loads(line)]}


def changed_facts(questions: list[dict], docs: dict[str, dict], n: int, seed: int = 0) -> list[dict]:
    """Up to `n` changes, one per document: a year, person or place question whose gold document states its
    reference, that reference replaced in the document by another answer of the same kind that the document does
    not mention. Only thorough changes are made: not where the question itself names the old answer ("In which
    country is Constantine, Algeria?") or the document would still point at it (`_points_at`). Each: the question
    with `answers` = [the new fact] and `stale` = the old references, and the changed document."""
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
        if old and (_states(q["question"], old) or _points_at(doc["text"], old)):
            continue
        others = sorted(a for a in pool[q["kind"]] if old and not _states(doc["text"], a) and not _states(a, old))
        if not others:
            continue
        new = rng.choice(others)
        out.append({"question": {**q, "answers": [new], "stale": q["answers"]},
                    "doc": {**doc, "text": _word(old).sub(new, doc["text"])}})
        changed.add(doc["id"])
        if len(out) == n:
            break
    return out


def check_freshness(cfg, arms: list[str], models) -> dict:
    """`evaluate.freshness` facts changed and re-indexed, then asked of every arm: per arm, the share of answers
    giving the new fact and the share still giving the old one; and the share whose passages hold the new fact."""
    from tandem.arms import ask

    e = cfg.evaluate
    corpus = Path(e.qa) / "corpus"
    facts = changed_facts(pick(load_qa(e.qa, e.split), 0), read_corpus(corpus), e.freshness)
    if not facts:
        return {"questions": 0}
    questions = [f["question"] for f in facts]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "changed.jsonl").write_text("".join(json.dumps(f["doc"], ensure_ascii=False) + "\n"
                                                         for f in facts))
        passages = passages_for(cfg, [corpus, Path(tmp)], questions, e.freshness_collection, e.k, e.mode)
    replies = {arm: [Reply.parse(g.text) for g in ask(models, cfg, arm, questions, passages)] for arm in arms}

    def share(arm: str, answers_of) -> float:
        return round(sum(any(_states(r.answer, a) for a in answers_of(q)) for r, q in zip(replies[arm], questions))
                     / len(facts), 4)

    retrieved = sum(any(_states(p["text"], q["answers"][0]) for p in ps) for q, ps in zip(questions, passages))
    return {"questions": len(facts), "retrieved_new": round(retrieved / len(facts), 4),
            "arms": {arm: {"new": share(arm, lambda q: q["answers"]), "old": share(arm, lambda q: q["stale"])}
                     for arm in arms},
            "changes": [{"doc_id": f["doc"]["id"], "question": f["question"]["question"], "old": f["question"]["stale"],
                         "new": f["question"]["answers"][0], "replies": {arm: replies[arm][i].text for arm in arms}}
                        for i, f in enumerate(facts)]}


def freshness_lines(fresh: dict) -> list[str]:
    """The check in plain words, one line per arm."""
    if not fresh.get("questions"):
        return ["freshness: no fact could be changed (no year, person or place question states its answer)"]
    lines = [f"freshness: {fresh['questions']} facts changed and re-indexed; the new fact was retrieved for "
             f"{fresh['retrieved_new']:.0%} of their questions"]
    lines += [f"  {arm}: gives the new fact {s['new']:.0%}, the old one {s['old']:.0%}"
              for arm, s in fresh["arms"].items()]
    return lines
