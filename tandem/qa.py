"""QA sets in use: their questions, the passages the retriever gives each one, and the grounded-answering task.

The grounded task teaches the behaviour half of Tandem: answer from the numbered passages with a short span, cite
the passage that holds it, and abstain (`{"answer": "", "sources": []}`) when none does. Its passages are what the
real retriever returns for the question (hard negatives, not random articles), and its labels come from the
passages themselves: a retrieved gold passage that states a reference answer is cited; otherwise the right reply
is to abstain, even for a question that has an answer somewhere in the corpus, unless another retrieved passage
states it (then the row is left out: `undecided`).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from tandem.answers import has_answer
from tandem.errors import ConfigError
from tandem.facts import states
from tandem.prompts import rag_answer, rag_messages


def load_qa(root: str | Path, split: str) -> list[dict]:
    """The questions of one split of a QA set written by `tandem.datasets` (`qa.jsonl`); `all`: every split, for a
    set nothing is trained on (the FAQ's)."""
    path = Path(root) / "qa.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: build a QA set with `jobs.prepare_data data.dataset=wiki_qa|faq_qa`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split in (r["split"], "all")]


def pick(questions: list[dict], limit: int, unanswerable_share: float | None = None) -> list[dict]:
    """Up to `limit` questions (0: all), taken in turn from each kind, so rare kinds (unanswerable, years) are not
    drowned by the common one. With `unanswerable_share`, that share of the `limit` is unanswerable questions (as many
    as there are, in turn from each unanswerable kind), the rest answerable ones in turn from each kind: abstention
    measured on 16 questions swings by +-0.2, so a gate or a benchmark may ask more of them than of each answerable
    kind."""
    if unanswerable_share is None or not limit:
        return _in_turn(questions)[: limit or None]
    check_share("unanswerable_share", unanswerable_share)
    answered = [has_answer(q["answers"], q["gold_docs"]) for q in questions]
    unanswerable = _in_turn([q for q, a in zip(questions, answered) if not a])[: round(limit * unanswerable_share)]
    rest = _in_turn([q for q, a in zip(questions, answered) if a])[: limit - len(unanswerable)]
    return _in_turn(unanswerable + rest)


def _in_turn(questions: list[dict]) -> list[dict]:
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        by_kind[q["kind"]].append(q)
    queues, picked = [by_kind[k] for k in sorted(by_kind)], []
    for i in range(max(map(len, queues), default=0)):
        picked += [q[i] for q in queues if i < len(q)]
    return picked


def one_per_fact(questions: list[dict], seed: int = 0) -> list[dict]:
    """One phrasing of each (document, kind): training on two wordings of the same row teaches nothing new and the
    dataset's near-duplicate check would reject the second."""
    rng = random.Random(seed)
    facts: dict[tuple, list[dict]] = defaultdict(list)
    for q in questions:
        facts[(q["doc_id"], q["kind"], tuple(q["answers"]))].append(q)
    return [rng.choice(v) for v in facts.values()]


def passages_for(cfg, corpora: list[Path], questions: list[dict], collection: str, k: int, mode: str,
                 copy_of: str | None = None) -> list[list[dict]]:
    """The passages each question gets from the app's retriever, once `corpora` are indexed (incrementally, in
    order: a later one's documents replace an earlier one's) into `collection`, which first becomes a copy of the
    collection `copy_of` where one is named; each {doc_id, title, text, score}."""
    from tandem.embedding import Embedder
    from tandem.errors import ConfigError
    from tandem.indexing import run_index
    from tandem.milvus import CollectionSpec, collection_dim, connect, copy_collection, milvus_endpoint
    from tandem.retrieval import Retriever
    from tandem.runtime import ray_session

    with ray_session(cfg.ray), milvus_endpoint(cfg.store.uri) as uri:
        if copy_of:
            client = connect(uri)
            try:
                if not client.has_collection(copy_of):
                    raise ConfigError(f"collection {copy_of!r} does not exist: nothing to copy into {collection!r}")
                spec = CollectionSpec.from_config(OmegaConf.merge(cfg.store, {"collection": collection}),
                                                  collection_dim(client, copy_of))
                copy_collection(client, copy_of, spec)
            finally:
                client.close()
        for corpus in corpora:
            run_index(OmegaConf.merge(cfg, {"corpus": {"path": str(corpus)}, "store": {"collection": collection}}),
                      uri)
        client = connect(uri)
        try:
            retriever = Retriever.from_config(client, collection, Embedder.from_config(cfg.embedder).encode, cfg)
            hits = []
            for i in range(0, len(questions), 256):
                hits += retriever.search([q["question"] for q in questions[i : i + 256]], k=k, mode=mode)
        finally:
            client.close()
    return [[{"doc_id": h.doc_id, "title": h.title, "text": h.text, "score": h.score} for h in hs] for hs in hits]


def grounded_label(question: dict, passages: list[dict]) -> tuple[str, list[int]]:
    """(answer, sources): the reference a retrieved gold passage states, cited by number; ("", []) when none does."""
    for ref in question["answers"]:
        sources = [i for i, p in enumerate(passages, start=1) if p["doc_id"] in question["gold_docs"]
                   and states(p["text"], ref)]
        if sources:
            return ref, sources
    return "", []


def undecided(question: dict, passages: list[dict]) -> bool:
    """An answerable question that no gold passage answers while another passage states its answer (the Rajasthan
    article for "In which country is Jaipur?"): whether that passage supports the answer is not known, so neither
    answering nor abstaining is a label to train on."""
    return not grounded_label(question, passages)[1] and any(states(p["text"], ref) for p in passages
                                                             for ref in question["answers"])


def grounded_rows(questions: list[dict], passages: list[list[dict]]) -> list[dict]:
    """Chat rows of the grounded task, in the serving prompt's shape, each with its question id and kind."""
    rows = []
    for q, ps in zip(questions, passages):
        answer, sources = grounded_label(q, ps)
        messages = rag_messages(q["question"], [p["text"] for p in ps])
        rows.append({"messages": [*messages, {"role": "assistant", "content": rag_answer(answer, sources)}],
                     "id": q["id"], "kind": q["kind"], "abstain": not sources, "counterfactual": "stale" in q,
                     "contrast": q.get("contrast", False)})
    return rows


def contrasted(questions: list[dict], passages: list[list[dict]], k: int, n: int) -> tuple[list, list]:
    """The questions with their first `k` passages and, after each of the first `n` whose gold passage there states
    the answer, the same question again with the gold passages left out (the next retrieved ones in their place),
    whose right reply abstains: only where no passage left states the answer ("Mark Twain" for Huckleberry Finn's
    author), which would make that label wrong. A pair that differs only in its passages teaches that the passages
    decide, not the kind of question: description questions ("Name the feats of balance and agility.") are most of
    the unanswerable ones, and adapters learned to abstain on the kind. `passages` holds more than `k` per question."""
    out_q, out_p = [], []
    for q, hits in zip(questions, passages):
        out_q.append(q)
        out_p.append(hits[:k])
        if not n or not grounded_label(q, hits[:k])[1]:
            continue
        others = [p for p in hits if p["doc_id"] not in q["gold_docs"]][:k]
        if len(others) == k and not undecided(q, others):
            out_q.append(q | {"id": f"{q['id']}-contrast", "contrast": True})
            out_p.append(others)
            n -= 1
    return out_q, out_p


def near_miss(row: dict) -> bool:
    """A question whose retrieved passages are about the right things and do not state its answer (an answerable one's
    not retrieved, or a life's `unstated` year): the right reply abstains. What the assistant meets most; an
    unanswerable question's passages are unrelated."""
    return row["abstain"] and row["kind"] != "unanswerable"


def check_share(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}={value}: expected a share between 0 and 1")


def balance(rows: list[dict], limit: int, near_miss_share: float | None) -> list[dict]:
    """`limit` rows of which `near_miss_share` are near misses (as near as the pool allows), in the pool's order; with
    no share, the first `limit` as they come (about 8% near misses on the demo)."""
    if near_miss_share is None:
        return rows[:limit]
    check_share("data.near_miss_share", near_miss_share)
    misses = [r for r in rows if near_miss(r)][: round(limit * near_miss_share)]
    others = [r for r in rows if not near_miss(r)][: limit - len(misses)]
    kept = {id(r) for r in misses + others}
    return [r for r in rows if id(r) in kept]


def build_grounded(cfg, out: Path) -> dict:
    """`data.rows` rows of the grounded task from the train split of `evaluate.qa` (one phrasing per fact, spread
    over question kinds), with `evaluate.k` passages from the retriever in `evaluate.mode`; written as JSONL. With
    `data.near_miss_share`, a pool of three times as many questions is retrieved for, to draw that share of near
    misses from; with `data.unanswerable_share`, that share of the questions has no answer. With
    `data.counterfactual_share`, that share of the rows has a changed fact in its passages
    (`tandem.facts.counterfactuals`); with `data.contrast_share`, that share is an answerable question asked again
    without its gold passage (`contrasted`). Questions whose label is `undecided` are left out and counted; so are the
    kinds in `data.skip_kinds`, uncounted."""
    from tandem.datasets import write_jsonl
    from tandem.facts import counterfactuals, read_corpus

    e, d = cfg.evaluate, cfg.data
    # a question whose answer is a whole document and no sentence of it cannot be labelled: left out
    train = [q for q in load_qa(e.qa, "train")
             if (q["answers"] or not q["gold_docs"]) and q["kind"] not in d.skip_kinds]
    if not any(q["answers"] for q in train):
        raise ConfigError(f"evaluate.qa={e.qa} has no questions with reference answers outside data.skip_kinds="
                          f"{list(d.skip_kinds)} (whole documents answer a QA set such as faq_qa), so no grounded "
                          "reply can be labelled from it: use a span QA set such as wiki_qa")
    for key in ("counterfactual_share", "contrast_share", "unanswerable_share"):
        if d[key] is not None:
            check_share(f"data.{key}", d[key])
    questions = pick(one_per_fact(train), d.rows * (3 if d.near_miss_share is not None else 1), d.unanswerable_share)
    corpus = Path(e.qa) / "corpus"
    passages = passages_for(cfg, [corpus], questions, e.collection, e.k + 1 if d.contrast_share else e.k, e.mode)
    questions, passages = contrasted(questions, passages, e.k, round(d.rows * d.contrast_share))
    if d.counterfactual_share:
        questions, passages = counterfactuals(questions, passages, read_corpus(corpus),
                                              round(d.rows * d.counterfactual_share))
    decided = [(q, ps) for q, ps in zip(questions, passages) if not undecided(q, ps)]
    rows = balance(grounded_rows([q for q, _ in decided], [ps for _, ps in decided]), d.rows, d.near_miss_share)
    kinds = sorted({r["kind"] for r in rows})
    return {"rows": write_jsonl(out, rows), "undecided": len(questions) - len(decided),
            "abstain": sum(r["abstain"] for r in rows),
            "near_misses": sum(map(near_miss, rows)), "counterfactual": sum(r["counterfactual"] for r in rows),
            "contrast": sum(r["contrast"] for r in rows),
            **{kind: sum(r["kind"] == kind for r in rows) for kind in kinds}}
