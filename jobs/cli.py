"""The `tandem` command: `tandem <job> key=value ...` runs `python -m jobs.<job> key=value ...`.

    tandem --help                     the jobs, one line each
    tandem index corpus.path=DIR      the same as `python -m jobs.index corpus.path=DIR`
    tandem serve [serve.port=8000]    the same as `python -m serving`
    tandem <job> --help               that job's help: what it does, its command line, its keys and defaults

Each job's `main(argv)` returns its result and raises; `tandem.commandline.run`, called only by entry points, prints
a `TandemError` as one line and exits with its code, so tests and `jobs.pipeline` call the same mains.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

from tandem.commandline import run

JOBS = ("index", "search", "eval_retrieval", "prepare_data", "prepare_base", "dataset", "finetune", "validate",
        "evaluate", "registry", "promote", "export", "feedback", "review", "pipeline", "report", "keys", "logs")


def _summary(module: str) -> str:
    """A module's first docstring line, read without importing it (importing a job imports Ray and torch)."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    return (ast.get_docstring(ast.parse(source)) or "").strip().splitlines()[0]


def usage() -> str:
    lines = ["usage: tandem <job> [key=value ...] [--help] [--cfg job]", "", "jobs:"]
    for name in JOBS:
        lines.append(f"  {name:<16}{_summary(f'jobs.{name}')}")
    lines.append(f"  {'serve':<16}{_summary('serving.__main__')}")
    lines += ["", "`tandem <job> --help` shows what a job reads, with defaults; `python -m jobs.<job>` is the same."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0)
    name, rest = argv[0].replace("-", "_"), argv[1:]
    if name == "serve":
        module = importlib.import_module("serving.__main__")
    elif name in JOBS:
        module = importlib.import_module(f"jobs.{name}")
    else:
        print(f"error: unknown job {argv[0]!r}; one of {', '.join(JOBS)}, serve (tandem --help)", file=sys.stderr)
        sys.exit(2)
    run(module.main, rest)


if __name__ == "__main__":
    main()
