"""Distributed (Q)LoRA fine-tuning on Ray Train with DeepSpeed ZeRO-2.

Each worker loads the base (4-bit NF4 by default), wraps it with LoRA, and trains on its own deterministic shard of
the cached features; the loss counts completion tokens only. Every `checkpoint_every` steps each rank writes its
DeepSpeed shard (trainable parameters and optimizer state only) and rank 0 the PEFT adapter, and all report the one
checkpoint to Ray Train. When a worker dies, Ray Train restarts the group (FailureConfig) and every worker resumes
from the last checkpoint at the step it records: same shard, same order, nothing seen twice.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

from tandem.config import CONF_DIR

DS_TAG = "deepspeed"


def deepspeed_config_path(name: str | None) -> Path | None:
    if not name:
        return None
    path = Path(name)
    return path if path.is_file() else CONF_DIR / "deepspeed" / f"{name}.json"


def check_deepspeed_config(ds: dict | None, quantization: str) -> None:
    """ZeRO-3 partitions bitsandbytes' packed 4-bit weights, and saving a checkpoint then crashes; refuse early."""
    stage = (ds or {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 3 and quantization in ("nf4", "int8"):
        raise ValueError(f"DeepSpeed ZeRO-3 with train.quantization={quantization} cannot save checkpoints "
                         "(bitsandbytes packed weights get partitioned); use train.deepspeed=zero2 for QLoRA, or "
                         "train.quantization=none with ZeRO-3")


def _batches(rows: list[dict], pad_id: int):
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def train_loop(config: dict) -> None:
    """The function every Ray Train worker runs."""
    import torch

    use_gpu = config["train"]["use_gpu"] and torch.cuda.is_available()  # a GPU worker without CUDA: the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")  # before DeepSpeed is imported
    import pyarrow.parquet as pq
    import ray.train
    import torch.distributed as dist

    from tandem.models import load_for_training

    t = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cpu")
    if use_gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    torch.manual_seed(t["seed"])
    model = load_for_training(config["base_path"], t["quantization"], device, config["lora"],
                              t["gradient_checkpointing"])

    features = pq.read_table(config["features"]).to_pylist()
    rows = [r for r in features if r["split"] == "train"]
    eval_rows = [r for r in features if r["split"] == "eval"]
    shard = rows[rank::world]
    steps_per_epoch = max(1, len(rows) // world // t["batch_size"])
    total_steps = t["max_steps"] or t["epochs"] * steps_per_epoch
    pad_id = config["pad_id"]

    params = [p for p in model.parameters() if p.requires_grad]
    if config["deepspeed"] is not None:
        import deepspeed

        ds = dict(config["deepspeed"])
        ds.update(train_micro_batch_size_per_gpu=t["batch_size"], gradient_accumulation_steps=t["grad_accum"],
                  train_batch_size=t["batch_size"] * t["grad_accum"] * world)
        if device.type == "cuda":
            ds["bf16"] = {"enabled": True}
        optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                                       config=ds)
    else:
        engine = ray.train.torch.prepare_model(model, move_to_device=False)
        optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start = json.loads((Path(d) / "progress.json").read_text())["step"]
            if config["deepspeed"] is not None:
                engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)
            else:
                state = torch.load(Path(d) / "trainable.pt", map_location=device)
                engine.module.load_state_dict(state["model"], strict=False)
                optimizer.load_state_dict(state["optimizer"])

    def order(epoch: int) -> list[dict]:
        picked = list(shard)
        random.Random(t["seed"] * 1000 + epoch).shuffle(picked)
        return picked

    def step_loss(batch_rows) -> torch.Tensor:
        ids, labels, mask = (x.to(device) for x in _batches(batch_rows, pad_id))
        return engine(input_ids=ids, attention_mask=mask, labels=labels).loss

    def mean_across_workers(value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.item() / world

    wandb_run = None
    if rank == 0 and t.get("wandb_project"):
        import wandb

        # the MLflow run id doubles as the W&B id, so a restarted group resumes the same W&B run
        wandb_run = wandb.init(project=t["wandb_project"], id=config["mlflow"]["run_id"], name=config["run_name"],
                               resume="allow", mode=t.get("wandb_mode"), dir=config["wandb_dir"],
                               config={k: config[k] for k in ("train", "lora", "deepspeed")})
    mlflow_client = None
    if rank == 0 and config.get("mlflow"):
        from mlflow import MlflowClient

        from tandem.registry import log_run_metrics

        mlflow_client = MlflowClient(tracking_uri=config["mlflow"]["uri"])
    engine.train()
    recent: list[float] = []
    started = time.monotonic()
    tokens = 0
    for step in range(start, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        batch_rows = order(epoch)[index * t["batch_size"] : (index + 1) * t["batch_size"]]
        loss = step_loss(batch_rows)
        tokens += sum(len(r["input_ids"]) for r in batch_rows)
        if config["deepspeed"] is not None:
            engine.backward(loss)
            engine.step()
        else:
            (loss / t["grad_accum"]).backward()
            if (step + 1) % t["grad_accum"] == 0:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
        recent.append(loss.item())
        done = step + 1
        if done % t["checkpoint_every"] == 0 or done == total_steps:
            metrics = {"step": done, "epoch": epoch, "loss": mean_across_workers(sum(recent) / len(recent)),
                       "tokens_per_s": mean_across_workers(tokens / (time.monotonic() - started)) * world,
                       "resumed_from": start}
            if done == total_steps:
                metrics["eval_loss"] = _eval_loss(eval_rows[rank::world], step_loss, mean_across_workers)
            recent.clear()
            if rank == 0 and mlflow_client is not None:
                log_run_metrics(mlflow_client, config["mlflow"]["run_id"], metrics, done)
            if wandb_run is not None:
                wandb_run.log(metrics, step=done)
            _report(engine, optimizer, metrics, rank, config["deepspeed"] is not None)
    if wandb_run is not None:
        wandb_run.finish()


def _eval_loss(rows, step_loss, mean_across_workers) -> float | None:
    import torch

    if not rows:
        return None
    with torch.no_grad():
        losses = [step_loss([r]).item() for r in rows]
    return mean_across_workers(sum(losses) / len(losses))


def _report(engine, optimizer, metrics: dict, rank: int, uses_deepspeed: bool) -> None:
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        if uses_deepspeed:
            engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            module = engine.module
            module.save_pretrained(Path(tmp) / "adapter")
            (Path(tmp) / "progress.json").write_text(json.dumps(metrics))
            if not uses_deepspeed:
                trainable = {k: v for k, v in module.state_dict().items() if "lora_" in k}
                torch.save({"model": trainable, "optimizer": optimizer.state_dict()}, Path(tmp) / "trainable.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def make_trainer(cfg, config: dict, run_name: str):
    """A TorchTrainer for `train_loop` with resources, checkpoint retention and failure handling from `cfg.train`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {})
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=t.backend or ("nccl" if t.use_gpu else "gloo")),
        run_config=RunConfig(name=run_name, storage_path=str(Path(t.storage_path).expanduser().resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
