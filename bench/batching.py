"""Continuous vs static batching on the HF engine, side by side in one run, under the same Poisson arrivals.

The load the serving issue names: requests arrive as a Poisson process, each with `max_tokens` drawn between 8 and
128 and generating exactly that many (`ignore_eos`), spread over 4 LoRA adapters (random weights, the demo's
`lora.*` settings) and the base. Both arms use the same gathered-LoRA kernel and batch width; only the batching
differs:

- static: what the LLM deployment did under `@serve.batch` before the engine: waiting requests (up to the batch
  width) run as one `generate` call to the longest `max_tokens` among them, and later arrivals wait for it to end;
- continuous: `tandem.engine.Engine`, where requests join and leave the running batch at every decode step.

Per arm: useful tokens/s (each request's own max_tokens, over the time from the first arrival to the last answer),
time to first token (p50, p99) and end-to-end latency. Goals: tokens/s >= 1.5x static, p99 TTFT <= 0.5x static.

    python bench/batching.py [--requests 40] [--rate 0.35] [--seed 0] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lora_kernel import model_with_adapters  # noqa: E402
from tandem.runtime import write_json  # noqa: E402
from tandem.stats import percentile  # noqa: E402

ADAPTERS = [None, "a0", "a1", "a2", "a3"]


def workload(n: int, rate: float, seed: int) -> list[dict]:
    """Arrival times (exponential gaps), max_tokens and adapters: the same list for both arms."""
    rng, at = random.Random(seed), 0.0
    load = []
    for i in range(n):
        at += rng.expovariate(rate)
        load.append({"at": at, "max_tokens": rng.randint(8, 128), "adapter": rng.choice(ADAPTERS),
                     "text": f"Write a short story about the number {i}."})
    return load


def replay(load: list[dict], submit) -> list[dict]:
    """Submit each request at its arrival time; `submit(request, first_token, done)` calls back with timestamps."""
    results = [{} for _ in load]
    finished = threading.Semaphore(0)
    started = time.perf_counter()
    for request, result in zip(load, results):
        time.sleep(max(0.0, started + request["at"] - time.perf_counter()))
        result["arrived"] = time.perf_counter()

        def first_token(result=result):
            result.setdefault("first", time.perf_counter())

        def done(result=result):
            result["done"] = time.perf_counter()
            finished.release()
        submit(request, first_token, done)
    for _ in load:
        finished.acquire()
    return results


def continuous(engine, tokenizer):
    from tandem.engine import Completion

    def submit(request, first_token, done):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": request["text"]}],
                                               add_generation_prompt=True, tokenize=False)

        def emit(event):
            first_token()
            if event.get("finish_reason") or "error" in event:
                done()
        engine.submit(Completion(prompt, request["max_tokens"], ignore_eos=True), request["adapter"], emit)
    return submit


class Static:
    """Batches as `@serve.batch` formed them: whatever waits when the last generate call ends, up to `width`."""

    def __init__(self, model, tokenizer, gathered, width: int):
        self.model, self.tokenizer, self.gathered, self.width = model, tokenizer, gathered, width
        self.waiting, self.wake = [], threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, request, first_token, done):
        with self.wake:
            self.waiting.append((request, first_token, done))
            self.wake.notify()

    def _run(self):
        import torch
        from transformers import LogitsProcessorList

        while True:
            with self.wake:
                while not self.waiting:
                    self.wake.wait()
                batch, self.waiting = self.waiting[: self.width], self.waiting[self.width:]
            prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": r["text"]}],
                                                          add_generation_prompt=True, tokenize=False)
                       for r, _, _ in batch]
            self.tokenizer.padding_side = "left"
            inputs = self.tokenizer(prompts, return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(self.model.device)
            longest = max(r["max_tokens"] for r, _, _ in batch)

            def first_step(input_ids, scores, batch=batch):
                if input_ids.shape[1] == inputs["input_ids"].shape[1]:  # the prefill's logits: first tokens
                    for _, first_token, _ in batch:
                        first_token()
                return scores
            with torch.no_grad(), self.gathered.rows([r["adapter"] for r, _, _ in batch]):
                self.model.generate(**inputs, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                    pad_token_id=self.tokenizer.pad_token_id,
                                    logits_processor=LogitsProcessorList([first_step]))
            for _, _, done in batch:
                done()


def summary(load: list[dict], results: list[dict]) -> dict:
    ttft = [r["first"] - r["arrived"] for r in results]
    e2e = [r["done"] - r["arrived"] for r in results]
    span = max(r["done"] for r in results) - min(r["arrived"] for r in results)
    return {"tokens_per_s": round(sum(q["max_tokens"] for q in load) / span, 1),
            "ttft_p50_s": round(percentile(ttft, 0.5), 2), "ttft_p99_s": round(percentile(ttft, 0.99), 2),
            "e2e_p50_s": round(percentile(e2e, 0.5), 2), "e2e_p99_s": round(percentile(e2e, 0.99), 2)}


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=0.35, help="mean arrivals per second")
    ap.add_argument("--width", type=int, default=8, help="rows per batch, both arms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-path", help="a base other than the serve config's model.path")
    args = ap.parse_args()
    import torch

    from tandem.engine import Engine
    from tandem.gathered_lora import GatheredLoRA

    torch.set_num_threads(2)
    model, tokenizer = model_with_adapters(4, args.device, args.model_path)
    gathered = GatheredLoRA(model)
    engine = Engine(lambda: model, tokenizer, args.width, 4, gathered=lambda: gathered)
    static = Static(model, tokenizer, gathered, args.width)
    load = workload(args.requests, args.rate, args.seed)
    warm = workload(4, 10.0, args.seed + 1)
    for arm in (continuous(engine, tokenizer), static.submit):
        replay([dict(r, max_tokens=4) for r in warm], arm)
    arms = {}
    for name, submit in (("static", static.submit), ("continuous", continuous(engine, tokenizer))):
        arms[name] = summary(load, replay(load, submit))
        print(name, arms[name], flush=True)
    s, c = arms["static"], arms["continuous"]
    result = {"requests": args.requests, "rate_per_s": args.rate, "width": args.width, "seed": args.seed,
              "device": args.device,
              "max_tokens": [8, 128], "adapters": ADAPTERS, "arms": arms,
              "continuous_vs_static": {"tokens_per_s": round(c["tokens_per_s"] / s["tokens_per_s"], 2),
                                       "ttft_p99": round(c["ttft_p99_s"] / s["ttft_p99_s"], 2),
                                       "ttft_p50": round(c["ttft_p50_s"] / s["ttft_p50_s"], 2)}}
    print(json.dumps(result, indent=2))
    write_json(Path(__file__).parent / "results" / "batching.json", result)
    return result


if __name__ == "__main__":
    main()
