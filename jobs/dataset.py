"""The versioned training-data store.

    python -m jobs.dataset add name=NAME path=FILE.jsonl [dataset.max_tokens=1024] [dataset.pii=drop]
    python -m jobs.dataset add name=NAME path=FILE.json|FILE.parquet|DIR   # a JSON array, Parquet, or save_to_disk
    python -m jobs.dataset add name=NAME path=FILE "dataset.paths=[FILE2,...]"   # several files' rows, in order

Rows: chat messages, ShareGPT conversations, prompt/response or Alpaca instruction/input/output.
    python -m jobs.dataset list
    python -m jobs.dataset show dataset=NAME@VERSION|NAME@latest
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tandem.commandline import Job, run
from tandem.config import require
from tandem.data.dataset_store import DatasetStore
from tandem.data.ingest import ingest
from tandem.data.sources import read_rows

JOB = Job("dataset", __doc__, ("dataset", "model"),
          shorthands={"name": "dataset.name", "path": "dataset.path", "dataset": "dataset.ref"},
          commands=("add", "list", "show"))


def add(cfg) -> dict:
    name = require(cfg.dataset.name, "dataset.name")
    paths = [Path(require(cfg.dataset.path, "dataset.path")), *map(Path, cfg.dataset.paths)]
    return ingest(cfg, name, [row for path in paths for row in read_rows(path)],
                  ", ".join(str(path.resolve()) for path in paths))


def main(argv: list[str] | None = None):
    command, cfg = JOB.command(sys.argv[1:] if argv is None else argv)
    if command == "add":
        return add(cfg)
    store = DatasetStore(cfg.dataset.root)
    if command == "list":
        listing = store.list()
        for item in listing:
            print(f"{item['ref']}  {item['created']}  rows={item['rows']}  parent={item['parent']}")
        return listing
    manifest = store.resolve(require(cfg.dataset.ref, "dataset.ref")).manifest()
    print(json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest


if __name__ == "__main__":
    run(main)
