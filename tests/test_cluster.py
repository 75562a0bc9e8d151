"""Tandem on a Ray cluster it did not start: a `ray start --head` on 127.0.0.1 and the real job server.

The head runs with token authentication (RAY_AUTH_MODE=token) and its own token, written to a temp file named by
RAY_AUTH_TOKEN_PATH, as a user does with `ray get-auth-token --generate`: nothing in ~/.ray is read, so a fresh
machine behaves like this one.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_corpus
from tandem.milvus import free_port

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


# The shape of cluster/kuberay/raycluster.yaml's `gpu` group (and cluster/aws.yaml's GPU types), scaled to this box.
GPU_WORKER = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}


@pytest.fixture
def head(tmp_path_factory):
    """A separate autoscaling Ray head (its own ports and temp dir) run with --block, so stopping it stops only it;
    gone before the multinode test, whose three nodes its autoscaler (polling every second) and GPU node slowed.

    It starts with no GPU; Ray's autoscaler, on its fake multi-node provider, adds GPU workers when tasks ask for
    GPUs and removes them when idle, as KubeRay's does with pods.
    """
    import ray
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    port, dashboard = free_port(), free_port()
    temp = tmp_path_factory.mktemp("rayhead")
    autoscaling = temp / "autoscaling.json"
    autoscaling.write_text(json.dumps({
        "cluster_name": "tandem-test", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "provider": {"type": "fake_multinode", "gcs_address": f"{ray.util.get_node_ip_address()}:{port}",
                     # its nodes are processes here: nothing to set up over ssh, addressed by node id
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"}, "head_node_type": FAKE_HEAD_NODE_TYPE,  # the provider's name for the head
        "available_node_types": {FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
                                 "gpu": GPU_WORKER},
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False}))
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # as from an activated venv: the job's `python` is this one
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                             f"--autoscaling-config={autoscaling}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                             # ports of its own: the session's cluster, when it started first, holds the defaults
                             # (52365 for the dashboard agent)
                             f"--dashboard-agent-listen-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                             f"--metrics-export-port={free_port()}",
                             f"--temp-dir={temp}", "--include-dashboard=true"],
                            # RAY_TMPDIR: its address file stays in its temp dir, where no later `ray.init()` on
                            # this machine finds it once the head is gone
                            env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                                 "RAY_TMPDIR": str(temp)},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the job server did not come up"
        time.sleep(2)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # the autoscaler's monitor spends ~30 s on a graceful exit: nothing here is kept
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def gpu_nodes(address: str, env: dict) -> int:
    nodes = subprocess.run([RAY, "list", "nodes", "--address", address, "--format", "json", "--detail"],
                           env=env, capture_output=True, text=True)
    assert nodes.returncode == 0, nodes.stderr[-2000:]
    return sum(1 for n in json.loads(nodes.stdout) if n["state"] == "ALIVE" and n["resources_total"].get("GPU"))


def submit(address: str, env: dict, runtime_env: dict, *entrypoint: str) -> str:
    """`ray job submit` of this checkout; once the job has succeeded (`ray job status`), its `ray job logs`."""
    run = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(REPO),
                          "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = next(line.split("'")[1] for line in run.stdout.splitlines() if "submitted successfully" in line)
    status = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env, capture_output=True,
                            text=True)
    assert "succeeded" in status.stdout.lower(), status.stdout
    return subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True).stdout


def test_index_job_on_the_cluster_site_through_ray_job_submit(head, milvus_server, wiki_rows, tmp_path):
    """`site=cluster` as a RayJob uses it: the store's address from the job's environment, one GPU per embedding
    actor (a GPU node the autoscaler adds for it; the actor finds no CUDA and embeds on the CPU)."""
    address, env = head
    corpus = write_corpus(tmp_path / "corpus", wiki_rows[:20])
    summary = tmp_path / "summary.json"
    site = {"TANDEM_HOME": str(tmp_path / "home"), "TANDEM_MILVUS_URI": milvus_server}
    logs = submit(address, env, {"env_vars": site}, "python", "-m", "jobs.index", "site=cluster",
                  f"corpus.path={corpus}", "store.collection=submitted", f"index.summary_path={summary}",
                  # what the autoscaler's 1-CPU GPU nodes and the 2-CPU head fit
                  "embedder.num_actors=1", "embedder.num_cpus=0.5", "index.prepare_actors=1",
                  "index.prepare_num_cpus=0.5")
    result = json.loads(summary.read_text())
    assert result["documents_indexed"] == 20 and result["rows_after"] == result["chunks_written"] >= 20
    assert f"chunks: {result['chunks_written']} written" in logs
    assert gpu_nodes(address, env) >= 1  # the head has none: the autoscaler added a node for the embedding actor


def test_gpu_work_lands_on_gpu_nodes_of_a_multinode_cluster(workdir, milvus_server, wiki_rows, tmp_path):
    """Three nodes (a CPU head, two with a fake GPU each): embedding actors, Train workers and LLM replicas go one
    per GPU node and run on the CPU inside, since the nodes have no CUDA."""
    corpus = write_corpus(tmp_path / "corpus", wiki_rows[:30])
    run = subprocess.run([sys.executable, str(REPO / "tests" / "multinode.py"), str(tmp_path / "work"),
                          milvus_server, str(corpus), str(free_port()), str(workdir / "models")], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    found = [line for line in run.stdout.splitlines() if line.startswith("FINDINGS ")]
    assert run.returncode == 0 and found, run.stdout[-3000:] + run.stderr[-3000:]
    findings = json.loads(found[0].removeprefix("FINDINGS "))
    gpu_nodes = sorted(findings["gpu_nodes"])
    assert sorted(findings["index"]["embedder_nodes"]) == gpu_nodes
    assert findings["index"]["rows"] == findings["index"]["chunks"] >= 30
    assert sorted(findings["train"]["worker_nodes"]) == gpu_nodes and findings["train"]["step"] == 2
    assert findings["train"]["registered_dataset"] == findings["train"]["dataset"]
    assert sorted(findings["serve"]["llm_nodes"]) == gpu_nodes
    assert findings["serve"]["generated"] == 2
    # two Retriever replicas on two nodes share the Milvus server URI; every concurrent request got its hits
    assert len(set(findings["retrieve"]["retriever_nodes"])) == 2 and findings["retrieve"]["hits"] == [3] * 12
