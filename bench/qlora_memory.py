"""Memory of QLoRA (4-bit NF4 base + LoRA) vs bf16 LoRA vs full bf16 fine-tuning, same model and batch.

Each variant runs in its own process for a few AdamW steps. `model_mb` is the model's tensor bytes
(`get_memory_footprint`), `optimizer_mb` the bytes of AdamW's state after the steps. `peak_mb` is, on a GPU,
`torch.cuda.max_memory_allocated` (model, adapters, optimizer state, activations); on a CPU the process's peak RSS
above its RSS after imports, which also holds the allocator's and kernels' own overhead (~1 GB here) and so
understates the differences.

    python bench/qlora_memory.py [--steps 3] [--seq 256] [--batch 1] [--model smollm2|llama-1b]

`--model llama-1b` builds, once, a model of TinyLlama-1.1B's shape (Llama, 22 layers, hidden 2048, vocabulary 32000)
with random weights: memory depends on shapes, not on trained values, so no download is needed. Full fine-tuning
is left out at that size (its AdamW state alone is 8.8 GB).
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
    vocab = model.config.vocab_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(100, vocab - 1, (batch, seq), device=device)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    return {"variant": variant, "device": device.type, "model_mb": round(footprint / 2**20),
            "optimizer_mb": round(state / 2**20),
            "peak_mb": round(peak / 2**20), "trainable_params": sum(p.numel() for p in params),
            "final_loss": round(loss.item(), 3)}


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model", choices=("smollm2", "llama-1b"), default="smollm2")
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
    base_path = (prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype).path if args.model == "smollm2"
                 else random_llama(Path(cfg.workdir).expanduser() / "bench-models" / "llama-1b"))
    rows = {}
    for variant in VARIANTS if args.model == "smollm2" else ("qlora_nf4", "lora_bf16"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--base", str(base_path),
                              "--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[variant], flush=True)
    q, lo = rows["qlora_nf4"], rows["lora_bf16"]
    result = {"model": args.model, "base": str(base_path), "batch": args.batch, "seq": args.seq, "variants": rows,
              "qlora_vs_lora_peak": round(q["peak_mb"] / lo["peak_mb"], 3),
              "qlora_vs_lora_model": round(q["model_mb"] / lo["model_mb"], 3),
              "qlora_vs_lora_model_and_optimizer": round((q["model_mb"] + q["optimizer_mb"]) /
                                                         (lo["model_mb"] + lo["optimizer_mb"]), 3)}
    if "full_bf16" in rows:
        result["qlora_vs_full_peak"] = round(q["peak_mb"] / rows["full_bf16"]["peak_mb"], 3)
    print(json.dumps(result, indent=2))
    name = "qlora_memory.json" if args.model == "smollm2" else f"qlora_memory-{args.model}.json"
    write_json(Path(__file__).parent / "results" / name, result)
    return result


def random_llama(path: Path, tokenizer_from: str | None = None) -> Path:
    """A Llama of TinyLlama-1.1B's shape with random bf16 weights, written once. With `tokenizer_from` (a
    `model.path`), that base's tokenizer is saved beside the weights and sizes the vocabulary, so jobs can tokenize
    for it."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tandem.config import load_config
    from tandem.models import load_tokenizer, prepare_base

    tokenizer = None
    if tokenizer_from:
        m = load_config("finetune").model
        tokenizer = load_tokenizer(prepare_base(tokenizer_from, m.cache_dir, m.dtype))
    config = LlamaConfig(vocab_size=len(tokenizer) if tokenizer else 32000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"random Llama: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    main()
