"""Limits under abuse, measured side by side on one local Serve app (the default serve config, base-model route).

    python bench/limits.py [--max-tokens 16] [--seconds 40] [--load 3.0] [overrides ...]

1. Unloaded: one-token requests one after another (p50, p99), and the `--max-tokens` request the load phase sends.
2. Big bodies: four 20 MB chat bodies arrive at once (Content-Length declared, as clients send them) while
   one-token requests are timed: their p50/p99 against the unloaded ones (goal: under 2x), and every big body 413.
3. Capacity: closed-loop clients, as many as one LLM batch holds, for `--seconds`: completed requests per second
   (a client refused with 429 sends again 50 ms later).
4. Overload: open-loop (Poisson) arrivals at `--load` times that capacity for `--seconds`: share admitted, share
   refused with 429 (and their Retry-After), any 5xx (goal: none), and the admitted requests' p99 against the
   unloaded latency of the same request (goal: under 2x).

Arguments after the options are config overrides (e.g. serve.llm.max_queued_requests=8), so settings can be
compared; results go to bench/results/limits.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import ray  # noqa: E402

from tandem.runtime import write_json  # noqa: E402
from tandem.stats import percentile  # noqa: E402

ONE_TOKEN = {"model": "chat", "max_tokens": 1, "messages": [{"role": "user", "content": "Name a colour."}]}


def summary(xs: list[float]) -> dict:
    ms = [x * 1000 for x in xs]
    return {"n": len(xs), "p50_ms": round(percentile(ms, 0.5), 1), "p99_ms": round(percentile(ms, 0.99), 1)}


def answer(max_tokens: int, i: int) -> dict:
    return {"model": "chat", "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Write a short poem about the number {i}."}]}


async def timed(c: httpx.AsyncClient, body: dict) -> tuple[int, float, httpx.Response]:
    t = time.perf_counter()
    r = await c.post("/v1/chat/completions", json=body)
    return r.status_code, time.perf_counter() - t, r


async def unloaded(c: httpx.AsyncClient, body: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        status, seconds, r = await timed(c, body)
        assert status == 200, r.text
        out.append(seconds)
    return out


async def big_bodies(c: httpx.AsyncClient, n: int) -> dict:
    huge = b'{"model": "chat", "messages": [{"role": "user", "content": "' + b"x" * (20 << 20) + b'"}]}'
    headers = {"content-type": "application/json"}
    big = [asyncio.create_task(c.post("/v1/chat/completions", content=huge, headers=headers)) for _ in range(4)]
    small = []
    while len(small) < n or not all(t.done() for t in big):
        status, seconds, r = await timed(c, ONE_TOKEN)
        assert status == 200, r.text
        small.append(seconds)
    return {"big_statuses": sorted(t.result().status_code for t in big), "one_token": summary(small)}


async def capacity(base_url: str, clients: int, max_tokens: int, seconds: float) -> float:
    done, stop = 0, time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as c:
            while time.perf_counter() < stop:
                status, _, r = await timed(c, answer(max_tokens, k))
                assert status in (200, 429), r.text
                if status == 429:  # a slot freed on the replica is seen by the router a moment later
                    await asyncio.sleep(0.05)
                done += status == 200

    t0 = time.perf_counter()
    await asyncio.gather(*[client(k) for k in range(clients)])
    return done / (time.perf_counter() - t0)


async def overload(base_url: str, rate: float, max_tokens: int, seconds: float) -> dict:
    rng, tasks = random.Random(0), []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as c:
        stop, i = time.perf_counter() + seconds, 0
        while time.perf_counter() < stop:
            tasks.append(asyncio.create_task(timed(c, answer(max_tokens, i))))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    admitted = [s for status, s, _ in results if status == 200]
    refused = [r for status, _, r in results if status == 429]
    return {"sent": len(results), "rate_per_s": round(rate, 2), "admitted": summary(admitted) if admitted else None,
            "refused_429": len(refused), "retry_after": sorted({r.headers.get("retry-after") for r in refused}),
            "server_errors": sum(status >= 500 for status, _, _ in results),
            "other": sorted({status for status, _, _ in results} - {200, 429})}


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--load", type=float, default=3.0)
    ap.add_argument("--workdir", default=".tandem/bench-limits")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    os.environ["TANDEM_HOME"] = str(work)
    from ray import serve

    from serving.app import build_app
    from tandem.config import load_config
    from tandem.milvus import milvus_endpoint

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with milvus_endpoint(str(work / "server.db")) as uri:
        cfg = load_config("serve", [f"store.uri={uri}", "serve.port=8021", "serve.controller=false",
                                    "serve.llm.engine=hf",
                                    *args.overrides])
        serve.start(http_options={"host": "127.0.0.1", "port": 8021})
        serve.run(build_app(cfg), name="tandem", route_prefix="/")
        base_url = "http://127.0.0.1:8021"

        async def run() -> dict:
            async with httpx.AsyncClient(base_url=base_url, timeout=600) as c:
                await unloaded(c, ONE_TOKEN, 5)  # warm
                one = await unloaded(c, ONE_TOKEN, 30)
                full = await unloaded(c, answer(args.max_tokens, 0), 10)
                bodies = await big_bodies(c, 30)
            per_s = await capacity(base_url, cfg.serve.llm.max_batch_size, args.max_tokens, args.seconds)
            over = await overload(base_url, args.load * per_s, args.max_tokens, args.seconds)
            return {"unloaded": {"one_token": summary(one), f"{args.max_tokens}_tokens": summary(full)},
                    "big_bodies": bodies, "capacity_per_s": round(per_s, 2), "overload": over}

        result = {"overrides": args.overrides, "max_tokens": args.max_tokens, **asyncio.run(run())}
        unl = result["unloaded"]
        result["big_bodies"]["p99_ratio"] = round(
            result["big_bodies"]["one_token"]["p99_ms"] / unl["one_token"]["p99_ms"], 2)
        if result["overload"]["admitted"]:
            result["overload"]["admitted_p99_ratio"] = round(
                result["overload"]["admitted"]["p99_ms"] / unl[f"{args.max_tokens}_tokens"]["p99_ms"], 2)
        serve.shutdown()
    print(json.dumps(result, indent=2))
    write_json(Path(__file__).parent / "results" / "limits.json", result)
    return result


if __name__ == "__main__":
    main()
