"""Answer quality as users see it: QA sets split by document, per-answer metrics, and the decision matrix job."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import regex

from tandem.answers import Reply, compare, comparisons, score_answer, summarize, verdict
from tandem.datasets import faq_qa, split_of, wiki_qa, wiki_questions, wiki_source
from tandem.facts import states
from tandem.prompts import answer_format, parse_rag_answer
from tandem.qa import load_qa
from tandem.structured import response_regex

DATA = Path(__file__).parent / "data"
PASSAGES = [{"doc_id": "Kubrick", "text": "Stanley Kubrick was an American filmmaker."},
            {"doc_id": "2001", "text": "2001: A Space Odyssey is a 1968 film directed by Stanley Kubrick."}]


def test_answer_metrics():
    right = score_answer(Reply.parse('{"answer": "2001: A Space Odyssey", "sources": [2]}'),
                         ["2001: A Space Odyssey"], ["2001"], PASSAGES)
    assert right == {**right, "valid": 1.0, "exact": 1.0, "contains": 1.0, "citation_precision": 1.0,
                     "citation_recall": 1.0, "retrieved_gold": 1.0, "false_abstention": 0.0}
    assert right["grounded"] == 1.0  # every content word of the answer is in the cited passage
    wrong = score_answer(Reply.parse('{"answer": "Stanley Kubrick was a filmmaker.", "sources": [1]}'),
                         ["2001: A Space Odyssey"], ["2001"], PASSAGES)
    assert wrong["contains"] == wrong["exact"] == 0.0 and wrong["citation_precision"] == 0.0
    assert wrong["citation_recall"] == 0.0 and wrong["grounded"] == 1.0  # grounded, but in the wrong passage
    loose = score_answer(Reply.parse("It is 2001: A Space Odyssey, I think."), ["2001: A Space Odyssey"], ["2001"],
                         [])
    assert loose["valid"] == 0.0 and loose["contains"] == 1.0 and "citation_precision" not in loose
    abstain = Reply.parse('{"answer": "", "sources": []}')
    assert score_answer(abstain, [], [], PASSAGES) == {"valid": 1.0, "answerable": False, "abstained": 1.0}
    assert score_answer(Reply.parse('{"answer": "Paris", "sources": [1]}'), [], [], PASSAGES)["abstained"] == 0.0
    assert summarize([right, wrong])["contains"] == {"mean": 0.5, "n": 2}
    # a document answers it (the FAQ's): no reference words to match, scored on citing the document and grounding
    cited = score_answer(Reply.parse('{"answer": "a 1968 film", "sources": [2]}'), [], ["2001"], PASSAGES)
    assert cited == {**cited, "answerable": True, "citation_precision": 1.0, "false_abstention": 0.0, "grounded": 1.0}
    assert not {"exact", "f1", "contains", "abstained"} & set(cited)
    assert score_answer(abstain, [], ["2001"], PASSAGES)["false_abstention"] == 1.0
    # accents folded: an answer in plain letters names the same painter
    painter = score_answer(Reply.parse('{"answer": "Eugene Delacroix", "sources": [1]}'), ["Eugène Delacroix"],
                           ["Liberty"], [{"doc_id": "Liberty", "text": "A painting by Eugène Delacroix."}])
    assert painter["exact"] == painter["contains"] == painter["grounded"] == 1.0


def test_arms_name_a_model_then_optional_rag_and_guided_decoding():
    from tandem.arms import Arm, parse_arm
    from tandem.errors import ConfigError

    assert parse_arm("base+rag+guided", None) == Arm(None, True, True)
    assert parse_arm("tuned+rag", "grounded_qa@2") == Arm("grounded_qa@2", True, False)
    assert parse_arm("x@3+guided", None) == Arm("x@3", False, True)
    for bad in ("base+rag+rag", "base+json", "tuned", "gpt"):
        with pytest.raises(ConfigError, match="arm"):
            parse_arm(bad, None)
    from jobs.evaluate import main as evaluate_main

    # freshness changes facts in what the RAG arms search: without one, refused before anything loads
    with pytest.raises(ConfigError, match=r"evaluate.freshness=3 changes facts .* has none \(add base\+rag"):
        evaluate_main(["evaluate.freshness=3", "evaluate.arms=[base]"])
    with pytest.raises(ConfigError, match="evaluate.min_abstention=0.8 picks a calibrated threshold: it needs"):
        evaluate_main(["evaluate.min_abstention=0.8"])


def test_paired_bootstrap_claims_only_real_differences():
    a = [{"contains": float(i % 2)} for i in range(60)]
    better = [{"contains": 1.0} for _ in range(60)]
    same = [{"contains": float((i + 1) % 2)} for i in range(60)]
    assert compare(a, better, "contains")["significant"] and compare(a, better, "contains")["delta"] == 0.5
    flat = compare(a, same, "contains")
    assert not flat["significant"] and flat["low"] < 0 < flat["high"]
    # a named version against the tuned adapter with the same passages: is the candidate better than production?
    compared = comparisons({"grounded_qa@1+rag": a, "tuned+rag": better, "grounded_qa@1": same}, samples=500)
    assert [(c["from"], c["to"], c["metric"]) for c in compared] == [("grounded_qa@1+rag", "tuned+rag", "contains")]
    assert verdict({}, compared)[0].startswith("the tuned adapter adds correctness to grounded_qa@1+rag (+0.50")
    # any arm held to the format against the same arm free: what constrained decoding changes for this model
    valid = [{"valid": 1.0, "contains": float(i % 2)} for i in range(60)]
    compared = comparisons({"tuned+rag": [{**r, "valid": 0.0} for r in valid], "tuned+guided+rag": valid}, samples=500)
    assert [(c["from"], c["to"], c["metric"]) for c in compared] == [("tuned+rag", "tuned+guided+rag", "contains"),
                                                                      ("tuned+rag", "tuned+guided+rag", "valid")]
    assert verdict({}, compared)[1].startswith("missing behaviour: constrained decoding adds format validity to "
                                               "tuned+rag (+1.00")


def test_abstention_is_steered_only_on_the_reply_and_above_its_threshold():
    """While a row has written the abstention reply's first tokens, its next one is forced where the model gives it at
    least the threshold, and the probability is returned; off the reply nothing changes and nothing is returned."""
    import torch

    from tandem.abstention import Abstention

    reply = (5, 7, 9)
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.1, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0]) + 1e-12)
    steered = logits.clone()
    assert Abstention(reply, 0.25).steer([5], steered) == pytest.approx(0.3, abs=1e-6)
    assert steered.argmax() == 7 and torch.isinf(steered).sum() == 9  # forced: 0.3 >= 0.25, though 2 ties it
    kept = logits.clone()
    assert Abstention(reply, 0.5).steer([5], kept) == pytest.approx(0.3, abs=1e-6) and torch.equal(kept, logits)
    assert Abstention(reply).steer([5], kept) is not None and torch.equal(kept, logits)  # measured, never forced
    assert Abstention(reply, 0.01).steer([5, 8], kept) is None and torch.equal(kept, logits)  # left the reply
    assert Abstention(reply, 0.01, eos=0).steer([5, 7, 9], kept) is None  # the reply is written: it ends
    assert kept.argmax() == 0 and torch.isinf(kept).sum() == 9
    with pytest.raises(ValueError, match="abstain threshold 1.5: expected a probability in"):
        Abstention(reply, 1.5)


def test_calibration_picks_the_threshold_that_answers_the_most_questions_right():
    """Per question: the probability the model gave abstaining, whether greedy decoding abstained, and whether its
    answer was right (None: unanswerable). Unanswerable questions score high, a wrong answer scores between."""
    from tandem.abstention import calibrate

    scores = [0.40, 0.35, 0.9, 0.05, 0.10, 0.30, 0.20]
    abstained = [False, False, True, False, False, False, False]
    right = [None, None, None, 1.0, 1.0, 0.0, 1.0]
    found = calibrate(scores * 10, abstained * 10, right * 10, samples=200)
    # abstains on both unanswerables it answered: 6 of 7 right; abstaining on the wrong answer too (0.30) gains
    # nothing, as an answerable question is right only when answered right, and ties go to the higher threshold
    assert found.threshold == found.best[0] == 0.35
    assert found.curve[0] == (None, 4 / 7, 1 / 3)  # greedy: 3 answers right, 1 abstention of 3
    assert found.best[1:] == (6 / 7, 1.0) == dict((t, (r, a)) for t, r, a in found.curve)[0.35]
    assert found.gain["delta"] == round(2 / 7, 4) and found.gain["significant"]  # 70 questions, 20 more right
    few = calibrate(scores, abstained, right, samples=200)  # 7 questions: 2 more right is not enough
    assert few.best[0] == 0.35 and few.threshold is None
    assert calibrate([0.1, 0.6] * 20, [False, True] * 20, [1.0, None] * 20).threshold is None  # nothing beats greedy
    assert calibrate([0.5, 0.5] * 20, [False, False] * 20, [None, 0.0] * 20).threshold == 0.5  # ties: the higher
    with pytest.raises(ValueError, match=r"one score, abstention, outcome .* per question: got 2, 1, 2, 0"):
        calibrate([0.1, 0.2], [False], [None, 1.0])


def test_calibration_meets_an_asked_abstention_at_the_least_cost_in_answers():
    """`min_abstention`: the threshold answering the most answerable questions right among those abstaining on at
    least that share of the unanswerable ones, recorded even where it answers no more right than greedy decoding."""
    from tandem.abstention import calibrate

    # unanswerable questions at 0.40, 0.15 and 0.12, below two and three right answers; a wrong answer at 0.50
    scores = [0.40, 0.15, 0.12, 0.50, 0.05, 0.10, 0.20, 0.30]
    right = [None, None, None, 0.0, 1.0, 1.0, 1.0, 1.0]
    args = (scores * 10, [False] * 80, right * 10)
    assert calibrate(*args, samples=200).best[:3] == (0.40, 5 / 8, 1 / 3)  # the most right: abstains on a third
    asked = calibrate(*args, samples=200, min_abstention=0.6)
    assert asked.best == (0.15, 4 / 8, 2 / 3)  # the highest τ reaching 0.6: two right answers traded for it
    assert asked.gain["delta"] == 0.0 and asked.threshold == 0.15 and asked.min_abstention == 0.6  # as greedy
    met = calibrate([0.1, 0.6] * 20, [False, True] * 20, [1.0, None] * 20, min_abstention=0.9)
    assert met.threshold is None  # greedy decoding already abstains on all of them
    with pytest.raises(ValueError, match="min_abstention 0: expected a probability"):
        calibrate(*args, min_abstention=0)
    with pytest.raises(ValueError, match="min_abstention 0.8 needs unanswerable questions"):
        calibrate([0.1, 0.2], [False, False], [1.0, 0.0], min_abstention=0.8)


def test_calibration_lowers_the_threshold_where_retrieval_scored_low():
    """Unanswerable questions whose top passage scored low (dense and BM25 disagreed), at a probability below that
    of right answers over a well-found passage: no single threshold separates them, a threshold that moves with the
    top passage's score does. The rule is recorded as a tag and holds for the search mode it was fitted on."""
    from tandem.abstention import Threshold, calibrate

    scores, top = [0.2, 0.2, 0.3, 0.3, 0.6], [0.016, 0.016, 0.0328, 0.0328, 0.0328]
    right = [None, None, 1.0, 1.0, None]
    found = calibrate(scores * 10, [False] * 50, right * 10, samples=200, top_scores=top * 10)
    assert found.single == 3 / 5 and found.best[1] == 1.0 and found.gain["significant"]
    assert found.retrieval_weight > 0 and found.top_score == 0.0328
    rule = found.rule("hybrid")
    assert rule.at(0.0328, "hybrid") == rule.threshold > 0.3  # the right answers stay answered
    assert rule.at(0.016, "hybrid") == pytest.approx(0.2)  # the unanswerable ones abstain
    assert rule.at(0.016, "dense") == rule.at(None, "hybrid") == rule.threshold  # fitted on hybrid scores only
    assert Threshold.parse(rule.tag()) == rule and Threshold.parse("0.25") == Threshold(0.25)
    assert Threshold(0.25).tag() == "0.25" and Threshold(0.25).to_dict() == {"threshold": 0.25}
    assert calibrate(scores * 10, [False] * 50, right * 10, samples=200).retrieval_weight == 0.0
    with pytest.raises(ValueError, match="retrieval weight 3.0 needs the top score and search mode"):
        Threshold(0.5, 3.0)


