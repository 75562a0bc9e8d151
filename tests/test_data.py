"""Training data: validation reasons, the versioned store, and `jobs.dataset` with the real base tokenizer."""

from __future__ import annotations

import json

import pytest

from jobs.dataset import main as dataset_main
from tandem.config import load_config
from tandem.data.dataset_store import DatasetStore
from tandem.data.validation import validate_rows
from tandem.errors import ConfigError, RejectedDataError


def chat(user: str, answer: str, **extra) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                       **extra})


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def count_words(messages) -> int:
    return sum(len(m["content"].split()) for m in messages)


def cut_words(messages, max_tokens):
    budget = max_tokens - count_words(messages[:-1])
    return None if budget <= 0 else messages[:-1] + [
        {"role": "assistant", "content": " ".join(messages[-1]["content"].split()[:budget])}]


def test_each_bad_row_is_rejected_with_its_reason():
    lines = [
        chat("What is Ray?", "A distributed runtime."),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "no"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        chat("Empty answer?", "   "),
        chat("Long?", words(50)),
        chat("What is Ray?", "A distributed runtime."),  # exact duplicate of line 1
        chat("What is Ray??", "a distributed runtime, I'd say!"),  # near duplicate (one word more)
        json.dumps({"prompt": "Milvus?", "response": "A vector database.", "system": "Be brief."}),
        json.dumps({"text": "no schema"}),
        chat("Send it to me", "Write to jane.doe@example.com with key AKIAABCDEFGHIJKLMNOP"),
    ]
    result = validate_rows(lines, count_words, max_tokens=20, pii="drop", eval_fraction=0.0,
                           near_duplicate_threshold=0.5)
    reasons = {r.line: r.reason for r in result.rejected}
    assert reasons[2].startswith("bad JSON")
    assert reasons[3].startswith("bad schema: a row must be a JSON object")
    assert reasons[4] == "bad role: robot (expected system, user, assistant)"
    assert reasons[5].startswith("bad role order: turns must alternate")
    assert reasons[6].startswith("bad role order: the last turn must be the assistant's")
    assert reasons[7].startswith("empty turn")
    assert reasons[8].startswith("too long: 51 tokens")
    assert reasons[9] == "exact duplicate: exact copy of line 1 (train)"
    assert reasons[10] == "near duplicate: near copy of line 1 (train)"
    assert reasons[12].startswith("bad schema: expected messages")
    assert "email address" in reasons[13] and "AWS Access Key" in reasons[13]
    assert [r["line"] for r in result.rows] == [1, 11]
    assert result.rows[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert result.seen == 13 and len(result.rejected) == 11
    assert "line 8: too long" in result.report()


def test_turns_of_weight_zero_are_context_without_loss(tmp_path):
    from tandem.data.dataset_store import DatasetStore
    from tandem.data.features import IGNORE, chat_features
    from tandem.models import load_tokenizer, prepare_base

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Forged words", "weight": 0},
             {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Served words"}]
    result = validate_rows([json.dumps({"messages": turns}),
                            json.dumps({"messages": [*turns[:3], {**turns[3], "weight": 2}]}),
                            json.dumps({"messages": [*turns[:3], {**turns[3], "weight": 0}]})],
                           count_words, max_tokens=50, eval_fraction=0.0)
    assert [r.reason for r in result.rejected] == [
        "bad schema: message 3 has weight 2; expected 0 (no loss) or 1",
        "bad schema: the last turn has weight 0, so the row would teach nothing"]
    version, _ = DatasetStore(tmp_path).add("w", [{**r, "tokens": 9} for r in result.rows], source="x", rejected=[],
                                            tokenizer="t")
    stored = version.rows()[0]["messages"]
    assert stored == turns  # the weight survives the store, and an absent one stays absent
    m = load_config("finetune").model
    tokenizer = load_tokenizer(prepare_base(m.path, m.cache_dir, m.dtype))
    ids, labels = chat_features(tokenizer, stored, 256)
    learned = tokenizer.decode([t for t in labels if t != IGNORE])
    assert "Served words" in learned and "Forged" not in learned and len(ids) == len(labels)


def test_redact_keeps_the_row_without_the_secret():
    lines = [chat("Who do I mail?",
                  "Write to jane.doe@example.com, card 4111 1111 1111 1111, key AKIAABCDEFGHIJKLMNOP"),
             chat("Order number?", "It is 4111 1111 1111 1112."),  # fails Luhn: not a card, kept as written
             chat("Deploy?", "Use ghp_" + "x1" * 18 + " then set password: hunter2hunter2")]
    result = validate_rows(lines, count_words, max_tokens=40, pii="redact", eval_fraction=0.0)
    answer = result.rows[0]["messages"][-1]["content"]
    assert answer == ("Write to [REDACTED email address], card [REDACTED payment card number], key "
                      "[REDACTED AWS Access Key]")
    assert result.rows[0]["flags"] == ["redacted AWS Access Key", "redacted email address",
                                       "redacted payment card number"]
    assert result.rows[1]["messages"][-1]["content"] == "It is 4111 1111 1111 1112." and not result.rejected
    assert result.rows[2]["messages"][-1]["content"] == ("Use [REDACTED GitHub Token] then set password: "
                                                          "[REDACTED Secret Keyword]")  # detect-secrets' detectors
    assert result.rows[2]["flags"] == ["redacted GitHub Token", "redacted Secret Keyword"]
    with pytest.raises(ConfigError, match="dataset.pii=redcat"):
        validate_rows(lines, count_words, max_tokens=40, pii="redcat")


def test_flag_truncate_near_duplicates_and_split_overlap():
    base = "Ray Data streams blocks of rows between operators so that reading, transforming and writing overlap"
    lines = [
        chat("Tell me about Ray Data", base, split="train"),
        chat("Tell me about Ray Data", base + " nicely", split="eval"),  # near copy across splits
        chat("Card?", "It is 4111 1111 1111 1111."),
        chat("Long?", words(50)),
    ]
    result = validate_rows(lines, count_words, max_tokens=30, pii="flag", on_too_long="truncate",
                           truncate=cut_words, near_duplicate_threshold=0.8)
    reasons = {r.line: r.reason for r in result.rejected}
    assert reasons == {2: "train/eval overlap: near copy of line 1 (train)"}
    kept = {r["line"]: r for r in result.rows}
    assert kept[3]["flags"] == ["payment card number"]
    assert count_words(kept[4]["messages"]) == 30


@pytest.mark.parametrize("threshold", [0.99, 1.0])
def test_near_duplicate_thresholds_up_to_one_find_copies_only(threshold):
    """Thresholds near 1 (the grounded-QA recipe uses 0.99) leave MinHash LSH no banding of its own; copies are
    still found and rows that differ by a word are kept."""
    base = "Ray Data streams blocks of rows between operators so that reading, transforming and writing overlap"
    lines = [chat("Tell me about Ray Data", base), chat("Tell me about Ray Data", base + " nicely"),
             chat("Tell me about Ray Data!", base)]  # punctuation aside, a copy of line 1
    result = validate_rows(lines, count_words, max_tokens=100, near_duplicate_threshold=threshold)
    assert [(r.line, "copy of line 1" in r.reason) for r in result.rejected] == [(3, True)]
    assert [r["line"] for r in result.rows] == [1, 2]
    with pytest.raises(ConfigError, match="near_duplicate_threshold"):
        validate_rows(lines, count_words, max_tokens=100, near_duplicate_threshold=1.5)


def test_store_versions_are_immutable_content_addressed_and_resolvable(tmp_path):
    store = DatasetStore(tmp_path)
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "split": "train", "line": 1, "flags": [], "tokens": 7}]
    v1, new = store.add("demo", rows, source="a.jsonl", rejected=[], tokenizer="tok")
    assert new and v1.manifest()["rows"]["train"] == 1
    again, new = store.add("demo", rows, source="a.jsonl", rejected=[], tokenizer="tok")
    assert not new and again.version == v1.version
    v2, new = store.add("demo", rows + [{**rows[0], "split": "eval", "line": 2}], source="b.jsonl", rejected=[],
                        tokenizer="tok", parent=v1.ref)
    assert new and v2.version != v1.version and v2.manifest()["parent"] == v1.ref
    assert store.resolve("demo@latest").version == v2.version == store.resolve("demo").version
    assert store.resolve(f"demo@{v1.version[:6]}").version == v1.version
    assert store.resolve(v1.ref).rows("train") == rows
    with pytest.raises(LookupError, match="no dataset named"):
        store.resolve("nope@latest")
    with pytest.raises(LookupError, match="no single version"):
        store.resolve("demo@ffffff")
    assert [item["ref"] for item in store.list()] == [v1.ref, v2.ref]
    # the same rows added again (make demo after make train) are what `latest` trains on
    again, new = store.add("demo", rows, source="a.jsonl", rejected=[], tokenizer="tok")
    assert not new and store.resolve("demo@latest").version == v1.version
    assert [item["ref"] for item in store.list()] == [v2.ref, v1.ref]


