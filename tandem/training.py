"""Distributed (Q)LoRA fine-tuning on Ray Train with DeepSpeed ZeRO-2 or ZeRO-3 (or plain DDP).

Each worker loads the base (4-bit NF4 by default), wraps it with LoRA, and trains on its own deterministic shard of
the cached features; the loss counts completion tokens only (or, with `objective=dpo`, is DPO's over preference
pairs). At every checkpoint each rank writes its DeepSpeed shard (trainable parameters and optimizer state only)
and rank 0 the PEFT adapter, and all report the one checkpoint to Ray Train. When a worker dies, Ray Train
restarts the group (FailureConfig) and every worker resumes from the last checkpoint at the step it records: same
shard, same order, nothing seen twice.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tandem.config import CONF_DIR, LoraSettings, TrainConfig
from tandem.data.batches import pack, packed_batch, padded_batch
from tandem.dpo import dpo_loss, pair_rows, sequence_logps
from tandem.gathered_lora import adapters_off, lora_layers

DS_TAG = "deepspeed"
SCHEDULES = ("constant", "linear", "cosine")
OBJECTIVES = ("sft", "dpo")


def deepspeed_config_path(name: str | None) -> Path | None:
    if not name:
        return None
    path = Path(name)
    return path if path.is_file() else CONF_DIR / "deepspeed" / f"{name}.json"


def zero_stage(ds: dict | None) -> int:
    return (ds or {}).get("zero_optimization", {}).get("stage", 0)


def check_deepspeed_config(ds: dict | None, quantization: str) -> None:
    """QLoRA (nf4) shards under ZeRO-3 through PEFT's recipe (4-bit weights stored in the compute dtype); 8-bit
    weights have no such storage option, so ZeRO-3 would partition their int8 data and scales apart."""
    if zero_stage(ds) == 3 and quantization == "int8":
        raise ValueError("DeepSpeed ZeRO-3 with train.quantization=int8: bitsandbytes' 8-bit weights cannot be "
                         "partitioned (no quant storage dtype, unlike 4-bit); use train.quantization=nf4 (QLoRA), "
                         "or train.deepspeed=zero2")


def check_schedule(t: TrainConfig, eval_rows: int) -> None:
    """Settings that would fail inside the workers, refused before any starts."""
    if t.lr_schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule={t.lr_schedule}; expected one of {', '.join(SCHEDULES)}")
    if t.objective not in OBJECTIVES:
        raise ValueError(f"train.objective={t.objective}; expected one of {', '.join(OBJECTIVES)}")
    if t.objective == "dpo" and t.packing:
        raise ValueError("train.objective=dpo with train.packing=true: a pair's two answers are scored as separate "
                         "rows, so pairs are not packed; set train.packing=false")
    if t.early_stopping_patience and not t.eval_every:
        raise ValueError(f"train.early_stopping_patience={t.early_stopping_patience} needs train.eval_every > 0 "
                         "(it counts evaluations)")
    if t.eval_every and not eval_rows:
        raise ValueError(f"train.eval_every={t.eval_every}, but the dataset has no eval rows to measure; set "
                         "dataset.eval_fraction when adding it, or train.eval_every=0")


@dataclass
class TrainJob:
    """What every Ray Train worker needs, typed: the job's settings and where its inputs are."""
    train: TrainConfig
    lora: LoraSettings
    deepspeed: dict | None  # the DeepSpeed config as loaded; None: plain DDP
    base_path: str
    features: str  # the cached Parquet features (input_ids, labels, split)
    pad_id: int
    run_name: str
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None  # also the W&B run id, so a restarted group resumes the same W&B run
    wandb_dir: str = "."
    init_adapter: str | None = None  # a local adapter directory to start from instead of a fresh LoRA


@dataclass
class Progress:
    """What a checkpoint records beside the weights, so a restarted group goes on exactly where it stopped."""
    step: int = 0
    best_eval_loss: float | None = None
    evals_since_best: int = 0