def test_calibration_withholds_answers_the_cited_passages_do_not_hold():
    """A year the passages never give ("When was Charles Babbage born?" over a summary without one), at a probability
    of abstaining no lower than right answers': no threshold separates them, the passages do. The rule withholds such
    an answer (the reply abstains) and keeps a grounded one, an abstention and a reply out of the format."""
    from tandem.abstention import Threshold, calibrate
    from tandem.prompts import rag_answer

    babbage = ["Charles Babbage was an English polymath and mechanical engineer."]
    rule = Threshold(0.3, min_grounded=1.0)
    assert rule.reply(rag_answer("1791", [1]), babbage) == rag_answer("", [])
    assert rule.reply(rag_answer("1791", [2]), babbage) == rag_answer("", [])  # cites a passage never given
    for kept in (rag_answer("mechanical engineer", [1]), rag_answer("", []), "Babbage was born in 1791."):
        assert rule.reply(kept, babbage) == kept
    assert Threshold(0.3).reply(rag_answer("1791", [1]), babbage) == rag_answer("1791", [1])  # no grounding asked
    assert Threshold.parse(rule.tag()) == rule and rule.to_dict() == {"threshold": 0.3, "min_grounded": 1.0}
    with pytest.raises(ValueError, match="min_grounded 0"):
        Threshold(0.3, min_grounded=0.0)

    scores, right, grounded = [0.1, 0.1, 0.1, 0.1], [None, None, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]
    found = calibrate(scores * 10, [False] * 40, right * 10, samples=200, grounded=grounded * 10)
    assert found.min_grounded is not None and found.best[1:] == (3 / 4, 1.0) and found.greedy == (1 / 4, 0.0)
    assert found.rule("hybrid") == Threshold(1.0, min_grounded=found.min_grounded)  # τ 1: abstain where greedy does
    assert calibrate(scores * 10, [False] * 40, right * 10, samples=200).min_grounded is None


