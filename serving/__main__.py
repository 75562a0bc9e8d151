"""Start the Serve app (OpenAI-compatible HTTP over RAG and the adapters) and keep it up.

    python -m serving [serve.port=8000] [serve.ask="a question"] key=value ...    (or: tandem serve ...)

On a cluster (RAY_ADDRESS or ray.address) it deploys there; otherwise it starts a local Ray. Binds 127.0.0.1
unless serve.host says otherwise. SIGINT/SIGTERM shut Serve down gracefully: in-flight requests finish and are
logged first.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from tandem.commandline import Job, run
from tandem.config import RANKING_KEYS
from tandem.runtime import ray_session

JOB = Job("serve", __doc__, ("serve", "auth.mode", "auth.keys_file", "model", "store.uri", "store.collection",
                             "store.search_params", *RANKING_KEYS, "embedder.model", "embedder.device", "mlflow",
                             "rollout"), module="serving")


def ask(base_url: str, route: str, question: str) -> dict:
    """One chat completion through the official client, as any user would send it (with $TANDEM_API_KEY when the
    app asks for keys)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("TANDEM_API_KEY", "unused"), max_retries=0,
                    timeout=600)
    reply = client.chat.completions.create(model=route, messages=[{"role": "user", "content": question}],
                                           user="demo")
    return reply.model_dump()


def main(argv: list[str] | None = None) -> None:
    from ray import serve

    from serving.app import build_app

    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    s = cfg.serve
    stop = threading.Event()
    with ray_session(cfg.ray):
        serve.start(http_options={"host": s.host, "port": s.port})
        serve.run(build_app(cfg), name=s.app_name, route_prefix=s.route_prefix)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
            signal.signal(sig, lambda *_: stop.set())
        base_url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
        route = next(iter(s.routes), None)
        if s.ask and route:
            reply = ask(base_url, route, s.ask)
            print(f"Q: {s.ask}\nA: {reply['choices'][0]['message']['content']}")
            print(json.dumps({"tandem": reply.get("tandem"),
                              "sources": [(x["index"], x["title"], round(x["score"], 4)) for x in reply["sources"]]}))
        print(f"""
Tandem is serving on {base_url} (Ctrl-C stops it). Routes: {', '.join(s.routes)}.
  curl -s {base_url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "{route}", "messages": [{{"role": "user", "content": "Who wrote Hamlet?"}}]}}'
  python -c "from openai import OpenAI; c = OpenAI(base_url='{base_url}/v1', api_key='x'); \\
print(c.chat.completions.create(model='{route}', messages=[{{'role': 'user', 'content': 'Who wrote Hamlet?'}}]))"
  GET {base_url}/v1/models · POST {base_url}/v1/retrieve · POST {base_url}/v1/feedback · GET {base_url}/healthz
""", flush=True)
        stop.wait()
        print("stopping: in-flight requests finish first", flush=True)
        serve.delete(s.app_name)  # drains the replicas while the proxy still delivers their answers
        serve.shutdown()


if __name__ == "__main__":
    run(main)
