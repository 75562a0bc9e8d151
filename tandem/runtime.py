"""Connecting a job to Ray: the cluster `ray job submit` put it on, or a local one started for this process."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def ray_session(cfg):
    """Use an already-initialised Ray (tests, notebooks), RAY_ADDRESS or `ray.address`, else start a local cluster.
    Ray is imported here, not at the top: benches that only write JSON run where Ray is not installed."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": _quiet_without_dashboard()})
    try:
        yield
    finally:
        ray.shutdown()


def _quiet_without_dashboard():
    """A setup hook every worker of a local cluster runs first. Ray Train's placement-group cleaner asks the state
    API, which lives in the dashboard a local cluster here does not start (2 CPUs), once a second for the whole run,
    and warns each time it cannot: hundreds of lines of noise around a training run's own output. The hook is a
    closure, so Ray ships it by value: a worker on another Python (the vLLM engine's) need not import tandem."""
    def hook() -> None:
        import logging

        logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    return hook


def write_json(path: str, payload: dict) -> Path:
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return out