def test_wiki_qa_is_split_by_document_with_unanswerable_questions(tmp_path):
    stats = wiki_qa(tmp_path, str(wiki_source()))
    rows = [json.loads(line) for line in (tmp_path / "qa.jsonl").read_text().splitlines()]
    splits = defaultdict(set)
    for r in rows:
        splits[r["split"]].add(r["doc_id"])
        assert r["split"] == split_of(r["doc_id"])
    assert not splits["train"] & splits["test"] and not splits["train"] & splits["dev"]
    indexed = {json.loads(line)["id"] for line in (tmp_path / "corpus" / "wiki.jsonl").read_text().splitlines()}
    assert stats["documents"] == len(indexed)
    kinds = {r["kind"] for r in rows if r["split"] == "test"}
    assert kinds == {"title", "year", "person", "place", "unanswerable", "unstated"}
    for r in rows:
        if r["kind"] == "unanswerable":  # its article is not indexed: the right reply abstains
            assert r["answers"] == r["gold_docs"] == [] and r["doc_id"] not in indexed
        elif r["kind"] == "unstated":  # its article is indexed and does not say: the right reply abstains too
            assert r["answers"] == r["gold_docs"] == [] and r["doc_id"] in indexed
        else:
            assert r["gold_docs"] == [r["doc_id"]] and r["doc_id"] in indexed and r["answers"]
            assert not any(states(r["question"], a) for a in r["answers"])  # the passage is needed
    unanswerable = Counter(r["split"] for r in rows if r["kind"] == "unanswerable")
    assert unanswerable["test"] > 150 and unanswerable["dev"] > 150  # the splits asked hold out a quarter, not 5%
    kubrick = [r["question"] for r in rows if r["doc_id"] == "2001: A Space Odyssey"]
    assert len(kubrick) >= 6 and "Who directed 2001: A Space Odyssey?" in kubrick  # 3 kinds x 2 phrasings
    assert not any(r["question"].startswith("When was Snow White and the Seven Dwarfs (1937 film)") for r in rows)


