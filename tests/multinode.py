"""A three-node Ray cluster on one machine (ray.cluster_utils.Cluster): a CPU head and two nodes declaring one
fake GPU each, to check where Tandem's GPU work lands with the cluster site (`site=cluster`, conf/site/cluster.yaml,
scaled down to three CPUs). Run by tests/test_cluster.py in its own process (a process
holds one Ray connection); prints one JSON line of findings.

    python tests/multinode.py WORKDIR MILVUS_URI CORPUS_DIR HTTP_PORT MODELS_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def actor_nodes(class_fragment: str) -> list[str]:
    from ray.util.state import list_actors

    return [a.node_id for a in list_actors(filters=[("class_name", "=", class_fragment)], limit=1000, detail=False)]


def main(workdir: str, milvus_uri: str, corpus: str, port: str, models: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    # the cluster site, as cluster/site.yaml sets it up for every Ray pod: addresses from the environment
    os.environ.update(TANDEM_HOME=workdir, TANDEM_MILVUS_URI=milvus_uri,
                      MLFLOW_TRACKING_URI=f"sqlite:///{Path(workdir) / 'mlflow.db'}")
    # + what a 3-CPU cluster fits; the base converted once for the session (23 s a conversion)
    small = ["site=cluster", f"mlflow.artifacts={Path(workdir) / 'mlartifacts'}", f"model.cache_dir={models}"]
    findings: dict = {"seconds": {}}
    clock = time.monotonic()

    def lap(phase: str) -> None:  # where the test's minutes go, printed with the findings
        nonlocal clock
        findings["seconds"][phase], clock = round(time.monotonic() - clock, 1), time.monotonic()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": True,
                                                           "dashboard_host": "127.0.0.1"})
    gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1).node_id for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    findings.update(gpu_nodes=gpu_nodes, head=ray.get_runtime_context().get_node_id())
    lap("cluster")

    # Embedding: one actor per GPU, on the GPU nodes, each falling back to the CPU inside (no CUDA here).
    from jobs.index import main as index_main

    summary = index_main([*small, f"corpus.path={corpus}", "store.collection=multinode", "embedder.num_actors=2",
                          "embedder.num_cpus=0.5", "embedder.torch_threads=1", "index.prepare_actors=1",
                          "index.prepare_num_cpus=0.1", "index.io_num_cpus=0.1"])
    findings["index"] = {"chunks": summary["chunks_written"], "rows": summary["rows_after"],
                         "embedder_nodes": actor_nodes("MapWorker(MapBatches(EmbedChunks))")}
    lap("index")

    # Train: two workers with a GPU each (ZeRO-2 over gloo, as there is no CUDA for NCCL).
    from jobs.dataset import main as dataset_main
    from jobs.finetune import main as finetune_main

    rows = Path(workdir) / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"What is {n}?", "response": f"{n} is a number."}) + "\n"
                            for n in range(12)))
    version = dataset_main(["add", *small, "name=numbers", f"path={rows}", "dataset.eval_fraction=0.2"])["version"]
    trained = finetune_main([*small, f"dataset=numbers@{version}", "train.backend=gloo",
                             "train.num_workers=2", "train.cpus_per_worker=0.5", "train.max_steps=2",
                             "train.checkpoint_every=2", "train.batch_size=1", "train.max_length=64"])
    from tandem.registry import Registry

    # registered where the environment's MLFLOW_TRACKING_URI points, with its lineage
    registered = Registry(os.environ["MLFLOW_TRACKING_URI"]).resolve("numbers@candidate")
    findings["train"] = {"step": trained["metrics"]["step"], "worker_nodes": actor_nodes("RayTrainWorker"),
                         "dataset": f"numbers@{version}", "registered_dataset": registered.tags["dataset"]}
    lap("train")

    # Serve: two LLM replicas asking for a GPU each, the base in 4-bit NF4 on the HF engine (the one engine that
    # serves 4-bit; two vLLM engines would not fit 3 CPUs, tests/test_vllm.py tests that one); the Router and
    # Retriever need none. Both deployments autoscale, held at two replicas here.
    from ray import serve

    from serving.app import build_app
    from tandem.config import load_config
    from tandem.keys import KeyStore

    # the cluster site serves with API keys only (conf/site/cluster.yaml: auth.mode=keys; the Secret's mount path
    # there, a file of this run's here)
    keys = Path(workdir) / "keys.json"
    _, token = KeyStore(keys).create("multinode", ["retrieve:multinode"])
    cfg = load_config("serve", [*small, f"auth.keys_file={keys}",
                                "serve.llm.autoscaling={min_replicas: 2, max_replicas: 2}",
                                "serve.llm.num_cpus=0.25", "serve.retriever.num_cpus=0.1",
                                "serve.retriever.autoscaling={min_replicas: 2, max_replicas: 2}",
                                "serve.router_replicas=1", "serve.controller=false",
                                "serve.llm.engine=hf", "serve.llm.quantization=nf4",
                                "serve.routes.assistant.collection=multinode"])
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": int(port)})
    serve.run(build_app(cfg), name="tandem", route_prefix="/")
    lap("serve_start")
    llm = serve.get_deployment_handle("LLM", "tandem")
    reply = list(llm.options(stream=True).remote({"prompt": "Hello", "adapter": None, "max_tokens": 2,
                                                  "temperature": 0.0, "top_p": 1.0, "stop": []}))
    # Both Retriever replicas, on different nodes, read the one Milvus server at once, through the HTTP API.
    import asyncio

    import httpx

    async def retrieve_burst() -> list[int]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                     headers={"authorization": f"Bearer {token}"}) as c:
            replies = await asyncio.gather(*[c.post("/v1/retrieve", json={
                "query": f"film {i}", "collection": "multinode", "k": 3, "mode": "hybrid"}) for i in range(12)])
        return [len(r.json()["data"]) if r.status_code == 200 else -r.status_code for r in replies]

    findings["retrieve"] = {"hits": asyncio.run(retrieve_burst()),
                            "retriever_nodes": actor_nodes("ServeReplica:tandem:Retriever")}
    findings["serve"] = {"llm_nodes": actor_nodes("ServeReplica:tandem:LLM"),
                         "router_nodes": actor_nodes("ServeReplica:tandem:Router"),
                         "generated": reply[-1]["completion_tokens"]}
    lap("serve_requests")
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    lap("shutdown")
    print("FINDINGS " + json.dumps(findings), flush=True)
    return findings


if __name__ == "__main__":
    main(*sys.argv[1:6])
