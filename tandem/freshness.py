"""Freshness, the "data changes daily" case: change a fact in indexed documents, re-index only those documents, and
ask again. An arm that retrieves should give the new fact at once; an arm without retrieval cannot know it.

The check runs on its own collection (`evaluate.freshness_collection`), so the collection users query never holds a
made-up fact: each run makes it a copy of the QA set's collection (vectors and all: nothing is embedded again), then
indexes the changed copies of the picked documents into it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tandem.answers import Reply
from tandem.facts import changed_facts, read_corpus, states
from tandem.qa import load_qa, passages_for, pick


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
        passages = passages_for(cfg, [Path(tmp)], questions, e.freshness_collection, e.k, e.mode,
                                copy_of=e.collection)
    replies = {arm: [Reply.parse(g.text) for g in ask(models, cfg, arm, questions, passages)] for arm in arms}

    def share(arm: str, answers_of) -> float:
        return round(sum(any(states(r.answer, a) for a in answers_of(q)) for r, q in zip(replies[arm], questions))
                     / len(facts), 4)

    retrieved = sum(any(states(p["text"], q["answers"][0]) for p in ps) for q, ps in zip(questions, passages))
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