def steps_per_epoch(rows: int, world: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps that see every row once: each worker's share rounded up, never dropped."""
    return max(1, math.ceil(math.ceil(rows / world) / (batch_size * grad_accum)))


def epoch_batches(shard: list, steps: int, grad_accum: int, seed: int) -> list[list]:
    """This worker's micro-batches for one epoch, shuffled by `seed`: every row once, in `steps * grad_accum`
    micro-batches of near-equal size. Every worker gets the same count (their collectives must line up); a shard
    with fewer rows than micro-batches repeats rows rather than leave one empty."""
    order = list(shard)
    random.Random(seed).shuffle(order)
    count = steps * grad_accum
    order += order[: max(0, count - len(order))]
    size, extra = divmod(len(order), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


class LoRARecipe:
    """Distributed (Q)LoRA fine-tuning in the shape of torchtune's recipes: setup, train, save_checkpoint, cleanup.

    A step is one optimizer step over `grad_accum` micro-batches of `batch_size` rows on each worker (with
    `packing`, of `batch_size` sequences, each short rows packed up to `max_length` tokens: tandem/data/batches.py).
    The learning rate follows transformers' schedules (constant, linear or cosine after a linear warmup). With
    `eval_every`, the eval loss is measured every that many steps, each measurement comes with a checkpoint (so the
    job can publish the best by eval loss), and `early_stopping_patience` evaluations without improvement end the
    run. `objective=dpo` trains on preference pairs (tandem/dpo.py).
    """

    def __init__(self, job: TrainJob):
        self.job, self.t = job, job.train
        self.progress = Progress()

    def setup(self) -> None:
        import pyarrow.parquet as pq
        import ray.train
        import torch
        from transformers import get_scheduler

        from tandem.models import load_for_training

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = torch.device("cpu")
        if self.use_gpu:
            self.device = torch.device("cuda", ctx.get_local_rank())
            torch.cuda.set_device(self.device)
        torch.manual_seed(self.t.seed)
        # the PeftModel itself; `engine` wraps it (DeepSpeed, DDP) or is it (one DDP worker)
        self.zero3 = zero_stage(self.job.deepspeed) == 3
        self.model = model = load_for_training(self.job.base_path, self.t.quantization, self.device, self.job.lora,
                                               self.t.gradient_checkpointing, init_adapter=self.job.init_adapter,
                                               sharded=self.zero3)
        self.lora_layers = lora_layers(model)  # switched off for DPO's reference forward
        features = pq.read_table(self.job.features).to_pylist()
        rows = [r for r in features if r["split"] == "train"]
        # the unit of batching: a bin of rows packed into one sequence, or one row
        units = pack(rows, self.t.max_length) if self.t.packing else [[r] for r in rows]
        self.shard = units[self.rank :: self.world]
        self.eval_rows = [r for r in features if r["split"] == "eval"][self.rank :: self.world]
        self.steps_per_epoch = steps_per_epoch(len(units), self.world, self.t.batch_size, self.t.grad_accum)
        self.total_steps = self.t.max_steps or self.t.epochs * self.steps_per_epoch

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.t.lr, weight_decay=self.t.weight_decay)
        schedule = "constant_with_warmup" if self.t.lr_schedule == "constant" else self.t.lr_schedule
        self.scheduler = get_scheduler(schedule, self.optimizer, num_warmup_steps=self.t.warmup_steps,
                                       num_training_steps=self.total_steps)
        if self.job.deepspeed is not None:
            import deepspeed

            ds = dict(self.job.deepspeed)
            ds.update(train_micro_batch_size_per_gpu=self.t.batch_size, gradient_accumulation_steps=self.t.grad_accum,
                      train_batch_size=self.t.batch_size * self.t.grad_accum * self.world)
            if self.device.type == "cuda":
                ds["bf16"] = {"enabled": True}
            # DeepSpeed steps the optimizer and the schedule at accumulation boundaries and checkpoints both
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler, model_parameters=self.params,
                config=ds)
        else:
            self.engine = ray.train.torch.prepare_model(model, move_to_device=False)
        self._restore()
        self._start_trackers()
        # what this worker holds for parameters once DeepSpeed has partitioned them (ZeRO-3: its partition)
        self.param_bytes = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                               for p in model.parameters())

    @property
    def use_gpu(self) -> bool:
        import torch

        return self.t.use_gpu and torch.cuda.is_available()  # a GPU worker without CUDA trains on its CPU

    def _restore(self) -> None:
        import ray.train
        import torch

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return
        with checkpoint.as_directory() as d:
            saved = json.loads((Path(d) / "progress.json").read_text())
            self.progress = Progress(**{k: saved[k] for k in asdict(Progress()) if k in saved})
            if self.job.deepspeed is not None:
                self.engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)
            else:
                state = torch.load(Path(d) / "trainable.pt", map_location=self.device)
                self.model.load_state_dict(state["model"], strict=False)
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])

    def _start_trackers(self) -> None:
        self.wandb_run = self.mlflow = None
        if self.rank != 0:
            return
        if self.t.wandb_project:
            import wandb

            self.wandb_run = wandb.init(project=self.t.wandb_project, id=self.job.mlflow_run_id,
                                        name=self.job.run_name, resume="allow", mode=self.t.wandb_mode,
                                        dir=self.job.wandb_dir, config={"train": asdict(self.t),
                                                                        "lora": asdict(self.job.lora),
                                                                        "deepspeed": self.job.deepspeed})
        if self.job.mlflow_run_id:
            from mlflow import MlflowClient

            self.mlflow = MlflowClient(tracking_uri=self.job.mlflow_uri)

    def _loss(self, units: list[list[dict]]):
        if self.t.objective == "dpo":
            return self._dpo(units)[0]
        batch = (packed_batch(units, self.job.pad_id) if self.t.packing else
                 padded_batch([r for u in units for r in u], self.job.pad_id))
        # no cache: with one, transformers would not build the packed (block-diagonal) mask
        return self.engine(**{k: v.to(self.device) for k, v in batch.items()}, use_cache=False).loss

    def _dpo(self, units: list[list[dict]]):
        """(loss, per-pair accuracy) of preference pairs; the reference is the same model, adapter off."""
        import torch

        rows = pair_rows([r for u in units for r in u])
        batch = {k: v.to(self.device) for k, v in padded_batch(rows, self.job.pad_id).items()}
        labels = batch.pop("labels")
        policy = sequence_logps(self.engine(**batch, use_cache=False).logits, labels)
        with torch.no_grad(), adapters_off(self.lora_layers):
            reference = sequence_logps(self.model(**batch, use_cache=False).logits, labels)
        n = len(rows) // 2
        return dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.t.dpo_beta)

    def _mean(self, value: float) -> float:
        """The mean over workers: every worker gets the same number, so all decide alike."""
        return self._reduce(value, "SUM") / self.world

    def _max(self, value: float) -> float:
        return self._reduce(value, "MAX")

    def _reduce(self, value: float, op: str) -> float:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor.item()

    def train(self) -> None:
        import torch

        self.engine.train()
        recent, tokens, started = [], 0, time.monotonic()
        start, batches, batches_epoch = self.progress.step, [], None
        accum = self.t.grad_accum
        for step in range(start, self.total_steps):
            epoch, index = divmod(step, self.steps_per_epoch)
            if epoch != batches_epoch:
                batches_epoch = epoch
                batches = epoch_batches(self.shard, self.steps_per_epoch, accum, self.t.seed * 1000 + epoch)
            micro = batches[index * accum : (index + 1) * accum]
            for units in micro:
                loss = self._loss(units)
                tokens += sum(len(r["input_ids"]) for u in units for r in u)
                recent.append(loss.item())
                if self.job.deepspeed is not None:
                    self.engine.backward(loss)
                    self.engine.step()
                else:
                    (loss / len(micro)).backward()
            if self.job.deepspeed is None:
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            done = self.progress.step = step + 1
            last = done == self.total_steps
            evaluate = last or bool(self.t.eval_every and done % self.t.eval_every == 0)
            if not (last or done % (self.t.eval_every or self.t.checkpoint_every) == 0):
                continue
            metrics = {"step": done, "epoch": epoch, "loss": self._mean(sum(recent) / len(recent)),
                       "lr": self.scheduler.get_last_lr()[0],
                       "tokens_per_s": self._mean(tokens / (time.monotonic() - started)) * self.world,
                       "resumed_from": start, "worker_param_mb": self._max(self.param_bytes) / 2**20,
                       "worker_peak_rss_mb": self._max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**10}
            recent.clear()
            stop = False
            if evaluate:
                metrics.update(self.evaluate())
                stop = self._track_best(metrics["eval_loss"])
                metrics.update(best_eval_loss=self.progress.best_eval_loss, stopped_early=stop)
            self.save_checkpoint(metrics)
            if stop:
                break

    def evaluate(self) -> dict:
        """Mean loss over the eval split (each worker its share), in eval mode; for DPO also the preference
        accuracy: the share of held-out pairs whose chosen answer the policy favours more than the reference."""
        import torch

        if not self.eval_rows:
            return {"eval_loss": None}
        self.engine.eval()
        with torch.no_grad():
            scored = [self._dpo([[r]]) if self.t.objective == "dpo" else (self._loss([[r]]), None)
                      for r in self.eval_rows]
        self.engine.train()
        out = {"eval_loss": self._mean(sum(loss.item() for loss, _ in scored) / len(scored))}
        if self.t.objective == "dpo":
            out["eval_accuracy"] = self._mean(sum(acc.mean().item() for _, acc in scored) / len(scored))
        return out

    def _track_best(self, eval_loss: float | None) -> bool:
        """Whether to stop early: `early_stopping_patience` evaluations in a row without a new best."""
        p = self.progress
        if eval_loss is None:
            return False
        if p.best_eval_loss is None or eval_loss < p.best_eval_loss:
            p.best_eval_loss, p.evals_since_best = eval_loss, 0
        else:
            p.evals_since_best += 1
        return bool(self.t.early_stopping_patience) and p.evals_since_best >= self.t.early_stopping_patience

    def save_checkpoint(self, metrics: dict) -> None:
        """Every rank its DeepSpeed shard (trainable parameters and optimizer state only), rank 0 the PEFT adapter
        and the progress; all report the one checkpoint to Ray Train, and rank 0 logs the metrics."""
        import ray.train
        import torch

        if self.rank == 0:
            if self.mlflow is not None:
                from tandem.registry import log_run_metrics

                log_run_metrics(self.mlflow, self.job.mlflow_run_id, metrics, metrics["step"])
            if self.wandb_run is not None:
                self.wandb_run.log(metrics, step=metrics["step"])
        trainable = self._trainable_state()
        with tempfile.TemporaryDirectory() as tmp:
            if self.job.deepspeed is not None:
                self.engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=True)
            if self.rank == 0:
                self.model.save_pretrained(Path(tmp) / "adapter", state_dict=trainable)
                (Path(tmp) / "progress.json").write_text(json.dumps({**metrics, **asdict(self.progress)}))
                if self.job.deepspeed is None:
                    torch.save({"model": trainable, "optimizer": self.optimizer.state_dict(),
                                "scheduler": self.scheduler.state_dict()}, Path(tmp) / "trainable.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def _trainable_state(self) -> dict:
        """The LoRA weights, whole on every rank: under ZeRO-3 gathered from their partitions (a collective, so
        every rank calls it). Read from the parameters, not `state_dict()`, which would also serialise the frozen
        4-bit base."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.zero3:
            return {n: p.detach().clone() for n, p in params.items()}
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().clone() for n, p in params.items()}

    def cleanup(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def train_loop(config: dict) -> None:
    """The function every Ray Train worker runs: {"job": TrainJob}."""
    import torch

    job: TrainJob = config["job"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if job.train.use_gpu and torch.cuda.is_available() else "cpu")
    # DeepSpeed's CPU collectives op, compiled once into this environment by `make setup` (else the first worker
    # under every new HOME compiles it: 35 s of 2 cores here, and a compiler in every image)
    prebuilt = Path(sys.prefix) / "torch_extensions"
    if prebuilt.is_dir():
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(prebuilt))
    recipe = LoRARecipe(job)  # DeepSpeed is imported only after the accelerator is set (in setup)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()


def make_trainer(cfg, job: TrainJob):
    """A TorchTrainer for `train_loop` with resources, checkpoint retention and failure handling from `cfg.train`;
    with `eval_every`, the checkpoints kept are the best by eval loss (and always the latest, to resume from)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {})
    best = {"checkpoint_score_attribute": "eval_loss", "checkpoint_score_order": "min"} if t.eval_every else {}
    return TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=t.backend or ("nccl" if t.use_gpu else "gloo")),
        run_config=RunConfig(name=job.run_name, storage_path=str(Path(t.storage_path).expanduser().resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, **best),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
