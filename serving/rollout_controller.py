"""The RolloutController deployment: every rollout.interval_s, one decision per route with a live rollout.

It reads the served traffic (the request and feedback logs the routers write), computes each variant's metrics for
the current step, decides with `tandem.rollout` (hold, advance, promote, rollback) and writes the outcome to the
registry, which the routers pick up. Every decision is appended to rollout.decisions_log with the metrics that drove
it (a hold only when its reason changes). A Serve deployment, so it lives and dies with the app; its state is in the
registry, so a restarted one continues.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

from tandem import rollout as rollouts
from tandem.config import route_config
from tandem.registry import Registry
from tandem.requestlog import JsonlLog, read_log

logger = logging.getLogger("ray.serve")


class RolloutController:
    def __init__(self, cfg):
        self.cfg = cfg
        self.registry = Registry.from_config(cfg)
        self.log = JsonlLog(cfg.rollout.decisions_log)
        self.last_reason: dict[str, str] = {}
        self.decisions: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rollout")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.rollout.interval_s):
            try:
                self.tick()
            except Exception:  # a bad tick (registry briefly unreachable) must not stop the controller
                logger.exception("rollout tick failed")

    def tick(self, now: float | None = None) -> list[dict]:
        now = now or time.time()
        live = {}
        for name, raw in self.cfg.serve.routes.items():
            adapter = route_config(raw).adapter
            current = rollouts.load(self.registry, adapter) if adapter else None
            if current is not None and current.state in rollouts.LIVE:
                live[name] = current
        if not live:
            return []
        since = min(r.step_started for r in live.values())
        day = datetime.fromtimestamp(since, timezone.utc).strftime("%Y-%m-%d")
        skipped = []  # torn lines are left out, never fatal: a rollback must not wait for a clean log
        requests = read_log(self.cfg.serve.request_log, day, skipped)
        feedback = read_log(self.cfg.serve.feedback_log, day, skipped)
        made = []
        for name, current in live.items():
            metrics = rollouts.variant_metrics(requests, feedback, name, current.step_started)
            action, reasons = rollouts.decide(current, metrics, self.cfg.rollout, now)
            after = rollouts.apply(self.registry, current, action, reasons, now)
            record = {"route": name, "adapter": current.adapter, "version": current.version, "action": action,
                      "reasons": reasons, "step": current.step, "weight": current.weight, "state": after.state,
                      "metrics": metrics, "skipped_lines": len(skipped), "by": "controller"}
            if action != rollouts.HOLD or self.last_reason.get(name) != reasons[0]:
                self.log.append(record)
                self.decisions.append({"time": now, **record})
            self.last_reason[name] = reasons[0]
            made.append(record)
        return made

    def recent(self, n: int = 50) -> list[dict]:
        return self.decisions[-n:]

    def __del__(self):
        self._stop.set()
