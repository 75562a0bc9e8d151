"""Progressive canary rollout of an adapter version: state in the registry, gates over served traffic, decisions.

The registry is the source of truth that every router reads: the `production` and `canary` aliases name the
versions, the registered model's `canary_weight` tag the share of users, and its `rollout` tag (JSON) the schedule
and where it stands, so a restarted controller continues where it was. The gates follow Flagger and Argo Rollouts:
per variant over the current step's traffic (error rate, p95 latency against production, negative feedback, the
output format the adapter was trained for, and how well the passages it cites support its answers); failing ->
rollback to 0% with production untouched, too little data -> hold, healthy -> next step, healthy at 100% ->
promoted with rollout.auto_promote, else held there for a human.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from tandem.stats import percentile

HOLD, ADVANCE, PROMOTE, ROLLBACK = "hold", "advance", "promote", "rollback"
LIVE = ("shadow", "running")  # states the controller acts on; also: manual, paused, promoted, rolled_back, aborted


@dataclass
class Rollout:
    adapter: str  # registered adapter name
    version: str  # the canary version
    steps: list[float]  # canary weights, in order
    state: str = "running"
    step: int = 0
    step_started: float = field(default_factory=time.time)
    started: float = field(default_factory=time.time)
    reason: str = ""

    @property
    def weight(self) -> float:
        return 0.0 if self.state == "shadow" else self.steps[self.step]


def load(registry, adapter: str) -> Rollout | None:
    """The adapter's rollout; None when it never had one, or is not registered yet (a RAG-first route's)."""
    from mlflow.exceptions import MlflowException

    try:
        raw = registry.model_tags(adapter).get("rollout")
    except MlflowException:
        return None
    return Rollout(**json.loads(raw)) if raw else None


def save(registry, rollout: Rollout) -> None:
    """The state, and the weight routers read: a paused rollout keeps its split, a finished one has none."""
    registry.set_model_tag(rollout.adapter, "rollout", json.dumps(asdict(rollout)))
    serving = rollout.state in LIVE + ("manual", "paused")
    registry.set_model_tag(rollout.adapter, "canary_weight", str(rollout.weight if serving else 0.0))


def start(registry, adapter: str, version: str, steps: list[float], shadow: bool, reason: str,
          manual: bool = False) -> Rollout:
    """Make `version` the canary and begin its schedule (or hold a fixed weight when `manual`)."""
    rollout = Rollout(adapter, str(version), [float(s) for s in steps],
                      "shadow" if shadow else ("manual" if manual else "running"), reason=reason)
    registry.set_alias(adapter, "canary", version, reason=reason or "canary started")
    save(registry, rollout)
    return rollout


def promote(registry, adapter: str, version: str, reason: str) -> None:
    """`version` becomes production; the canary alias goes; the previous production is kept as `previous`."""
    aliases = registry.aliases(adapter)
    if "production" in aliases and str(aliases["production"]) != str(version):
        registry.set_alias(adapter, "previous", aliases["production"], reason=f"replaced by {version}")
    registry.set_alias(adapter, "production", version, reason=reason)
    if "canary" in aliases:
        registry.delete_alias(adapter, "canary", reason=reason)
    _finish(registry, adapter, "promoted", reason)


def rollback(registry, adapter: str, reason: str, state: str = "rolled_back") -> None:
    """The canary gets 0% and loses its alias; production is untouched."""
    if "canary" in registry.aliases(adapter):
        registry.delete_alias(adapter, "canary", reason=reason)
    _finish(registry, adapter, state, reason)


def _finish(registry, adapter: str, state: str, reason: str) -> None:
    rollout = load(registry, adapter)
    if rollout is not None:
        rollout.state, rollout.reason = state, reason
        save(registry, rollout)
    else:
        registry.set_model_tag(adapter, "canary_weight", "0.0")


def variant_metrics(requests: list[dict], feedback: list[dict], route: str, since: float) -> dict[str, dict]:
    """Per variant over a route's requests since `since`: count, error rate, p95 latency (adapter loads left out),
    negative feedback, and format validity and groundedness where the route retrieves. `base` is the reference of a
    first adapter's canary, which runs beside the base model because there is no production version yet."""
    negative = {f["request_id"] for f in feedback if f.get("rating", 0) < 0}
    out: dict[str, dict] = {}
    for variant in ("production", "base", "canary", "shadow"):
        rows = [r for r in requests if r["route"] == route and r["variant"] == variant and r["time"] >= since]
        # less the wait for the adapter's load: a replica's one-time cost, not how fast the adapter answers (a
        # canary's first requests load it; with a handful of requests a step, that alone came near doubling its p95)
        latencies = [round(r["latency_ms"] - (r.get("adapter_load_ms") or 0.0), 1) for r in rows
                     if r["status"] == "ok"]
        formats = [r["format_valid"] for r in rows if r["status"] == "ok" and r.get("format_valid") is not None]
        grounded = [r["grounded"] for r in rows if r["status"] == "ok" and r.get("grounded") is not None]
        out[variant] = {
            "requests": len(rows),
            # who sent them: API keys, or pseudonymous users where there are no keys (loopback); many `user`
            # values under one key are one caller
            "callers": len({r.get("key_id") or r.get("user_hash") for r in rows}),
            "error_rate": sum(r["status"] == "error" for r in rows) / len(rows) if rows else 0.0,
            "latency_p95_ms": percentile(latencies, 0.95),
            "negative_feedback_rate": sum(r["request_id"] in negative for r in rows) / len(rows) if rows else 0.0,
            "format_valid": sum(formats) / len(formats) if formats else None,
            "grounded": sum(grounded) / len(grounded) if grounded else None,
        }
    return out