def test_a_country_named_another_way_is_a_right_answer():
    def answers(desc: str) -> list[str]:
        v = {"title": "Houston", "extract": f"Houston is a city in {desc.split(', ')[-1]}.", "description": desc}
        [q] = [q for q in wiki_questions("houston", v, False, Counter(), random.Random(0), 1) if q["kind"] == "place"]
        return q["answers"]

    us = answers("City in Texas, United States")
    assert us[0] == "United States" and {"US", "USA"} <= set(us)  # the description's name first: the label
    assert answers("City in Texas, U.S.")[:2] == ["U.S.", "United States"] and answers("Town in Mali, Mali") == ["Mali"]
    passages = [{"doc_id": "Houston", "text": "Houston is a city in the United States."}]
    for said in ("U.S.", "the USA", "United States of America"):
        reply = Reply.parse(json.dumps({"answer": said, "sources": [1]}))
        assert score_answer(reply, us, ["Houston"], passages)["contains"] == 1.0, said


def test_a_life_s_years_are_asked_only_where_the_summary_says_they_are_a_life_s():
    def years(extract: str, desc: str = "French novelist (1840–1902)", kind: str = "year") -> dict:
        v = {"title": "Émile Zola", "extract": extract, "description": desc, "topic": "People"}
        return {q["question"]: q["answers"] for q in wiki_questions("zola", v, False, Counter(), random.Random(0), 1)
                if q["kind"] == kind}

    life = {"In what year was Émile Zola born?": ["1840"], "In what year did Émile Zola die?": ["1902"]}
    # the years are there, but as other events': the passage does not answer, so one of them is asked as a question
    # whose right reply abstains (one a person)
    nominated = "Zola was nominated for the Nobel Prize in 1901 and 1902, and wrote of Paris in 1840."
    unstated = years(nominated, kind="unstated")
    assert years(nominated) == {} and len(unstated) == 1 and unstated.items() <= life.items()
    assert years("Émile Zola (1840–1902) was a French novelist.", kind="unstated") == {}
    assert years("Émile Zola (1840–1902) was a French novelist.") == life
    assert years("Zola, born in Paris in 1840, wrote novels until his death in 1902.") == life
    assert years("Zola (1840/41–1902/03) was a novelist.") == life
    assert years("Zola, born in 1840, led the movement until his assassination in 1902.") == life
    assert years("Zola (1840–1895) was born in Paris; he was nominated in 1902.") == {}  # another span, no year after
    assert years("Zola died in Paris. He was nominated for the Nobel Prize in 1902.") == {}  # a sentence apart


