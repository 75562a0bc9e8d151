"""Distributed QLoRA fine-tuning on Ray Train with DeepSpeed.

    ray job submit -- python -m jobs.finetune dataset=NAME@VERSION [train.num_workers=2] [train.use_gpu=true]
        [train.quantization=nf4|int8|none] [train.deepspeed=zero2|null] [train.max_steps=N] [lora.r=8] ...
    python -m jobs.finetune dataset=NAME-preferences@latest train.objective=dpo [train.init_adapter=NAME@production]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from tandem.adapters import publish_adapter, verify_adapter
from tandem.commandline import Job, run
from tandem.config import require
from tandem.data.dataset_store import DatasetStore
from tandem.data.features import build_features
from tandem.models import load_tokenizer, prepare_base
from tandem.registry import Registry, base_model_name
from tandem.runtime import ray_session, write_json
from tandem.training import TrainJob, check_deepspeed_config, check_schedule, deepspeed_config_path, make_trainer

JOB = Job("finetune", __doc__, ("dataset.ref", "dataset.root", "model", "train", "lora", "mlflow", "ray"),
          shorthands={"dataset": "dataset.ref"})


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def published(result, eval_every: int):
    """The checkpoint that becomes the adapter, and its metrics: the best by eval loss when evaluations ran during
    training, else the last."""
    if not eval_every:
        return result.checkpoint, result.metrics
    best = result.get_best_checkpoint("eval_loss", "min")
    return best, next(m for c, m in result.best_checkpoints if c.path == best.path)


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    ref = require(cfg.dataset.ref, "dataset.ref")
    ds_path = deepspeed_config_path(cfg.train.deepspeed)
    ds = json.loads(ds_path.read_text()) if ds_path else None
    check_deepspeed_config(ds, cfg.train.quantization)
    version = DatasetStore(cfg.dataset.root).resolve(ref)
    rows = version.manifest()["rows"]
    check_schedule(cfg.train, rows.get("eval", 0))
    if cfg.train.objective == "dpo" and rows.get("preference_pairs", 0) != rows["total"]:
        raise ValueError(f"train.objective=dpo needs preference pairs (prompt, chosen, rejected) in every row; "
                         f"{version.ref} has {rows.get('preference_pairs', 0)} of {rows['total']}")
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    tokenizer = load_tokenizer(base)
    features = build_features(version.rows(), tokenizer, cfg.train.max_length,
                              version.path / "features" / f"{base.sha256[:12]}-{cfg.train.max_length}.parquet")
    train_rows = version.manifest()["rows"]["train"]
    if train_rows < cfg.train.num_workers:
        raise SystemExit(f"error: {version.ref} has {train_rows} training rows, fewer than train.num_workers="
                         f"{cfg.train.num_workers}; every worker needs at least one")
    run_name = cfg.train.name or f"{version.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    adapter_name = cfg.train.adapter_name or version.name
    registry = Registry.from_config(cfg)
    settings = {"train": OmegaConf.to_container(cfg.train), "lora": OmegaConf.to_container(cfg.lora),
                "deepspeed": ds}
    parent = init_dir = None
    if cfg.train.init_adapter:  # training goes on from a registered adapter: checked as serving checks it
        found = registry.resolve(cfg.train.init_adapter)
        parent = f"{found.name}@{found.version}"
        init_dir = registry.download(parent)
        verify_adapter(init_dir, base.sha256)
    lineage = {"dataset": version.ref, "base_model": cfg.model.path, "base_sha256": base.sha256,
               "code_version": code_version(), "objective": cfg.train.objective, "parent": parent or ""}
    run_id = registry.start_run(run_name, settings, lineage)
    job = TrainJob(train=OmegaConf.to_object(cfg.train), lora=OmegaConf.to_object(cfg.lora), deepspeed=ds,
                   base_path=str(base.path), features=str(features),
                   pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                   run_name=run_name, mlflow_uri=registry.uri, mlflow_run_id=run_id,
                   wandb_dir=str(Path(cfg.workdir).expanduser().resolve()),
                   init_adapter=str(init_dir) if init_dir else None)
    with ray_session(cfg.ray):
        result = make_trainer(cfg, job).fit()
    if result.error:
        registry.end_run(run_id, failed=True)
        raise SystemExit(f"error: training failed: {result.error}")
    checkpoint, metrics = published(result, cfg.train.eval_every)
    with checkpoint.as_directory() as ckpt:
        manifest = publish_adapter(
            Path(ckpt) / "adapter", Path(cfg.train.adapters_dir) / run_name,
            {"name": run_name, "base": base.manifest(), "dataset": version.ref, "metrics": metrics,
             "last_metrics": result.metrics, "config": settings, "code_version": lineage["code_version"],
             "objective": cfg.train.objective, "parent": parent, "checkpoint": checkpoint.path,
             "mlflow_run_id": run_id})
    base_name = base_model_name(cfg.model.path)
    base_version = registry.register_base(base_name, base.manifest())
    manifest["registry"] = {"name": adapter_name, "base": f"{base_name}@{base_version}",
                            "version": registry.register_adapter(adapter_name, run_id, manifest["path"], manifest,
                                                                 base_name, base_version)}
    registry.end_run(run_id)
    print(json.dumps({k: manifest[k] for k in ("name", "path", "sha256", "dataset", "metrics", "registry")},
                     indent=2))
    write_json(Path(manifest["path"]) / "train-result.json", {"metrics": result.metrics})
    return manifest


if __name__ == "__main__":
    run(main)
