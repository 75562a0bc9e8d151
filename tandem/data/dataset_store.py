"""A versioned dataset store: immutable, content-addressed versions of validated training data.

    <root>/<name>/<version>/data.parquet     messages, split, line, flags
    <root>/<name>/<version>/manifest.json    schema, row counts, token stats, source, parent, rejects summary
    <root>/<name>/<version>/rejected.jsonl   every rejected input line with its reason
    <root>/<name>/versions.json              versions in the order they were added (the last is `latest`)

A version id is the hash of the rows it holds, so adding the same data twice gives the same version and writes
nothing. Jobs refer to data as `NAME@VERSION` or `NAME@latest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tandem.stats import percentile

SCHEMA = pa.schema([
    # weight 0: a turn kept as context with no loss (tandem/data/features.py); absent means 1
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.int8())]))),
    ("split", pa.string()),
    ("line", pa.int64()),
    ("flags", pa.list_(pa.string())),
    ("tokens", pa.int64()),
    ("rejected", pa.string()),  # a preference pair's rejected answer (the chosen one ends `messages`); else null
])


@dataclass
class DatasetVersion:
    name: str
    version: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    def rows(self, split: str | None = None) -> list[dict]:
        table = pq.read_table(self.path / "data.parquet")
        rows = [r for r in table.to_pylist() if split is None or r["split"] == split]
        for r in rows:  # an absent weight or rejected answer reads back as None: drop it, as the row was written
            r["messages"] = [{k: v for k, v in m.items() if v is not None} for m in r["messages"]]
            if r.get("rejected") is None:
                r.pop("rejected", None)
        return rows


class DatasetStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def _versions(self, name: str) -> list[str]:
        index = self.root / name / "versions.json"
        return json.loads(index.read_text()) if index.is_file() else []

    def add(self, name: str, rows: list[dict], *, source: str, rejected: list[dict], tokenizer: str,
            parent: str | None = None, extra: dict | None = None) -> tuple[DatasetVersion, bool]:
        """Write a version unless the same rows are already stored; return it and whether it is new. Either way it
        becomes `latest`: `make demo` after `make train` adds rows stored before and must train on them."""
        if not name or "@" in name or "/" in name:
            raise ValueError(f"dataset name {name!r} must be non-empty, without '@' or '/'")
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        # a pair's rejected answer is part of its identity; other rows hash as they did before pairs existed
        canonical = json.dumps([[r["messages"], r["split"], *([r["rejected"]] if r.get("rejected") else [])]
                                for r in rows], sort_keys=True, ensure_ascii=False)
        version = hashlib.sha256(canonical.encode()).hexdigest()[:12]
        target = self.root / name / version
        if (target / "manifest.json").is_file():
            self._mark_latest(name, version)
            return DatasetVersion(name, version, target), False
        tmp = target.with_name(f".{version}.partial-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp / "data.parquet")
        with (tmp / "rejected.jsonl").open("w") as f:
            for r in rejected:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tokens = [r["tokens"] for r in rows] or [0]
        manifest = {
            "name": name, "version": version, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source, "parent": parent, "schema": SCHEMA.to_string(show_schema_metadata=False),
            "rows": {"total": len(rows), "train": sum(r["split"] == "train" for r in rows),
                     "eval": sum(r["split"] == "eval" for r in rows),
                     "flagged": sum(bool(r["flags"]) for r in rows), "rejected": len(rejected),
                     "preference_pairs": sum(r.get("rejected") is not None for r in rows)},
            "tokens": {"tokenizer": tokenizer, "min": min(tokens), "max": max(tokens),
                       "mean": round(statistics.fmean(tokens), 1),
                       "p95": percentile(tokens, 0.95), "total": sum(tokens)},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        tmp.rename(target)  # a version appears whole or not at all
        self._mark_latest(name, version)
        return DatasetVersion(name, version, target), True

    def _mark_latest(self, name: str, version: str) -> None:
        """versions.json lists the versions in the order they were last added."""
        index = self.root / name / "versions.json"
        index.write_text(json.dumps([v for v in self._versions(name) if v != version] + [version], indent=2) + "\n")

    def resolve(self, ref: str) -> DatasetVersion:
        """`NAME@VERSION`, `NAME@latest` or `NAME` (latest)."""
        name, _, version = ref.partition("@")
        versions = self._versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise LookupError(f"no dataset named {name!r} in {self.root} (known: {known})")
        if version in ("", "latest"):
            version = versions[-1]
        matches = [v for v in versions if v.startswith(version)]
        if len(matches) != 1:
            raise LookupError(f"dataset {name!r} has no single version {version!r} (versions: {', '.join(versions)})")
        return DatasetVersion(name, matches[0], self.root / name / matches[0])

    def names(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/versions.json")) if self.root.is_dir() else []

    def list(self) -> list[dict]:
        out = []
        for name in self.names():
            for v in self._versions(name):
                m = DatasetVersion(name, v, self.root / name / v).manifest()
                out.append({"ref": f"{name}@{v}", "created": m["created"], "rows": m["rows"], "parent": m["parent"]})
        return out
