"""Test and benchmark scaffolding: registered LoRA adapters with random weights, no training needed."""

from __future__ import annotations

import shutil
from pathlib import Path

from tandem.adapters import publish_adapter


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
