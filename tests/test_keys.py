"""API keys: stored hashed, scoped, checked on every endpoint of a running app, and revocable without a restart."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import httpx
import openai
import pytest

from jobs.keys import main as keys_main
from tandem.errors import ConfigError
from tandem.keys import AuthError, KeyStore, auth_mode, authenticate, authorize
from tandem.requestlog import read_log


def test_keys_are_stored_hashed_and_scoped(tmp_path):
    path = tmp_path / "keys.json"
    made = keys_main(["create", "name=alice", "scopes=[chat:assistant,feedback]", f"auth.keys_file={path}"])
    token, key_id = made["token"], made["id"]
    stored = path.read_text()
    assert token not in stored and token.split("_", 2)[2] not in stored and key_id in stored
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = KeyStore(path).active()
    key = authenticate(keys, f"Bearer {token}")
    assert key.id == key_id and key.allows("chat:assistant") and not key.allows("chat:chat")
    authorize(key, "feedback")
    with pytest.raises(AuthError, match="lacks the scope 'admin'") as denied:
        authorize(key, "admin")
    assert denied.value.status == 403
    for header in (None, "Basic abc", f"Bearer {token}x", f"Bearer tdk_{key_id}_", "Bearer sk-openai-key"):
        with pytest.raises(AuthError) as refused:
            authenticate(keys, header)
        assert refused.value.status == 401
    admin = keys_main(["create", "name=ops", "scopes=[admin]", f"auth.keys_file={path}"])
    assert authenticate(KeyStore(path).active(), f"Bearer {admin['token']}").allows("chat:anything")
    assert {k["id"] for k in keys_main(["list", f"auth.keys_file={path}"])["keys"]} == {key_id, admin["id"]}
    keys_main(["revoke", f"id={key_id}", f"auth.keys_file={path}"])
    with pytest.raises(AuthError):
        authenticate(KeyStore(path).active(), f"Bearer {token}")
    with pytest.raises(ConfigError, match="bad scopes"):
        keys_main(["create", "name=x", "scopes=[chat]", f"auth.keys_file={path}"])


def test_keyless_serving_only_on_loopback(tmp_path):
    empty = KeyStore(tmp_path / "none.json")
    assert auth_mode(None, "127.0.0.1", empty) == "none"
    with pytest.raises(ConfigError, match="anyone who reaches the port"):
        auth_mode("none", "0.0.0.0", empty)
    with pytest.raises(ConfigError, match="holds no active key"):
        auth_mode(None, "0.0.0.0", empty)  # beyond loopback, keys are the default
    empty.create("svc", ["chat:*"])
    assert auth_mode(None, "0.0.0.0", empty) == "keys"


@pytest.fixture(scope="module")
def secured(base_url, serve_cfg, tmp_path_factory):
    """A second Router, with auth.mode=keys, in front of the session app's LLM and Retriever (its own app on the
    same Serve proxy, under /secured): routes and registry as the session app's."""
    from omegaconf import OmegaConf, open_dict
    from ray import serve

    from serving.router import Router
    from tandem.models import prepare_base

    path = tmp_path_factory.mktemp("keys") / "keys.json"
    store = KeyStore(path)
    tokens = {name: store.create(name, scopes)[1] for name, scopes in {
        "user": ["chat:assistant", "feedback", "retrieve:wiki"], "other": ["chat:assistant", "feedback"],
        "admin": ["admin"]}.items()}
    tokens["tenant"] = store.create("tenant", ["chat:assistant", "retrieve:wiki"], 'meta["topic"] == "Technology"')[1]
    # route `keyed` (base model, its own traffic) is this file's, so its feedback datasets hold only its requests
    cfg = OmegaConf.merge(serve_cfg, {"auth": {"mode": "keys", "keys_file": str(path)},
                                      "serve": {"controller": False, "feedback_per_minute": 4}})
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg.serve.routes):
        cfg.serve.routes.keyed = {"adapter": None}
    OmegaConf.set_readonly(cfg, True)
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    app_name = serve_cfg.serve.app_name
    serve.run(Router.bind(cfg, base, serve.get_deployment_handle("Retriever", app_name),
                          serve.get_deployment_handle("LLM", app_name), None),
              name="secured", route_prefix="/secured")
    yield {"url": f"{base_url}/secured", "tokens": tokens, "store": store, "cfg": cfg}
    serve.delete("secured")


