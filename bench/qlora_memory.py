"""Memory of QLoRA (4-bit NF4 base + LoRA) vs bf16 LoRA vs full bf16 fine-tuning, same model and batch.

Each variant runs in its own process for a few AdamW steps. `model_mb` is the model's tensor bytes
(`get_memory_footprint`). `peak_mb` is, on a GPU, `torch.cuda.max_memory_allocated` (model, adapters, optimizer
state, activations); on a CPU the process's peak RSS above its RSS after imports, which also holds the allocator's
and kernels' own overhead (~1 GB here) and so understates the differences.

    python bench/qlora_memory.py [--steps 3] [--seq 256] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {"qlora_nf4": ("nf4", True), "lora_bf16": ("none", True), "full_bf16": ("none", False)}


def run_variant(variant: str, base_path: str, steps: int, seq: int, batch: int) -> dict:
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from tandem.config import LoraSettings
    from tandem.models import load_for_training

    quant, lora = VARIANTS[variant]
    torch.manual_seed(0)
    before = psutil.Process().memory_info().rss
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if lora:
        model = load_for_training(base_path, quant, device, LoraSettings(), gradient_checkpointing=True,
                                  dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16).to(device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    footprint = model.get_memory_footprint()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(100, 30000, (batch, seq), device=device)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"variant": variant, "device": device.type, "model_mb": round(footprint / 2**20),
            "peak_mb": round(peak / 2**20), "trainable_params": sum(p.numel() for p in params),
            "final_loss": round(loss.item(), 3)}


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.base, args.steps, args.seq, args.batch)))
        return {}

    from tandem.config import load_config
    from tandem.models import prepare_base
    from tandem.runtime import write_json

    cfg = load_config("finetune")
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    rows = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--base", str(base.path),
                              "--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[variant], flush=True)
    result = {"base": str(base.path), "batch": args.batch, "seq": args.seq, "variants": rows,
              "qlora_vs_lora_peak": round(rows["qlora_nf4"]["peak_mb"] / rows["lora_bf16"]["peak_mb"], 3),
              "qlora_vs_lora_model": round(rows["qlora_nf4"]["model_mb"] / rows["lora_bf16"]["model_mb"], 3),
              "qlora_vs_full_peak": round(rows["qlora_nf4"]["peak_mb"] / rows["full_bf16"]["peak_mb"], 3)}
    print(json.dumps(result, indent=2))
    write_json(Path(__file__).parent / "results" / "qlora_memory.json", result)
    return result


if __name__ == "__main__":
    main()