def test_faq_qa_asks_each_heading_in_two_wordings_and_holds_some_entries_out(tmp_path):
    stats = faq_qa(tmp_path, str(DATA / "python_faq"))
    rows = load_qa(tmp_path, "all")
    entries = {d["id"]: " ".join(d["text"].split()) for d in map(json.loads, (tmp_path / "corpus" / "faq.jsonl")
                                                                    .read_text().splitlines())}
    indexed = set(entries)
    assert stats["questions"] == len(rows) and stats["documents"] == len(indexed) < 178
    for r in rows:
        assert r["split"] == split_of(r["doc_id"], test=0.4)
        # the reference is the entry's first sentence, where it answers in one: a sentence of the indexed entry
        assert all(a in entries[r["doc_id"]] and len(a.split()) >= 6 for a in r["answers"])
        assert r["kind"] == "faq" or r["answers"] == []
        assert (r["kind"], r["gold_docs"]) == (("faq", [r["doc_id"]]) if r["doc_id"] in indexed
                                               else ("unanswerable", []))
    assert {r["kind"] for r in rows} == {"faq", "unanswerable"} and len(load_qa(tmp_path, "test")) < len(rows)
    assert 0.5 < sum(bool(r["answers"]) for r in rows if r["kind"] == "faq") / stats["questions"] < 0.9
    fast = next(r for r in rows if r["question"] == "How fast are exceptions?")
    assert fast["answers"] == ["A try/except block is extremely efficient if no exceptions are raised."]
    assert [r["answers"] for r in rows if r["question"] == "Why are floating-point calculations so inaccurate?"] \
        == [[]]  # its entry leads with an example
    blocking = [r["question"] for r in rows if "blocking in the connect()" in r["question"]]
    assert blocking == ["How do I avoid blocking in the connect() method of a socket?",
                        "What is the way to avoid blocking in the connect() method of a socket?"]


def test_the_grounded_task_needs_reference_answers(tmp_path):
    from jobs.prepare_data import main as prepare_main
    from tandem.errors import ConfigError

    faq_qa(tmp_path, str(DATA / "python_faq"))
    qa = tmp_path / "qa.jsonl"  # a QA set whose answers are whole documents only
    qa.write_text("".join(json.dumps({**json.loads(line), "answers": []}) + "\n"
                          for line in qa.read_text().splitlines()))
    with pytest.raises(ConfigError, match="no questions with reference answers"):
        prepare_main(["data.dataset=grounded_qa", f"evaluate.qa={tmp_path}", f"data.out={tmp_path / 'out'}"])


