"""Gathered LoRA vs PEFT's mixed-batch forward, in the continuous-batching engine, side by side in one run.

A burst of requests (ignore_eos, exactly --max-tokens each) on the demo base with 8 LoRA adapters of random weights
(`lora.*` settings: r=8 on all seven projections), spread over all 8 adapters or all on one, with each kernel:
generated tokens/s, the 8-vs-1 ratio per kernel (the issue's goal: >= 0.9x), and gathered vs PEFT. Rounds
alternate; the median counts.

    python bench/lora_kernel.py [--burst 32] [--max-tokens 24] [--rounds 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tandem.runtime import write_json  # noqa: E402


def model_with_adapters(count: int, device: str = "cpu", model_path: str | None = None,
                        quantization: str = "none"):
    """The serve config's base (or `model_path`, e.g. random weights of its shape on a bare GPU machine), loaded as
    the HF engine loads it, with `count` LoRA adapters of random weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tandem.config import load_config
    from tandem.models import load_for_inference, load_tokenizer, prepare_base

    cfg = load_config("serve", [f"model.path={model_path}"] if model_path else [])
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, init_lora_weights=False,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(load_for_inference(base.path, quantization=quantization, device=device), lora,
                           adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", lora)
    for i in range(count):
        torch.manual_seed(i)
        for module in model.modules():
            if hasattr(module, "lora_B") and f"a{i}" in module.lora_B:
                torch.nn.init.normal_(module.lora_B[f"a{i}"].weight, std=0.02)
    return model.eval(), load_tokenizer(base)


def burst(submit, adapters: list[str], max_tokens: int) -> float:
    """Generated tokens/s of one request per entry of `adapters`, all sent at once through
    `submit(text, max_tokens, adapter, emit)`, exactly max_tokens each."""
    done = threading.Semaphore(0)
    tokens = []

    def emit(event):
        if event.get("finish_reason") or "error" in event:
            tokens.append(event.get("completion_tokens", 0))
            done.release()

    started = time.perf_counter()
    for i, adapter in enumerate(adapters):
        submit(f"Write a short poem about {i}.", max_tokens, adapter, emit)
    for _ in adapters:
        done.acquire()
    return sum(tokens) / (time.perf_counter() - started)


def submitter(engine, tokenizer):
    """`burst`'s submit for the bare continuous-batching engine."""
    from tandem.engine import Completion

    def submit(text: str, max_tokens: int, adapter: str | None, emit) -> None:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False)
        engine.submit(Completion(prompt, max_tokens, ignore_eos=True), adapter, emit)
    return submit


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-path", help="a base other than the serve config's model.path")
    ap.add_argument("--quantization", default="none", choices=("none", "nf4", "int8"))
    args = ap.parse_args()
    import torch

    from tandem.engine import Engine
    from tandem.gathered_lora import GatheredLoRA

    torch.set_num_threads(2)
    model, tokenizer = model_with_adapters(8, args.device, args.model_path, args.quantization)
    gathered = GatheredLoRA(model)
    engines = {"peft": submitter(Engine(lambda: model, tokenizer, 8, 8), tokenizer),
               "gathered": submitter(Engine(lambda: model, tokenizer, 8, 8, gathered=lambda: gathered), tokenizer)}
    spreads = {"one_adapter": ["a0"] * args.burst, "eight_adapters": [f"a{i % 8}" for i in range(args.burst)]}
    for submit in engines.values():
        burst(submit, spreads["eight_adapters"][:8], 2)  # warm up
    runs = {(k, s): [] for k in engines for s in spreads}
    for _ in range(args.rounds):
        for kernel, submit in engines.items():
            for spread, adapters in spreads.items():
                rate = burst(submit, adapters, args.max_tokens)
                runs[kernel, spread].append(rate)
                print(kernel, spread, round(rate, 1), "tokens/s", flush=True)
    rate = {f"{k}/{s}": round(statistics.median(v), 1) for (k, s), v in runs.items()}
    result = {"burst": args.burst, "max_tokens": args.max_tokens, "device": args.device,
              "quantization": args.quantization, "tokens_per_s": rate,
              "eight_vs_one": {k: round(rate[f"{k}/eight_adapters"] / rate[f"{k}/one_adapter"], 2) for k in engines},
              "gathered_vs_peft_eight_adapters": round(rate["gathered/eight_adapters"] / rate["peft/eight_adapters"],
                                                       2)}
    print(json.dumps(result, indent=2))
    name = "lora_kernel.json" if args.quantization == "none" else f"lora_kernel-{args.quantization}.json"
    write_json(Path(__file__).parent / "results" / name, result)
    return result


if __name__ == "__main__":
    main()
