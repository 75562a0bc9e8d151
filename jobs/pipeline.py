"""Served traffic to a new canary in one run: feedback -> finetune -> validate -> register -> canary start.

    python -m jobs.pipeline route=assistant [since=2026-11-01] [train.max_steps=30] [validate.*=...] ...

Each step is the job of the same name, called as it would be alone, with the same overrides; the run stops at the
first step that fails (a validation that does not pass starts no canary). The new adapter is trained as the next
version of the route's adapter, so the rollout controller takes it from there.
"""

from __future__ import annotations

import sys

from jobs.feedback import main as feedback
from jobs.finetune import main as finetune
from jobs.promote import main as promote
from jobs.validate import main as validate
from tandem.commandline import Job, run
from tandem.config import require, route_config
from tandem.errors import ConfigError

JOB = Job("pipeline", __doc__, ("feedback.route", "feedback.since", "serve.routes", "train", "validate", "rollout"),
          shorthands={"route": "feedback.route", "since": "feedback.since"})


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = JOB.config(argv)
    route = require(cfg.feedback.route, "route")
    adapter = route_config(cfg.serve.routes[route]).adapter if route in cfg.serve.routes else None
    if not adapter:
        raise ConfigError(f"route {route!r} has no adapter to train (serve.routes.{route}.adapter)")
    rest = [a for a in argv if a.split("=")[0] not in ("route", "since")]
    # serve.*, feedback.* and rollout.* describe the app; the training jobs' configs do not have them
    training = [a for a in rest if not a.lstrip("+").startswith(("serve.", "feedback.", "rollout."))]
    data = feedback([f"feedback.route={route}", *([f"feedback.since={cfg.feedback.since}"] if cfg.feedback.since
                                                  else []), *rest])
    dataset = f"{data['name']}@{data['version']}"
    trained = finetune([f"dataset={dataset}", f"train.adapter_name={adapter}", *training])
    candidate = f"{adapter}@{trained['registry']['version']}"
    report = validate([f"adapter={candidate}", *training])
    steps = {"dataset": dataset, "adapter": candidate, "validated": report["passed"], "reasons": report["reasons"]}
    if not report["passed"]:
        print(f"pipeline stopped: {candidate} did not pass validation: {report['reasons']}")
        return steps
    steps["canary"] = promote([f"route={route}", f"adapter={candidate}", "stage=canary",
                               f"reason=pipeline: {dataset} validated", *rest])
    print(f"pipeline: {dataset} -> {candidate} validated -> canary on route {route}")
    return steps


if __name__ == "__main__":
    run(main)