def test_question_kinds_can_be_left_out_of_the_grounded_task(small_qa, tmp_path):
    from jobs.prepare_data import main as prepare_main
    from tandem.errors import ConfigError

    answerable = ["title", "year", "person", "place"]  # wiki_qa's kinds with reference answers: none left to label
    with pytest.raises(ConfigError, match=r"no questions with reference answers outside data.skip_kinds=\['title'"):
        prepare_main(["data.dataset=grounded_qa", f"evaluate.qa={small_qa}",
                      f"data.skip_kinds=[{','.join(answerable)}]", f"data.out={tmp_path / 'out'}"])


def test_a_share_outside_0_1_is_refused_before_retrieval(small_qa, tmp_path):
    from jobs.prepare_data import main as prepare_main
    from tandem.errors import ConfigError

    for key in ("counterfactual_share", "contrast_share", "unanswerable_share"):
        with pytest.raises(ConfigError, match=rf"data.{key}=1.5: expected a share between 0 and 1"):
            prepare_main(["data.dataset=grounded_qa", f"evaluate.qa={small_qa}", f"data.{key}=1.5",
                          f"data.out={tmp_path / 'out'}"])


def test_a_fact_is_changed_only_where_the_passage_then_states_the_new_one_alone():
    from tandem.facts import changed_facts

    docs = {"dresden": "Dresden is the capital of the German state of Saxony in Germany.",
            "timbuktu": "Timbuktu is a city in Mali, 20 km north of the Niger River.",
            "madurai": "Madurai is a city in the Indian state of Tamil Nadu, India.",
            "constantine": "Constantine is the capital of Constantine Province in Algeria.",
            "gdansk": "Gdansk is a city on the Baltic coast of Poland."}
    questions = [{"kind": "place", "question": f"In which country is {d.title()}?", "answers": [a], "gold_docs": [d]}
                 for d, a in (("dresden", "Germany"), ("timbuktu", "Mali"), ("madurai", "India"),
                              ("gdansk", "Poland"))]
    questions.append({"kind": "place", "question": "In which country is Constantine, Algeria?", "answers": ["Algeria"],
                      "gold_docs": ["constantine"]})
    facts = changed_facts(questions, {k: {"id": k, "text": t} for k, t in docs.items()}, 5)
    # Dresden still says German, Madurai Indian (and "India" in "Indian" is not India), Constantine's question names
    # Algeria: only Timbuktu and Gdansk can carry a new country consistently
    assert [f["doc"]["id"] for f in facts] == ["timbuktu", "gdansk"]
    for f in facts:
        new, (old,) = f["question"]["answers"][0], f["question"]["stale"]
        assert new in f["doc"]["text"] and old not in f["doc"]["text"] and new != old


def test_counterfactual_rows_cite_the_changed_fact_their_passage_states():
    """A counterfactual row's passage of the gold document says a new fact, and its label is that fact cited; a
    question whose gold passage was not retrieved is left as it was (a near miss: the reply abstains)."""
    from tandem.facts import counterfactuals
    from tandem.qa import grounded_rows

    docs = {"timbuktu": "Timbuktu is a city in Mali, 20 km north of the Niger River.",
            "gdansk": "Gdansk is a city on the Baltic coast of Poland.",
            "dakar": "Dakar is the capital of Senegal."}
    questions = [{"id": f"q-{d}", "kind": "place", "question": f"In which country is {d.title()}?", "answers": [a],
                  "gold_docs": [d]} for d, a in (("timbuktu", "Mali"), ("gdansk", "Poland"), ("dakar", "Senegal"))]
    passages = [[{"doc_id": "dakar", "text": docs["dakar"]}, {"doc_id": "timbuktu", "text": docs["timbuktu"]}],
                [{"doc_id": "gdansk", "text": docs["gdansk"]}],
                [{"doc_id": "gdansk", "text": docs["gdansk"]}]]  # Dakar's own passage was not retrieved
    qs, ps = counterfactuals(questions, passages, {k: {"id": k, "text": t} for k, t in docs.items()}, 5)
    rows = grounded_rows(qs, ps)
    assert [r["counterfactual"] for r in rows] == [True, True, False]
    assert ps[0][0] == passages[0][0] and ps[2] == passages[2]  # other documents' passages are left alone
    for row, q, p, old in zip(rows[:2], qs, ps, ("Mali", "Poland")):
        new = q["answers"][0]
        assert new != old and q["stale"] == [old]
        cited = next(x for x in p if x["doc_id"] == q["gold_docs"][0])["text"]
        assert new in cited and old not in cited
        assert json.loads(row["messages"][-1]["content"])["answer"] == new
    assert json.loads(rows[2]["messages"][-1]["content"]) == {"answer": "", "sources": []}


