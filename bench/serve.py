"""Serving overheads and mixed-adapter batching, measured side by side on one local Serve app.

    python bench/serve.py [--queries 200] [--burst 32] [--max-tokens 24] [--rounds 2]

1. Retriever: the same queries through HTTP (POST /v1/retrieve) and through the tandem Retriever in this process,
   both on one Milvus server with one embedding thread: p50 latency added by HTTP + Serve, and sequential QPS.
2. Router overhead: POST /v1/chat/completions on the base route vs the LLM deployment's handle called directly with
   the same rendered prompt, max_tokens=1: the p50 difference is what the proxy and the Router add.
3. Mixed-adapter batching: one burst of concurrent requests spread over 8 adapters vs the same burst on one adapter
   (all adapters loaded first), every request generating exactly max_tokens (`ignore_eos`, so different adapters'
   answer lengths do not count): generated tokens/s and their ratio; runs alternate, the median counts. The LLM's
   stats say how wide its generate calls were (rows, and adapters in one forward pass).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # random_adapters

import httpx  # noqa: E402
import ray  # noqa: E402

from tandem.runtime import write_json  # noqa: E402

QUERIES = ["a film directed by Stanley Kubrick", "impressionist painting of a river", "a famous opera composer",
           "a novel about a whale", "a Renaissance sculpture in Florence", "a rock band from Liverpool"]


def p50(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 2)


async def burst(base_url: str, models: list[str], max_tokens: int) -> tuple[float, int]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as c:
        t0 = time.perf_counter()
        replies = await asyncio.gather(*[
            c.post("/v1/chat/completions", json={"model": m, "max_tokens": max_tokens, "ignore_eos": True, "messages": [
                {"role": "user", "content": f"Write a short poem about the number {i}."}]})
            for i, m in enumerate(models)])
        elapsed = time.perf_counter() - t0
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    return elapsed, sum(r.json()["usage"]["completion_tokens"] for r in replies)


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default=".tandem/bench-serve")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    os.environ["TANDEM_HOME"] = str(work)
    from ray import serve

    from jobs.index import main as index_main
    from random_adapters import random_adapters
    from serving.app import build_app
    from tandem.config import load_config
    from tandem.datasets import wiki_source
    from tandem.embedding import Embedder
    from tandem.milvus import connect, milvus_endpoint
    from tandem.models import load_tokenizer, prepare_base
    from tandem.registry import Registry
    from tandem.retrieval import Retriever

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with milvus_endpoint(str(work / "server.db")) as uri:
        corpus = work / "corpus" / "wiki.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps({"id": k, "title": v["title"], "text": v["extract"]}) + "\n"
                                  for k, v in list(json.loads(wiki_source().read_text()).items())[:400]))
        index_main([f"corpus.path={corpus.parent}", f"store.uri={uri}", "store.collection=wiki"])
        cfg = load_config("serve", [f"store.uri={uri}", "serve.port=8019", "embedder.torch_threads=1",
                                    "serve.llm.engine=hf",
                                    "+serve.routes.bench={adapter: bench, rag: false}", "serve.llm.max_adapters=8",
                                    "serve.llm.max_batch_size=8", f"serve.llm.max_new_tokens={args.max_tokens}"])
        registry = Registry.from_config(cfg)
        base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
        try:
            adapters = [f"bench@{registry.resolve(f'bench@{v}').version}" for v in range(1, 9)]
        except Exception:
            adapters = random_adapters(registry, base, "bench", 8, work / "adapters", cfg.lora)
        registry.set_alias("bench", "production", adapters[0].split("@")[1], reason="bench")
        serve.start(http_options={"host": "127.0.0.1", "port": 8019})
        serve.run(build_app(cfg), name="tandem", route_prefix="/")
        base_url = "http://127.0.0.1:8019"
        http = httpx.Client(base_url=base_url, timeout=600)

        # 1. Retriever over HTTP vs in-process
        embedder = Embedder(cfg.embedder.model, device="cpu", torch_threads=1)
        client = connect(uri)
        direct = Retriever.from_config(client, "wiki", embedder.encode, cfg)
        queries = [QUERIES[i % len(QUERIES)] + f" {i}" for i in range(args.queries)]
        timings: dict[str, list[float]] = {"direct": [], "http": []}
        for q in queries[:10]:  # warm both paths
            direct.search([q], k=5, mode="hybrid")
            http.post("/v1/retrieve", json={"query": q, "collection": "wiki", "k": 5})
        for q in queries:
            t = time.perf_counter()
            direct.search([q], k=5, mode="hybrid")
            timings["direct"].append(time.perf_counter() - t)
            t = time.perf_counter()
            r = http.post("/v1/retrieve", json={"query": q, "collection": "wiki", "k": 5})
            timings["http"].append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        retriever = {"p50_ms": {k: p50(v) for k, v in timings.items()},
                     "qps": {k: round(len(v) / sum(v), 1) for k, v in timings.items()}}
        retriever["added_p50_ms"] = round(retriever["p50_ms"]["http"] - retriever["p50_ms"]["direct"], 2)
        retriever["qps_ratio_http_vs_direct"] = round(retriever["qps"]["http"] / retriever["qps"]["direct"], 2)
        print("retriever", json.dumps(retriever), flush=True)

        # 2. Router overhead: HTTP chat vs the LLM handle, same prompt, one token
        tokenizer = load_tokenizer(base)
        llm = serve.get_deployment_handle("LLM", "tandem")
        messages = [{"role": "user", "content": "Name a colour."}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        payload = {"prompt": prompt, "adapter": None, "max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "stop": []}
        timings = {"llm_handle": [], "http_router": []}
        for i in range(40):
            t = time.perf_counter()
            list(llm.options(stream=True).remote(payload))
            if i >= 5:
                timings["llm_handle"].append(time.perf_counter() - t)
            t = time.perf_counter()
            r = http.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 1, "messages": messages})
            if i >= 5:
                timings["http_router"].append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        router = {"p50_ms": {k: p50(v) for k, v in timings.items()}}
        router["overhead_p50_ms"] = round(router["p50_ms"]["http_router"] - router["p50_ms"]["llm_handle"], 2)
        print("router", json.dumps(router), flush=True)

        # 3. Mixed-adapter batching: 8 adapters vs 1 in the same burst
        asyncio.run(burst(base_url, adapters, 2))  # load all 8 adapters on the replica first
        runs: dict[str, list[float]] = {"one_adapter": [], "eight_adapters": []}
        for _ in range(args.rounds):
            for name, models in (("one_adapter", [adapters[0]] * args.burst),
                                 ("eight_adapters", [adapters[i % 8] for i in range(args.burst)])):
                elapsed, tokens = asyncio.run(burst(base_url, models, args.max_tokens))
                runs[name].append(tokens / elapsed)
                print(name, round(tokens / elapsed, 1), "tokens/s", flush=True)
        stats = llm.stats.remote().result()
        mixed = {"tokens_per_s": {k: round(statistics.median(v), 1) for k, v in runs.items()},
                 "burst": args.burst, "max_tokens": args.max_tokens, "llm": stats}
        mixed["eight_vs_one"] = round(mixed["tokens_per_s"]["eight_adapters"] / mixed["tokens_per_s"]["one_adapter"], 2)
        serve.shutdown()
        client.close()
    result = {"retriever": retriever, "router": router, "mixed_adapters": mixed}
    print(json.dumps(result, indent=2))
    write_json(Path(__file__).parent / "results" / "serve.json", result)
    return result


if __name__ == "__main__":
    main()