def gate_failures(canary: dict, production: dict, gates) -> list[str]:
    failures = []
    if canary["error_rate"] > gates.max_error_rate:
        failures.append(f"error rate {canary['error_rate']:.1%} > {gates.max_error_rate:.1%}")
    if canary["latency_p95_ms"] and production["latency_p95_ms"] and \
            canary["latency_p95_ms"] > gates.max_latency_p95_ratio * production["latency_p95_ms"]:
        failures.append(f"p95 latency {canary['latency_p95_ms']:.0f} ms > {gates.max_latency_p95_ratio}x "
                        f"production's {production['latency_p95_ms']:.0f} ms")
    if canary["negative_feedback_rate"] > gates.max_negative_feedback_rate:
        failures.append(f"negative feedback {canary['negative_feedback_rate']:.1%} > "
                        f"{gates.max_negative_feedback_rate:.1%}")
    if gates.min_format_valid is not None and canary["format_valid"] is not None and \
            canary["format_valid"] < gates.min_format_valid:
        failures.append(f"valid output format {canary['format_valid']:.1%} < {gates.min_format_valid:.1%}")
    if gates.min_grounded is not None and canary["grounded"] is not None and canary["grounded"] < gates.min_grounded:
        failures.append(f"grounded answers {canary['grounded']:.1%} < {gates.min_grounded:.1%} (answer words found "
                        "in the passages they cite)")
    return failures


def decide(rollout: Rollout, metrics: dict, cfg, now: float) -> tuple[str, list[str]]:
    """The next action for a live rollout and why. `cfg`: min_requests, min_callers, min_seconds and gates."""
    canary = metrics["shadow" if rollout.state == "shadow" else "canary"]
    if canary["requests"] < cfg.min_requests:
        return HOLD, [f"{canary['requests']} canary requests < {cfg.min_requests} this step"]
    reference = metrics["production"] if metrics["production"]["requests"] else metrics["base"]
    failures = gate_failures(canary, reference, cfg.gates)
    if failures:
        return ROLLBACK, failures
    if canary["callers"] < cfg.min_callers:  # one key's traffic, however many `user` values it sends, is one voice
        return HOLD, [f"canary requests from {canary['callers']} callers < {cfg.min_callers} this step"]
    if now - rollout.step_started < cfg.min_seconds:
        return HOLD, [f"step running {now - rollout.step_started:.0f} s < {cfg.min_seconds} s"]
    if rollout.state == "running" and rollout.step == len(rollout.steps) - 1:
        if rollout.steps[-1] >= 1.0 and cfg.auto_promote:
            return PROMOTE, ["healthy at 100%"]
        return HOLD, [f"healthy at {rollout.steps[-1]:.0%}: waiting for a human (jobs.promote stage=production), "
                      "or rollout.auto_promote=true"]
    return ADVANCE, ["healthy"]


def apply(registry, rollout: Rollout, action: str, reasons: list[str], now: float) -> Rollout:
    """Carry out a decision in the registry; returns the rollout as it now stands. The decision was made on the
    state read at the start of the tick: when a human changed it since (an abort, a pause), theirs stands and this
    decision is dropped. The registry has no compare-and-swap, so this re-read narrows the race to the write itself."""
    if action != HOLD and load(registry, rollout.adapter) != rollout:
        return load(registry, rollout.adapter) or rollout
    why = "; ".join(reasons)
    if action == ROLLBACK:
        rollback(registry, rollout.adapter, f"automatic rollback: {why}")
    elif action == PROMOTE:
        promote(registry, rollout.adapter, rollout.version, f"automatic promotion: {why}")
    elif action == ADVANCE:
        if rollout.state == "shadow":
            rollout.state = "running"
        else:
            rollout.step += 1
        rollout.step_started = now
        save(registry, rollout)
    return load(registry, rollout.adapter) or rollout