def test_decision_matrix_on_held_out_questions_and_fresh_facts(ray_cluster, milvus_server, serve_cfg, small_qa,
                                                              tmp_path):
    """jobs.evaluate end to end on a small QA set: each arm answers the same test-split questions through the
    serving prompt and retriever; the report has every metric, intervals, a verdict and an MLflow run. With
    evaluate.freshness, changed facts are re-indexed into a collection of their own and asked again."""
    from pymilvus import MilvusClient

    from jobs.evaluate import main as evaluate_main
    from jobs.report import main as report_main
    from tandem.registry import Registry

    out = tmp_path / "report.json"
    report = evaluate_main([f"evaluate.qa={small_qa}", f"store.uri={milvus_server}", "adapter=demo@1",
                            "evaluate.collection=qa_small", "evaluate.max_questions=8", "evaluate.max_new_tokens=16",
                            "evaluate.arms=[base,base+rag,base+rag+guided,tuned+rag,demo@1+rag]",
                            "evaluate.bootstrap=200",
                            "evaluate.freshness=3", f"evaluate.output={out}",
                            "embedder.num_cpus=0.5"])  # fits beside a running app
    assert report["questions"] == 8 and set(report["arms"]) == {"base", "base+rag", "base+rag+guided", "tuned+rag",
                                                                "demo@1+rag"}
    rag = report["arms"]["base+rag"]["all"]
    assert rag["retrieved_gold"]["mean"] >= 0.5  # whole questions find their article
    assert "retrieved_gold" not in report["arms"]["base"]["all"]  # no retrieval, no passages to cite
    assert all(0 <= v["mean"] <= 1 for s in report["arms"].values() for v in s["all"].values())
    assert {c["metric"] for c in report["comparisons"]} >= {"contains", "valid"}
    assert report["verdict"] and all(s["latency_ms"] > 0 for s in report["arms"].values())
    answers = [json.loads(a) for a in out.with_suffix(".answers.jsonl").read_text().splitlines()]
    assert len(answers) == 5 * 8 and len({a["id"] for a in answers}) == 8
    # constrained decoding: every guided answer is the answer's shape (citing only passages it was given), or, where
    # max_tokens (16 here) cut it, the start of one; the free base answers beside it are neither
    shape = response_regex(answer_format(3))
    for arm in ("base+rag", "base+rag+guided"):
        replies = [a["reply"] for a in answers if a["arm"] == arm]
        prefixes = [regex.fullmatch(shape, r, partial=True) is not None for r in replies]
        assert all(prefixes) if arm.endswith("guided") else not any(prefixes), (arm, replies)
    parsed = [parse_rag_answer(a["reply"]) for a in answers if a["arm"] == "base+rag+guided"]
    assert any(parsed) and all(set(p["sources"]) <= {1, 2, 3} for p in parsed if p)
    assert any(c["step"] == "constrained decoding" and c["metric"] == "valid" for c in report["comparisons"])
    runs = Registry.from_config(serve_cfg).client.search_runs(
        [Registry.from_config(serve_cfg).experiment_id], "tags.kind = 'evaluation'")
    assert runs and {"base_rag.contains", "demo:1_rag.contains"} <= set(runs[0].data.metrics)
    # a named version is compared with the tuned arm of the same passages (here the same adapter: no difference)
    same = [c for c in report["comparisons"] if c["from"] == "demo@1+rag" and c["to"] == "tuned+rag"]
    assert same and all(c["delta"] == 0 and not c["significant"] for c in same)
    assert "freshness.base_rag.new" in runs[0].data.metrics

    # freshness: "Who wrote Dracula?" now has another author in its (re-indexed) article
    fresh = report["freshness"]
    assert fresh["questions"] == 3 and fresh["retrieved_new"] >= 2 / 3, fresh
    assert fresh["arms"]["base"]["new"] == 0, fresh  # without retrieval, a fact changed today cannot be known
    assert all(0 <= s[k] <= 1 for s in fresh["arms"].values() for k in ("new", "old"))
    assert all(set(c["replies"]) == set(report["arms"]) for c in fresh["changes"])  # every arm asked again
    users = MilvusClient(uri=milvus_server)
    try:  # the collection users query keeps the real facts
        change = fresh["changes"][0]
        stored = users.query("qa_small", filter=f'doc_id == "{change["doc_id"]}"', output_fields=["text"])
        changed = users.query("qa_small_fresh", filter=f'doc_id == "{change["doc_id"]}"', output_fields=["text"])
        rows = [users.query(c, output_fields=["count(*)"])[0]["count(*)"] for c in ("qa_small", "qa_small_fresh")]
    finally:
        users.close()
    assert change["old"][0] in " ".join(r["text"] for r in stored)
    assert change["new"] in " ".join(r["text"] for r in changed)
    assert rows[0] == rows[1] > 300  # a copy of the QA set's collection, its changed documents re-indexed

    # route `assistant` (conf/serve.yaml) names adapter grounded_qa, never registered here: RAG first, no traceback
    page = report_main(["route=assistant", f"report.evaluate={out}", f"report.output={tmp_path / 'report.html'}"])
    text = page.read_text()
    assert "Answer quality" in text and report["verdict"][0] in text and "does not exist yet" in text
    assert "3 facts changed and re-indexed" in text