def test_dataset_job_with_the_base_tokenizer(workdir, tmp_path, capsys):
    good = [chat(f"Question {i} about {topic}?", f"Answer {i}: {topic} is covered in chapter {i}.")
            for i, topic in enumerate(["Ray", "Milvus", "PEFT", "DeepSpeed", "LoRA", "Serve", "Train", "Data"])]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(good + ["{broken", chat("too long", words(3000))]) + "\n")
    manifest = dataset_main(["add", "name=demo", f"path={path}", "dataset.max_tokens=512",
                             "dataset.max_reject_fraction=0.3"])
    assert manifest["rows"]["total"] == 8 and manifest["rows"]["rejected"] == 2
    assert manifest["tokens"]["max"] < 512 and manifest["tokens"]["min"] > 20  # chat template included
    listing = dataset_main(["list"])
    assert listing[-1]["ref"] == f"demo@{manifest['version']}"
    assert dataset_main(["show", "dataset=demo@latest"])["version"] == manifest["version"]

    path.write_text("\n".join(good[:2] + ["{broken"] * 3) + "\n")
    with pytest.raises(RejectedDataError, match="60.0% of rows rejected"):
        dataset_main(["add", "dataset.name=demo", f"dataset.path={path}"])
    assert "bad JSON" in capsys.readouterr().out
    assert len(dataset_main(["list"])) == 1  # nothing stored for the failed batch


