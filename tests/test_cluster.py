"""Tandem on a Ray cluster it did not start: a `ray start --head` on 127.0.0.1 and the real job server.

Ray 2.60 turns token authentication on by default; the CLI and the job client pick the token up from
RAY_AUTH_MODE=token (the token is generated into ~/.ray/auth_token by the first `ray start`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_corpus
from tandem.store import free_port

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A separate Ray head (its own ports and temp dir) run with --block, so stopping it stops only it."""
    # as from an activated venv: the job's `python` is this one
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    dashboard = free_port()
    temp = tmp_path_factory.mktemp("rayhead")
    proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             f"--ray-client-server-port={free_port()}", f"--temp-dir={temp}",
                             "--include-dashboard=true"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the job server did not come up"
        time.sleep(2)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def test_index_job_through_ray_job_submit(head, milvus_server, wiki_rows, tmp_path):
    address, env = head
    corpus = write_corpus(tmp_path / "corpus", wiki_rows[:20])
    summary = tmp_path / "summary.json"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", "python", "-m", "jobs.index",
         f"corpus.path={corpus}", f"store.uri={milvus_server}", "store.collection=submitted",
         f"index.summary_path={summary}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    job_id = next(line.split("'")[1] for line in submit.stdout.splitlines() if "submitted successfully" in line)
    status = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env, capture_output=True,
                            text=True)
    assert "succeeded" in status.stdout.lower()
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True).stdout
    result = json.loads(summary.read_text())
    assert result["documents_indexed"] == 20 and result["rows_after"] == result["chunks_written"] >= 20
    assert f"chunks: {result['chunks_written']} written" in logs


def test_gpu_work_lands_on_gpu_nodes_of_a_multinode_cluster(milvus_server, wiki_rows, tmp_path):
    """Three nodes (a CPU head, two with a fake GPU each): embedding actors, Train workers and LLM replicas go one
    per GPU node and run on the CPU inside, since the nodes have no CUDA."""
    corpus = write_corpus(tmp_path / "corpus", wiki_rows[:30])
    run = subprocess.run([sys.executable, str(REPO / "tests" / "multinode.py"), str(tmp_path / "work"),
                          milvus_server, str(corpus), str(free_port())], cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    found = [line for line in run.stdout.splitlines() if line.startswith("FINDINGS ")]
    assert run.returncode == 0 and found, run.stdout[-3000:] + run.stderr[-3000:]
    findings = json.loads(found[0].removeprefix("FINDINGS "))
    gpu_nodes = sorted(findings["gpu_nodes"])
    assert sorted(findings["index"]["embedder_nodes"]) == gpu_nodes
    assert findings["index"]["rows"] == findings["index"]["chunks"] >= 30
    assert sorted(findings["train"]["worker_nodes"]) == gpu_nodes and findings["train"]["step"] == 2
    assert sorted(findings["serve"]["llm_nodes"]) == gpu_nodes
    assert findings["serve"]["generated"] == 2
    # two Retriever replicas on two nodes share the Milvus server URI; every concurrent request got its hits
    assert len(set(findings["retrieve"]["retriever_nodes"])) == 2 and findings["retrieve"]["hits"] == [3] * 12
