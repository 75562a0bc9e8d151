"""The command lines a newcomer types first: --help, --cfg job, mistakes, sweeps, and the installed `tandem` command."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from conftest import DATA
from jobs.cli import JOBS
from tandem.commandline import Shown

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = [f"jobs.{name}" for name in JOBS] + ["serving.__main__"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_explains_itself(module):
    """--help: what it does, its command line, and each key it reads with its default and the schema's doc."""
    with pytest.raises(Shown) as shown:
        importlib.import_module(module).main(["--help"])
    text = shown.value.text
    assert f"python -m {module.removesuffix('.__main__')} " in text
    keys = [line for line in text.splitlines() if line.startswith("  ") and "=" in line.split()[0]]
    assert len(keys) >= 3 and any(line.split("=")[0].strip() == "workdir" for line in keys)
    assert sum(len(line.split(None, 1)) == 2 for line in keys) >= len(keys) // 2  # most keys carry a doc
    assert "--cfg job" in text


def test_help_and_mistakes_from_the_shell(tmp_path):
    """As typed: exit 0 with the help; a wrong key or flag is one line naming it, exit 2, no traceback."""
    env = {**os.environ, "TANDEM_HOME": str(tmp_path)}
    ok = subprocess.run([sys.executable, "-m", "jobs.promote", "--help"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "rollout.stage=null" in ok.stdout and "canary | production" in ok.stdout
    for argv, named in ((["route=assistant", "rollout.stagee=canary"], "rollout.stagee"),
                        (["--stage", "canary"], "--stage"), (["route"], "'route'")):
        bad = subprocess.run([sys.executable, "-m", "jobs.promote", *argv], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1 and named in bad.stderr and bad.stderr.startswith("error: ")


def test_cfg_job_prints_the_resolved_config():
    from jobs.search import main

    with pytest.raises(Shown) as shown:
        main(["search.k=7", "--cfg", "job", "store.collection=faq"])
    cfg = yaml.safe_load(shown.value.text)
    assert cfg["search"]["k"] == 7 and cfg["store"]["collection"] == "faq"
    assert cfg["search"]["fusion"]["method"] == "rrf"


def test_sweep_over_search_time_keys(ray_cluster, milvus_server, tmp_path):
    """-m: one index, one report per combination of k and RRF's k, and a summary table of them all; keys set without
    a sweep (the fusion method) apply to every run and are not listed as swept."""
    from jobs.eval_retrieval import main as eval_main
    from tandem.errors import ConfigError

    out = tmp_path / "eval.json"
    sweep = eval_main(["-m", f"eval.dataset={DATA / 'python_faq'}", f"store.uri={milvus_server}",
                       "store.collection=faq", f"eval.output={out}", "eval.max_queries=40", "eval.modes=[hybrid]",
                       "eval.k=5,10", "search.fusion.method=rrf", "search.fusion.rrf_k=1,60"])
    assert [r["overrides"] for r in sweep["runs"]] == [["eval.k=5", "search.fusion.rrf_k=1"],
                                                       ["eval.k=5", "search.fusion.rrf_k=60"],
                                                       ["eval.k=10", "search.fusion.rrf_k=1"],
                                                       ["eval.k=10", "search.fusion.rrf_k=60"]]
    files = sorted((tmp_path / "eval-sweep").glob("0*.json"))
    assert len(files) == 4 and json.loads(files[3].read_text())["overrides"] == ["eval.k=10", "search.fusion.rrf_k=60"]
    hybrid = [r["metrics"]["hybrid"] for r in sweep["runs"]]
    assert hybrid[0]["recall@5"] == hybrid[2]["recall@5"]  # k=10 keeps the top 5 of the same ranking
    assert hybrid[0] != hybrid[1]  # RRF's k changes the fused ranking
    summary = json.loads((tmp_path / "eval-sweep" / "summary.json").read_text())
    assert len(summary["table"].splitlines()) == 5 and "search.fusion.rrf_k=60" in summary["table"]
    with pytest.raises(ConfigError, match="cannot sweep chunking.max_tokens"):
        eval_main(["-m", f"eval.dataset={DATA / 'python_faq'}", "chunking.max_tokens=100,200"])


def test_the_wheel_installs_and_runs(workdir, tmp_path):
    """`pip install .` as a plain wheel into a new venv (dependencies reused from this one): the `tandem` command
    finds conf/ inside the package and runs a job."""
    # from a clean copy of what git would commit: setuptools' in-tree build/ would keep files the checkout has since
    # deleted, and what git ignores (the venvs: gigabytes) is no part of the package
    source = tmp_path / "source"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():  # not a file deleted since the last commit
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this venv's packages, after the new venv's own: the wheel, not the checkout, provides tandem
    Path(purelib, "reuse-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    *map(str, wheels.glob("tandem-*.whl"))], check=True, capture_output=True, timeout=300)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TANDEM_HOME")} | {"TANDEM_HOME": str(home)}
    tandem = str(venv / "bin" / "tandem")

    def sh(*argv):
        done = subprocess.run([tandem, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    assert "finetune" in sh("--help") and "serve" in sh("--help")
    where = subprocess.run([python, "-c", "import tandem.config as c; print(c.CONF_DIR)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(Path(purelib) / "tandem" / "conf")
    assert "dataset.max_tokens=1024" in sh("dataset", "--help")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Spell {n}.", "response": f"{n} is spelt {n}."}) + "\n"
                            for n in ("one", "two", "three", "four", "five")))
    added = sh("dataset", "add", "name=tiny", f"path={rows}", f"model.cache_dir={workdir / 'models'}")
    version = added.split("stored tiny@")[1].split()[0]
    assert f"tiny@{version}" in sh("dataset", "list") and (home / "datasets" / "tiny").is_dir()
