"""The two serving engines side by side in one run: `serve.llm.engine=hf` vs `serve.llm.engine=vllm`.

Both are driven through the LLM deployment's engine calls (`load`, `start`), with the same adapters (random LoRA
weights with the demo's `lora.*` settings, saved as PEFT adapters) and the same requests:

1. the serving load of bench/batching.py: Poisson arrivals, max_tokens between 8 and 128 (`ignore_eos`), 4 adapters
   plus the base: useful tokens/s, time to first token p50/p99, end-to-end latency;
2. a burst (--burst requests x --max-tokens) on one adapter vs spread over eight: tokens/s and the 8-vs-1 ratio per
   engine (goal >= 0.9x); rounds alternate, the median counts.

The faster engine under the load is the one `conf/site/local.yaml` should name.

    python bench/engines.py [--requests 40] [--rate 0.35] [--burst 32] [--max-tokens 24] [--rounds 2]
                            [--engines hf,vllm] [key=value ...]   (serve config overrides, e.g. serve.llm.vllm.*)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.batching import ADAPTERS, replay, summary, workload  # noqa: E402
from bench.lora_kernel import burst, model_with_adapters  # noqa: E402
from tandem.runtime import write_json  # noqa: E402


def saved_adapters(count: int, root: Path) -> dict[str, Path]:
    """`count` random adapters as PEFT writes them, one directory each."""
    model, _ = model_with_adapters(count)
    names = [f"a{i}" for i in range(count)]
    model.save_pretrained(root, selected_adapters=names)
    return {name: root / name for name in names}


class Driver:
    """Calls an engine's coroutines from the benchmark's threads, on an event loop of its own."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def submit(self, text: str, max_tokens: int, adapter: str | None, emit) -> None:
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=False)
        request = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "stop": [],
                   "ignore_eos": True, "regex": None}
        self.call(self.engine.start(request, adapter, emit))

    def arrivals(self, request, first_token, done) -> None:
        """bench/batching.py's `submit`: timestamps of the first token and of the end."""
        def emit(event):
            first_token()
            if event.get("finish_reason") or "error" in event:
                done()
        self.submit(request["text"], request["max_tokens"], request["adapter"], emit)


def make_engine(kind: str, cfg, base):
    if kind == "vllm":
        from serving.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, base, lambda names: None)
    from serving.hf_engine import HFEngine

    return HFEngine(cfg, base, lambda names: None, threading.RLock())


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=0.35, help="mean arrivals per second")
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--seed", type=int, default=0)
    args, overrides = ap.parse_known_args()
    import ray
    from omegaconf import OmegaConf

    from serving.vllm_engine import vllm_python
    from tandem.config import load_config
    from tandem.models import load_tokenizer, prepare_base

    # both engines: 8 adapters kept, 8 rows a step; the HF engine's torch on 2 threads, vLLM bound as configured
    # (serve.llm.vllm.cpu_bind: auto computes on one core of two)
    cfg = load_config("serve", ["serve.llm.max_adapters=8", "serve.llm.max_batch_size=8", "serve.llm.torch_threads=2",
                                "serve.llm.max_context=1024", *overrides])
    if "vllm" in args.engines.split(","):
        cfg = OmegaConf.merge(cfg, {"serve": {"llm": {"vllm": {"python": str(vllm_python(cfg.serve.llm))}}}})
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    tokenizer = load_tokenizer(base)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    load = workload(args.requests, args.rate, args.seed)
    spreads = {"one_adapter": ["a0"] * args.burst, "eight_adapters": [f"a{i % 8}" for i in range(args.burst)]}
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = saved_adapters(8, Path(tmp))
        for kind in args.engines.split(","):
            engine = make_engine(kind, cfg, base)
            driver = Driver(engine, tokenizer)
            for name, path in paths.items():
                driver.call(engine.load(name, path))
            burst(driver.submit, spreads["eight_adapters"][:8], 2)  # warm up
            runs = {spread: [] for spread in spreads}
            for _ in range(args.rounds):
                for spread, adapters in spreads.items():
                    runs[spread].append(burst(driver.submit, adapters, args.max_tokens))
                    print(kind, spread, round(runs[spread][-1], 1), "tokens/s", flush=True)
            median = {spread: round(statistics.median(rates), 1) for spread, rates in runs.items()}
            engines[kind] = {"load": summary(load, replay(load, driver.arrivals)), "burst_tokens_per_s": median,
                             "eight_vs_one": round(median["eight_adapters"] / median["one_adapter"], 2)}
            print(kind, engines[kind], flush=True)
            engine.shutdown()
    result = {"requests": args.requests, "rate_per_s": args.rate, "max_tokens": [8, 128], "adapters": ADAPTERS,
              "burst": args.burst, "burst_max_tokens": args.max_tokens, "vllm_dtype": cfg.serve.llm.vllm.dtype,
              "vllm_cpu_bind": cfg.serve.llm.vllm.cpu_bind,
              "engines": engines}
    if {"hf", "vllm"} <= set(engines):
        hf, vllm = engines["hf"]["load"], engines["vllm"]["load"]
        result["vllm_vs_hf"] = {"tokens_per_s": round(vllm["tokens_per_s"] / hf["tokens_per_s"], 2),
                                "ttft_p99": round(vllm["ttft_p99_s"] / hf["ttft_p99_s"], 2)}
    print(json.dumps(result, indent=2))
    write_json(Path(__file__).parent / "results" / "engines.json", result)
    return result


if __name__ == "__main__":
    main()