def test_calibration_tags_the_adapter_version_and_its_rag_arms_abstain_by_it(serve_cfg, milvus_server, small_qa,
                                                                             tmp_path):
    """`evaluate.calibrate=true`: tuned + RAG answers undecided, the threshold that answers the most questions right
    is recorded on the adapter version (none where greedy decoding does as well), and from then on the version's arms
    with RAG abstain wherever the model gives abstaining that probability; its arms without RAG are not steered.
    Thresholds are per collection: another corpus's is not used."""
    from jobs.evaluate import main as evaluate_main
    from tandem.abstention import Threshold, threshold_tag
    from tandem.prompts import rag_answer
    from tandem.registry import Registry

    registry = Registry.from_config(serve_cfg)
    here, elsewhere = threshold_tag("qa_small"), threshold_tag("faq")
    common = [f"evaluate.qa={small_qa}", f"store.uri={milvus_server}", "evaluate.collection=qa_small",
              "evaluate.max_questions=6", "evaluate.max_new_tokens=16", "evaluate.bootstrap=50",
              "embedder.num_cpus=0.5"]
    try:
        report = evaluate_main([*common, "adapter=ro@2", "evaluate.split=dev", "evaluate.calibrate=true",
                                f"evaluate.output={tmp_path / 'calibration.json'}"])
        c = report["calibration"]
        assert list(report["arms"]) == ["tuned+rag"] and c["adapter"] == "ro@2" and c["curve"][0]["threshold"] is None
        assert c["right"]["best"] == max(p["right"] for p in c["curve"]) >= c["right"]["greedy"] and "gain" in c
        tags = registry.client.get_model_version("ro", "2").tags
        assert (Threshold.parse(tags[here]).to_dict() if here in tags else None) == c["threshold"]
        assert c["collection"] == "qa_small"
        answers = [json.loads(a) for a in (tmp_path / "calibration.answers.jsonl").read_text().splitlines()]
        assert len(answers) == 6 and all(0 <= a["abstain_score"] <= 1 for a in answers)

        # near 1 at a top passage score of 10, near 0 at any score hybrid search gives: every question abstains
        steep = Threshold(0.999999, retrieval_weight=1000.0, top_score=10.0, mode="hybrid")
        registry.client.set_model_version_tag("ro", "2", here, steep.tag())
        registry.client.set_model_version_tag("ro", "2", elsewhere, "0.99")
        steered = evaluate_main([*common, "adapter=ro@2", "evaluate.arms=[tuned+rag,tuned]",
                                 f"evaluate.output={tmp_path / 'steered.json'}"])
    finally:
        for tag in (here, elsewhere):
            registry.client.delete_model_version_tag("ro", "2", tag)
    assert steered["arms"]["tuned+rag"]["abstain_threshold"] == steep.to_dict()  # qa_small's, not the FAQ's
    assert steered["arms"]["tuned"]["abstain_threshold"] is None
    replies = [json.loads(a) for a in (tmp_path / "steered.answers.jsonl").read_text().splitlines()]
    assert all(r["reply"] == rag_answer("", []) for r in replies if r["arm"] == "tuned+rag"), replies
    assert any(r["reply"] != rag_answer("", []) for r in replies if r["arm"] == "tuned")