def test_alpaca_sharegpt_parquet_and_saved_datasets_pass_the_same_checks(workdir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    alpaca = [{"instruction": f"Name the topic of chapter {i}.", "input": f"Chapter {i} covers {t}.",
               "output": f"{t}."} for i, t in enumerate(["Ray", "Milvus", "PEFT", "LoRA"])]
    sharegpt = [{"conversations": [{"from": "human", "value": f"What does {t} do?"},
                                   {"from": "gpt", "value": f"{t} does its own job, number {i}."}]}
                for i, t in enumerate(["Serve", "Train", "Data", "Tune"])]
    bad = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "x"}]},
           {"instruction": "No output given", "input": ""}]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca + bad[1:]))
    pq.write_table(pa.Table.from_pylist(sharegpt), tmp_path / "sharegpt.parquet")
    DatasetDict({"train": Dataset.from_list(alpaca[:3]), "test": Dataset.from_list(alpaca[3:])}).save_to_disk(
        str(tmp_path / "saved"))
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in sharegpt[:2] + bad[:1]) + "\n")
    store = DatasetStore(workdir / "datasets")

    def add(name: str, path, *more) -> list[dict]:
        manifest = dataset_main(["add", f"name={name}", f"path={path}", "dataset.max_reject_fraction=0.5",
                                 "dataset.eval_fraction=0.0", f"dataset.paths=[{','.join(map(str, more))}]"])
        return [*store.resolve(f"{name}@{manifest['version']}").rows()]

    rows = add("alpaca", tmp_path / "alpaca.json")
    assert [m["content"] for m in rows[0]["messages"]] == ["Name the topic of chapter 0.\n\nChapter 0 covers Ray.",
                                                           "Ray."]
    rejected = (store.resolve("alpaca@latest").path / "rejected.jsonl").read_text()
    assert "bad schema: expected messages, conversations (ShareGPT)" in rejected and '"line": 5' in rejected
    rows = add("sharegpt", tmp_path / "sharegpt.parquet")
    assert len(rows) == 4 and [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    rows = add("saved", tmp_path / "saved")
    assert sorted(r["split"] for r in rows) == ["eval", "train", "train", "train"]  # the test split evaluates
    add("mixed", tmp_path / "mixed.jsonl")
    assert "bad role: observation" in (store.resolve("mixed@latest").path / "rejected.jsonl").read_text()
    # two tasks in one version: every file's rows, each row checked, the sources recorded
    rows = add("two", tmp_path / "alpaca.json", tmp_path / "sharegpt.parquet")
    assert len(rows) == 8 and store.resolve("two@latest").manifest()["source"].endswith("sharegpt.parquet")
    (tmp_path / "rows.csv").write_text("instruction,output\n")
    with pytest.raises(ConfigError, match="expected .jsonl, .json, .parquet"):
        dataset_main(["add", "name=x", f"path={tmp_path / 'rows.csv'}"])


def test_packed_rows_attend_only_to_themselves():
    """Logits of rows packed into one sequence equal each row's logits alone: position ids restart per row and the
    mask transformers builds from them is block-diagonal, so nothing leaks across rows (nor from the padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tandem.data.batches import pack, packed_batch
    from tandem.data.features import IGNORE
    from tandem.models import prepare_base

    m = load_config("finetune").model
    model = AutoModelForCausalLM.from_pretrained(prepare_base(m.path, m.cache_dir, m.dtype).path,
                                                 dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(100, 30000, (n,), generator=gen).tolist()} for n in (9, 5, 3, 7, 12)]
    for r in rows:
        r["labels"] = [IGNORE] * 2 + r["input_ids"][2:]
    bins = pack(rows, 16)
    assert sorted(len(r["input_ids"]) for b in bins for r in b) == [3, 5, 7, 9, 12]
    assert len(bins) == 3 and all(sum(len(r["input_ids"]) for r in b) <= 16 for b in bins)
    batch = packed_batch(bins, pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for i, b in enumerate(bins):
            at = 0
            for r in b:
                n = len(r["input_ids"])
                alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
                torch.testing.assert_close(packed[i, at : at + n], alone, atol=2e-4, rtol=1e-4)
                assert batch["labels"][i, at].item() == IGNORE  # a row never learns the next row's first token
                at += n
            assert (batch["labels"][i, at:] == IGNORE).all()


def test_preference_pairs_pass_the_same_checks_and_keep_their_rejected_answer(workdir, tmp_path):
    from tandem.data.features import build_features
    from tandem.models import load_tokenizer, prepare_base

    pairs = [{"prompt": "What is Ray?", "chosen": "A distributed runtime.", "rejected": "A fish."},
             {"prompt": [{"role": "user", "content": "What is Milvus?"}],  # TRL's conversational form
              "chosen": [{"role": "assistant", "content": "A vector database."}],
              "rejected": [{"role": "assistant", "content": "A bird."}]},
             {"messages": [{"role": "user", "content": "What is PEFT?"}], "chosen": "Adapters.",
              "rejected": "Adapters."},
             {"prompt": "What is LoRA?", "chosen": "Low-rank adaptation."},
             {"prompt": "Mail?", "chosen": "jane.doe@example.com", "rejected": "No idea."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    manifest = dataset_main(["add", "name=pairs", f"path={path}", "dataset.pii=drop", "dataset.eval_fraction=0.0",
                             "dataset.max_reject_fraction=0.7"])
    assert manifest["rows"]["total"] == 2 and manifest["rows"]["preference_pairs"] == 2
    version = DatasetStore(workdir / "datasets").resolve(f"pairs@{manifest['version']}")
    rejected = (version.path / "rejected.jsonl").read_text()
    for reason in ("chosen and rejected are the same answer", "rejected must be text or one assistant message",
                   "likely secret or personal data: email address"):
        assert reason in rejected
    rows = version.rows()
    assert [(r["messages"][-1]["content"], r["rejected"]) for r in rows] == [
        ("A distributed runtime.", "A fish."), ("A vector database.", "A bird.")]
    m = load_config("finetune").model
    base = prepare_base(m.path, m.cache_dir, m.dtype)
    import pyarrow.parquet as pq

    features = pq.read_table(build_features(rows, load_tokenizer(base), 128, tmp_path / "f.parquet")).to_pylist()
    chosen, other = features[0]["input_ids"], features[0]["rejected_input_ids"]
    shared = next(i for i, (a, b) in enumerate(zip(chosen, other)) if a != b)
    assert chosen[:shared] == other[:shared] and shared > 5  # the same prompt, then the two answers
