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
        ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def write_json(path: str, payload: dict) -> Path:
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return out
