"""Canary rollouts on the live app: automatic rollback of a broken adapter, promotion of a healthy one through every
step with no failed request, shadow traffic, and manual pause/resume/abort; all through jobs.promote and the
app's rollout controller, reading the registry the routers serve from."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from jobs.promote import main as promote_main
from tandem.registry import Registry
from tandem.requestlog import read_log
from tandem.rollout import load


def promote(args: list[str]) -> dict:
    """jobs.promote as a user runs it, with the test app's route and its short schedule (conf/serve.yaml has no
    route `ro`)."""
    return promote_main(["+serve.routes.ro={adapter: ro}", "rollout.steps=[0.5,1.0]", *args])


class SteadyStream:
    """One request after another on route `ro`, each from a new user, until stopped; keeps every reply."""

    def __init__(self, base_url: str):
        self.base_url, self.replies, self.stop = base_url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(base_url=self.base_url, timeout=120) as c:
            i = 0
            while not self.stop.is_set():
                r = c.post("/v1/chat/completions", json={"model": "ro", "max_tokens": 1, "user": f"s{time.time()}-{i}",
                                                         "messages": [{"role": "user", "content": "Hi"}]})
                self.replies.append((r.status_code, r.headers.get("x-tandem-variant"), r.headers.get(
                    "x-tandem-adapter"), r.json()))
                i += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=120)


def wait_for(predicate, timeout: float = 180, what: str = ""):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return result


def route_seen(http, name: str = "ro") -> dict:
    return next(m for m in http.get("/v1/models").json()["data"] if m["id"] == name)["tandem"]


def test_broken_canary_is_rolled_back_automatically(serve_cfg, base_url, http):
    """... also with a torn and an undecodable line in the request log, as a writer killed mid-record leaves: the
    controller skips and counts them, and the safety net keeps working."""
    registry = Registry.from_config(serve_cfg)
    started = time.time()
    partition = Path(serve_cfg.serve.request_log) / f"date={time.strftime('%Y-%m-%d', time.gmtime())}"
    partition.mkdir(parents=True, exist_ok=True)
    with (partition / "torn-by-rollout-test.jsonl").open("ab") as f:
        f.write(b'{"time": 1795700000.0, "note": "\xff"}\n{"time": 1795700000.0, "request_id": "chatcm')
    promote(["route=ro", "adapter=ro@3", "stage=canary", "reason=test: a corrupt adapter"])
    with SteadyStream(base_url) as stream:
        wait_for(lambda: load(registry, "ro").state == "rolled_back", what="the rollback")
        wait_for(lambda: route_seen(http)["canary"] is None, what="the routers to drop the canary")
        after = len(stream.replies) + 1  # the request in flight may have been routed before the refresh
        wait_for(lambda: len(stream.replies) >= after + 6, what="traffic after the rollback")
    canary = [r for r in read_log(serve_cfg.serve.request_log) if r["route"] == "ro" and r["time"] >= started
              and r["adapter"] == "ro@3"]
    assert len(canary) >= serve_cfg.rollout.min_requests and all(r["status"] == "error" for r in canary)
    decision = [d for d in read_log(serve_cfg.rollout.decisions_log)
                if d["route"] == "ro" and d["action"] == "rollback"]
    assert decision and "error rate" in decision[-1]["reasons"][0] and decision[-1]["skipped_lines"] >= 2
    assert decision[-1]["metrics"]["canary"]["requests"] >= serve_cfg.rollout.min_requests
    # Bounded in time, not in count (a fast-failing canary answers many requests a second): the routers stop
    # sending to it within one refresh of the rollback, give or take the request in flight.
    late = [r["time"] - decision[-1]["time"] for r in canary
            if r["time"] > decision[-1]["time"] + serve_cfg.serve.refresh_s + 2.0]
    assert not late, f"canary requests {late} s after the rollback"
    aliases = registry.aliases("ro")
    assert aliases["production"] == "1" and "canary" not in aliases
    assert all(status == 200 and adapter == "ro@1" for status, _, adapter, _ in stream.replies[after:])
    failed = [body["error"]["message"] for status, _, _, body in stream.replies if status == 503]
    assert failed  # the broken canary really was served
    # the client learns which adapter failed, not the paths, checksums or processes behind it
    assert all("ro@3" in m and "pid=" not in m and not re.search(r"/\w+/", m) for m in failed), failed[:2]


def test_healthy_canary_is_promoted_through_every_step_without_a_failed_request(serve_cfg, base_url, http):
    registry = Registry.from_config(serve_cfg)
    promote(["route=ro", "adapter=ro@2", "stage=canary", "rollout.shadow=true", "reason=test: healthy"])
    with SteadyStream(base_url) as stream:
        wait_for(lambda: load(registry, "ro").state == "promoted", what="the promotion")
        after = len(stream.replies)
        wait_for(lambda: len(stream.replies) >= after + 4, what="traffic after the promotion")
    assert stream.replies and all(status == 200 for status, *_ in stream.replies), \
        [reply for reply in stream.replies if reply[0] != 200][:3]
    assert {variant for _, variant, *_ in stream.replies} >= {"production", "canary"}
    assert all(adapter == "ro@2" for *_, adapter, _ in stream.replies[after:])
    aliases = registry.aliases("ro")
    assert aliases["production"] == "2" and aliases["previous"] == "1" and "canary" not in aliases
    decisions = [d for d in http.get("/v1/rollouts").json()["data"] if d["version"] == "2"]
    assert [d["action"] for d in decisions if d["action"] != "hold"] == ["advance", "advance", "promote"]
    assert [d["state"] for d in decisions if d["action"] == "advance"] == ["running", "running"]
    # While in shadow, production answered and the canary's copies were only logged.
    shadows = [r for r in read_log(serve_cfg.serve.request_log) if r["variant"] == "shadow"]
    assert shadows and all(r["adapter"] == "ro@2" and r["shadow_of"].startswith("chatcmpl-") for r in shadows)
    # the first copy waited for ro@2 to load; the latency gate left that wait out (else it alone could double p95)
    assert all(r["adapter_load_ms"] is not None for r in shadows) and max(r["adapter_load_ms"] for r in shadows) > 0


def test_manual_pause_resume_and_abort(serve_cfg, http):
    registry = Registry.from_config(serve_cfg)
    promote(["route=ro", "adapter=ro@1", "stage=canary", "rollout.steps=[0.3]", "rollout.min_requests=1000"])
    assert registry.aliases("ro")["canary"] == "1"
    promote(["route=ro", "stage=pause", "reason=looking at a dashboard"])
    assert load(registry, "ro").state == "paused" and registry.model_tags("ro")["canary_weight"] == "0.3"
    with pytest.raises(SystemExit, match="needs a rollout in state running or shadow"):
        promote(["route=ro", "stage=pause"])
    promote(["route=ro", "stage=resume"])
    assert load(registry, "ro").state == "running"

    assert wait_for(lambda: route_seen(http)["canary"] == "ro@1" and route_seen(http)["canary_weight"] == 0.3,
                    what="the routers to see the canary")  # live, no restart
    promote(["route=ro", "stage=abort", "reason=changed my mind"])
    assert load(registry, "ro").state == "aborted" and "canary" not in registry.aliases("ro")
    assert wait_for(lambda: route_seen(http)["canary"] is None, what="the routers to drop the canary")
    assert registry.aliases("ro")["production"] == "2"


def test_report_renders_traffic_and_decisions(serve_cfg, tmp_path):
    import base64
    import re

    from jobs.report import main as report

    out = report(["+serve.routes.ro={adapter: ro}", "route=ro", "report.bucket_s=5",
                  f"report.output={tmp_path / 'report.html'}"])
    page = out.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert images and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "has no training metrics" in page  # random adapters: no run metrics to plot
    assert "Canary vs production" in page and "rollback" in page and "promote" in page
    (tmp_path / "traffic.png").write_bytes(base64.b64decode(images[0]))
