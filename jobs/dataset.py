"""The versioned training-data store.

    python -m jobs.dataset add name=NAME path=FILE.jsonl [dataset.max_tokens=1024] [dataset.pii=drop]
    python -m jobs.dataset list
    python -m jobs.dataset show dataset=NAME@VERSION|NAME@latest
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from tandem.config import command_from_argv, require
from tandem.data.chat import ChatTokens
from tandem.data.store import DatasetStore
from tandem.data.validation import validate_rows
from tandem.models import load_tokenizer, prepare_base

COMMANDS = ("add", "list", "show")
SHORTHANDS = {"name": "dataset.name", "path": "dataset.path", "dataset": "dataset.ref"}


def add(cfg) -> dict:
    name, path = require(cfg.dataset.name, "dataset.name"), Path(require(cfg.dataset.path, "dataset.path"))
    if not path.is_file():
        raise SystemExit(f"error: dataset.path={path} is not a file")
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    chat = ChatTokens(load_tokenizer(base))
    d = cfg.dataset
    result = validate_rows(path.read_text(encoding="utf-8", errors="replace").splitlines(), chat.count,
                           max_tokens=d.max_tokens, on_too_long=d.on_too_long, pii=d.pii,
                           near_duplicate_threshold=d.near_duplicate_threshold, eval_fraction=d.eval_fraction,
                           truncate=chat.truncate)
    print(result.report())
    rejected = [asdict(r) for r in result.rejected]
    if result.reject_fraction > d.max_reject_fraction:
        report = Path(d.root).expanduser() / name / f"rejected-{path.stem}.jsonl"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(json.dumps(r) + "\n" for r in rejected))
        raise SystemExit(f"error: {result.reject_fraction:.1%} of rows rejected, over "
                         f"dataset.max_reject_fraction={d.max_reject_fraction}; nothing stored, reasons in {report}")
    rows = [{**r, "tokens": chat.count(r["messages"])} for r in result.rows]
    store = DatasetStore(d.root)
    parent = store.resolve(name).ref if name in store.names() else None
    version, new = store.add(name, rows, source=str(path.resolve()), rejected=rejected,
                             tokenizer=f"{cfg.model.path}#{base.sha256[:12]}", parent=parent)
    print(f"{'stored' if new else 'unchanged, already stored as'} {version.ref} ({len(rows)} rows)")
    return version.manifest()


def main(argv: list[str] | None = None):
    command, cfg = command_from_argv("dataset", COMMANDS, sys.argv[1:] if argv is None else argv, SHORTHANDS)
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
    main()
