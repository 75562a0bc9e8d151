"""Validate JSONL training rows and store the accepted ones as a dataset version: the one way data gets in.

Used by `jobs.dataset add` (a file) and `jobs.feedback` (served traffic), so every source passes the same checks.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tandem.data.chat import ChatTokens
from tandem.data.dataset_store import DatasetStore
from tandem.data.validation import validate_rows
from tandem.errors import RejectedDataError
from tandem.models import load_tokenizer, prepare_base


def ingest(cfg, name: str, lines: list[str], source: str, lineage: dict | None = None,
           line_ids: dict[int, str] | None = None) -> dict:
    """Validate `lines` with the `dataset.*` settings and store a version; returns its manifest.

    `line_ids` (line number -> an id such as a request id) is written beside each rejected line and into the
    manifest, so every stored or rejected row can be traced to where it came from. Above
    dataset.max_reject_fraction nothing is stored and the job fails with the report.
    """
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    chat = ChatTokens(load_tokenizer(base))
    d = cfg.dataset
    result = validate_rows(lines, chat.count, max_tokens=d.max_tokens, on_too_long=d.on_too_long, pii=d.pii,
                           near_duplicate_threshold=d.near_duplicate_threshold, eval_fraction=d.eval_fraction,
                           truncate=chat.truncate)
    print(result.report())
    ids = line_ids or {}
    rejected = [{**asdict(r), **({"id": ids[r.line]} if r.line in ids else {})} for r in result.rejected]
    if result.reject_fraction > d.max_reject_fraction:
        report = Path(d.root).expanduser() / name / f"rejected-{Path(source).stem}.jsonl"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(json.dumps(r) + "\n" for r in rejected))
        raise RejectedDataError(f"{result.reject_fraction:.1%} of rows rejected, over "
                         f"dataset.max_reject_fraction={d.max_reject_fraction}; nothing stored, reasons in {report}")
    rows = [{**r, "tokens": chat.count(r["messages"])} for r in result.rows]
    store = DatasetStore(d.root)
    parent = store.resolve(name).ref if name in store.names() else None
    extra = {"lineage": {**lineage, "rows": {str(r["line"]): ids[r["line"]] for r in rows if r["line"] in ids}}} \
        if lineage is not None else None
    version, new = store.add(name, rows, source=source, rejected=rejected,
                             tokenizer=f"{cfg.model.path}#{base.sha256[:12]}", parent=parent, extra=extra)
    print(f"{'stored' if new else 'unchanged, already stored as'} {version.ref} ({len(rows)} rows)")
    return version.manifest()
