"""LoRA adapters as artifacts: the PEFT directory plus a manifest with checksums and lineage.

The manifest ties an adapter to the exact base weights (their sha256), the dataset version and the config it was
trained with; loading refuses an adapter whose files or base do not match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tandem.models import sha256_file

MANIFEST = "tandem-adapter.json"
WEIGHTS = "adapter_model.safetensors"


def publish_adapter(adapter_dir: str | Path, out: str | Path, lineage: dict) -> dict:
    """Copy a trained adapter to `out` with its manifest; return the manifest."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; adapters are immutable, pick another train.name")
    shutil.copytree(adapter_dir, out)
    manifest = {**lineage, "sha256": sha256_file(out / WEIGHTS), "path": str(out.resolve())}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_adapter(path: str | Path, base_sha256: str) -> dict:
    """The manifest, after checking the weights' checksum and that the adapter was trained on this base."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    actual = sha256_file(path / WEIGHTS)
    if actual != manifest["sha256"]:
        raise ValueError(f"adapter {path} is corrupt: sha256 {actual[:12]} != manifest {manifest['sha256'][:12]}")
    if manifest["base"]["sha256"] != base_sha256:
        raise ValueError(f"adapter {path} was trained on base {manifest['base']['sha256'][:12]}, "
                         f"not on the loaded base {base_sha256[:12]}")
    return manifest


def random_adapters(registry, base, name: str, count: int, out_root: str | Path, lora: dict,
                    seed: int = 0) -> list[str]:
    """Register `count` untrained LoRA adapters with random, non-identity weights as versions of `name`.

    For serving tests and benchmarks, where what an adapter says does not matter, only that each one is a real
    PEFT adapter that changes the output in its own way (a freshly initialised LoRA is the identity). Returns the
    adapter ids `name@version`.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tandem.registry import base_model_name

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], init_lora_weights=False,
                                             target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))
    base_name = base_model_name(base.source)
    base_version = registry.register_base(base_name, base.manifest())
    ids = []
    for i in range(count):
        torch.manual_seed(seed + i)
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
        tmp = Path(out_root) / f"{name}-{seed + i}.tmp"
        model.save_pretrained(tmp)
        run_id = registry.start_run(f"{name}-random-{seed + i}", {"lora": dict(lora)}, {"kind": "random_adapter"})
        manifest = publish_adapter(tmp, Path(out_root) / f"{name}-{seed + i}",
                                   {"name": f"{name}-{seed + i}", "base": base.manifest(), "dataset": "none",
                                    "code_version": "random"})
        shutil.rmtree(tmp)
        version = registry.register_adapter(name, run_id, manifest["path"], manifest, base_name, base_version)
        registry.end_run(run_id)
        ids.append(f"{name}@{version}")
    return ids
