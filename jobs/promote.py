"""Change what a route serves, live: start a canary rollout, promote, roll back, pause, resume or abort.

    python -m jobs.promote route=assistant adapter=grounded_qa@2 stage=canary [weight=0.1] [rollout.shadow=true]
    python -m jobs.promote route=assistant stage=production [adapter=grounded_qa@2] reason="..."
    python -m jobs.promote route=assistant stage=rollback|pause|resume|abort reason="..."

Only the registry is written (aliases, the canary weight, the rollout state; each change with who, why and when).
The app's routers re-read it every serve.refresh_s: no restart, no redeploy, no failed request. `stage=canary`
starts the schedule in rollout.steps, which the app's rollout controller advances through its gates; `weight=W`
holds one weight instead (still gated, so a failing canary is still rolled back).
"""

from __future__ import annotations

import getpass
import sys

from tandem import rollout as rollouts
from tandem.commandline import Job, run
from tandem.config import require, route_config
from tandem.registry import Registry
from tandem.requestlog import JsonlLog

STAGES = ("canary", "production", "rollback", "pause", "resume", "abort")
JOB = Job("promote", __doc__, ("rollout", "serve.routes", "serve.refresh_s", "mlflow"),
          shorthands={"route": "rollout.route", "adapter": "rollout.adapter", "stage": "rollout.stage",
                      "weight": "rollout.weight", "reason": "rollout.reason"})


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    r = cfg.rollout
    route, stage = require(r.route, "route"), require(r.stage, "stage")
    if stage not in STAGES:
        raise SystemExit(f"error: stage={stage}; expected one of {', '.join(STAGES)}")
    if route not in cfg.serve.routes:
        raise SystemExit(f"error: no route {route!r} in serve.routes ({', '.join(cfg.serve.routes)})")
    adapter = route_config(cfg.serve.routes[route]).adapter
    if not adapter:
        raise SystemExit(f"error: route {route!r} serves the base model; it has no versions to roll out")
    registry = Registry.from_config(cfg)
    reason = r.reason or f"jobs.promote stage={stage}"
    current = rollouts.load(registry, adapter)
    if stage == "canary":
        version = _version(registry, adapter, require(r.adapter, "adapter"))
        steps = [r.weight] if r.weight is not None else list(r.steps)
        rollouts.start(registry, adapter, version, steps, r.shadow, reason, manual=r.weight is not None)
    elif stage == "production":
        canary = registry.aliases(adapter).get("canary")
        version = _version(registry, adapter, r.adapter) if r.adapter else canary
        if version is None:
            raise SystemExit(f"error: {adapter} has no canary; name the version: adapter={adapter}@N")
        rollouts.promote(registry, adapter, version, reason)
    elif stage in ("rollback", "abort"):
        rollouts.rollback(registry, adapter, reason, "aborted" if stage == "abort" else "rolled_back")
    else:
        wanted = ("running", "shadow") if stage == "pause" else ("paused",)
        if current is None or current.state not in wanted:
            raise SystemExit(f"error: {stage} needs a rollout in state {' or '.join(wanted)}; "
                             f"{adapter} has {current.state if current else 'none'}")
        current.state, current.reason = ("paused" if stage == "pause" else "running"), reason
        rollouts.save(registry, current)
    after = rollouts.load(registry, adapter)
    record = {"route": route, "adapter": adapter, "action": stage, "by": getpass.getuser(), "reason": reason,
              "aliases": registry.aliases(adapter), "canary_weight": registry.model_tags(adapter).get("canary_weight"),
              "rollout": after.__dict__ if after else None}
    JsonlLog(r.decisions_log).append(record)
    print(f"{route}: {stage} -> aliases {record['aliases']}, canary weight {record['canary_weight']}; "
          f"routers pick it up within {cfg.serve.refresh_s:g} s")
    return record


def _version(registry, adapter: str, ref: str) -> str:
    mv = registry.resolve(ref if "@" in ref else f"{adapter}@{ref}")
    if mv.name != adapter:
        raise SystemExit(f"error: {ref} is not a version of this route's adapter {adapter!r}")
    return str(mv.version)


if __name__ == "__main__":
    run(main)