def client(secured, who: str | None) -> openai.OpenAI:
    key = secured["tokens"][who] if who else "sk-not-a-tandem-key"
    return openai.OpenAI(base_url=f"{secured['url']}/v1", api_key=key, max_retries=0, timeout=300)


def ask(c: openai.OpenAI, model: str = "assistant", **extra):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Who directed Alien?"}],
                                     max_tokens=2, **extra)


def test_every_endpoint_asks_for_its_scope(secured):
    with httpx.Client(base_url=secured["url"], timeout=300) as http:
        missing = http.post("/v1/chat/completions", json={"model": "assistant",
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert http.get("/healthz").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        ask(client(secured, None))
    user, admin = client(secured, "user"), client(secured, "admin")
    reply = ask(user)
    assert reply.model_extra["tandem"]["route"] == "assistant"
    with pytest.raises(openai.PermissionDeniedError, match="chat:chat"):
        ask(user, "chat")
    with pytest.raises(openai.PermissionDeniedError, match="admin"):
        ask(user, "demo@3")  # neither production nor canary: a candidate is not for users
    with pytest.raises(openai.PermissionDeniedError, match="admin"):
        ask(user, extra_body={"ignore_eos": True})
    assert ask(admin, "demo@3").model_extra["tandem"]["adapter"] == "demo@3"
    listed = {m.id for m in user.models.list().data}
    assert "assistant" in listed and "demo@1" in listed and "demo@3" not in listed
    assert "demo@3" in {m.id for m in admin.models.list().data}
    headers = {"authorization": f"Bearer {secured['tokens']['user']}"}
    with httpx.Client(base_url=secured["url"], timeout=300, headers=headers) as http:
        assert http.get("/v1/rollouts").status_code == 403
        assert http.post("/v1/retrieve", json={"query": "Alien film", "collection": "wiki"}).status_code == 200
        other = http.post("/v1/retrieve", json={"query": "Alien film", "collection": "qa_small"})
        assert other.status_code == 403 and other.json()["error"]["type"] == "permission_error"


def test_a_keys_filter_bounds_every_retrieval_made_for_it(secured):
    """The tenant key sees Technology articles only: on /v1/retrieve, under a filter of its own, and on a RAG
    route; a filter that would close the key's parentheses is refused."""
    headers = {"authorization": f"Bearer {secured['tokens']['tenant']}"}
    with httpx.Client(base_url=secured["url"], timeout=300, headers=headers) as http:
        def retrieve(**extra):
            return http.post("/v1/retrieve", json={"query": "Alien film", "collection": "wiki", "k": 5, **extra})

        hits = retrieve().json()["data"]
        assert len(hits) == 5 and {h["meta"]["topic"] for h in hits} == {"Technology"}
        assert retrieve(filter='meta["topic"] == "Arts"').json()["data"] == []  # narrowed, never widened
        escape = retrieve(filter='chunk_no >= 0) or (chunk_no >= 0')
        assert escape.status_code == 400 and "unmatched ')'" in escape.json()["error"]["message"]
        quoted = retrieve(filter='title != "a) or (b"')  # a bracket inside a string is text
        assert quoted.status_code == 200 and {h["meta"]["topic"] for h in quoted.json()["data"]} == {"Technology"}
    reply = ask(client(secured, "tenant"))
    sources = reply.model_extra["sources"]
    assert sources and {s["meta"]["topic"] for s in sources} == {"Technology"}
    unbounded = ask(client(secured, "user")).model_extra["sources"]
    assert "Arts" in {s["meta"]["topic"] for s in unbounded}  # the same question, without the filter: Alien is art
    with pytest.raises(ConfigError, match="unclosed"):
        secured["store"].create("bad", ["retrieve:wiki"], 'doc_id in ["a"')


def test_feedback_only_from_the_key_that_asked_and_logs_keep_ids_not_keys(secured):
    reply = ask(client(secured, "user"))
    post = {"request_id": reply.id, "rating": -1, "correction": "Ridley Scott"}
    with httpx.Client(base_url=secured["url"], timeout=300) as http:
        def rate(who: str) -> httpx.Response:
            return http.post("/v1/feedback", json=post, headers={"authorization": f"Bearer {secured['tokens'][who]}"})

        stranger = rate("other")
        assert stranger.status_code == 403 and "another key" in stranger.json()["error"]["message"]
        assert rate("user").status_code == 200
    user_id = authenticate(secured["store"].active(), f"Bearer {secured['tokens']['user']}").id
    logged = [r for r in read_log(secured["cfg"].serve.request_log) if r["request_id"] == reply.id]
    assert logged and logged[0]["key_id"] == user_id
    logs = (secured["cfg"].serve.request_log, secured["cfg"].serve.feedback_log)
    log_bytes = b"".join(p.read_bytes() for root in logs for p in Path(root).glob("date=*/*.jsonl"))
    assert all(token.encode() not in log_bytes for token in secured["tokens"].values())
    feedback = [f for f in read_log(secured["cfg"].serve.feedback_log) if f["request_id"] == reply.id]
    assert [f["key_id"] for f in feedback] == [user_id]  # the stranger's attempt left nothing


def test_a_revoked_key_stops_working_without_a_restart(secured):
    c = client(secured, "other")
    ask(c)
    store = secured["store"]
    key_id = authenticate(store.active(), f"Bearer {secured['tokens']['other']}").id
    store.revoke(key_id)
    deadline = time.monotonic() + 60
    while True:
        try:
            ask(c)
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "a revoked key still answered after 60 s"
        time.sleep(1)


def test_corrections_from_untrusted_keys_wait_for_review_and_feedback_is_rate_limited(secured, tmp_path):
    from jobs.feedback import main as feedback_main
    from jobs.review import main as review_main

    key, token = secured["store"].create("critic", ["chat:keyed", "feedback"])
    c = openai.OpenAI(base_url=f"{secured['url']}/v1", api_key=token, max_retries=0, timeout=300)
    deadline = time.monotonic() + 60
    while True:  # a new key is taken at the router's next refresh
        try:
            replies = [c.chat.completions.create(model="keyed", max_tokens=4, messages=[
                {"role": "user", "content": q}]) for q in ("Name a colour of the sea.", "Who wrote Hamlet?")]
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "a new key was not taken within 60 s"
            time.sleep(1)
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=secured["url"], timeout=300, headers=headers) as http:
        posts = [http.post("/v1/feedback", json={"request_id": r.id, "rating": -1, "correction": f"Fixed {i}"})
                 for i, r in enumerate(replies)]
        assert [p.status_code for p in posts] == [200, 200]
        posts = [http.post("/v1/feedback", json={"request_id": replies[0].id, "rating": 1}) for _ in range(3)]
        assert [p.status_code for p in posts] == [200, 200, 429]  # 4 a minute from one key
        assert int(posts[-1].headers["retry-after"]) > 0 and posts[-1].json()["error"]["type"] == "rate_limit_error"
    # the later rating replaced the first correction; the second correction waits for a person
    common = ["route=keyed", f"feedback.exports={tmp_path}", "dataset.max_reject_fraction=1.0",
              "dataset.eval_fraction=0.0"]
    first = feedback_main([*common, "name=keyed-a"])
    assert first["lineage"]["skipped"]["correction awaiting review"] == 1 and first["rows"]["total"] == 1
    queue = review_main(["list", "route=keyed"])
    assert [q["request_id"] for q in queue] == [replies[1].id] and queue[0]["key_id"] == key.id
    assert queue[0]["correction"] == "Fixed 1"
    review_main(["accept", f"id={replies[1].id}", "reason=checked by a person"])
    assert review_main(["list", "route=keyed"]) == []
    second = feedback_main([*common, "name=keyed-b"])
    assert second["lineage"]["skipped"]["correction awaiting review"] == 0 and second["rows"]["total"] == 2
    assert set(second["lineage"]["keys"].values()) == {key.id}  # the manifest says whose feedback each row is
    with pytest.raises(ConfigError, match="no correction awaiting review"):
        review_main(["reject", f"id={replies[1].id}"])
