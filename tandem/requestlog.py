"""Served interactions and feedback as append-only JSONL partitions: `<root>/date=YYYY-MM-DD/<writer>.jsonl`.

Each writer (a router replica) owns its files, so replicas never interleave lines; every record is flushed when
written, so a stopped replica loses nothing it acknowledged, and a write that fails (a full disk) is cut back off, so
it leaves no partial record. Readers (the feedback job, the rollout controller, reports) read every partition since
a date; a torn or undecodable line, as a writer killed mid-record leaves, is skipped and reported, never fatal: the
rollout controller's safety net must not stop on one bad line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tandem.errors import TandemError

logger = logging.getLogger(__name__)


class LogWriteError(TandemError):
    """A record that could not be written (a full or failing disk); nothing of it stays in the file. `reason` is
    the OS's words alone, fit for a client (no path, host or pid)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Skipped:
    """A line a reader left out, and why."""
    path: str
    line: int
    reason: str


class JsonlLog:
    def __init__(self, root: str | Path, writer: str | None = None):
        self.root = Path(root).expanduser()
        self.writer = writer or f"{socket.gethostname()}-{os.getpid()}"
        self._lock = threading.Lock()

    def append(self, record: dict) -> Path:
        record = {"time": time.time(), **record}
        day = datetime.fromtimestamp(record["time"], timezone.utc).strftime("%Y-%m-%d")
        path = self.root / f"date={day}" / f"{self.writer}.jsonl"
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("ab") as f:
                    end = f.tell()
                    try:
                        f.write(line.encode("utf-8"))
                        f.flush()
                        os.fsync(f.fileno())
                    except OSError:
                        _cut(f, end)
                        raise
            except OSError as e:
                reason = e.strerror or type(e).__name__
                raise LogWriteError(f"could not write to {path}: {reason}", reason) from e
        return path


def _cut(f, end: int) -> None:
    """Drop what a failed write left past `end`; on a device that cannot even do that, nothing more can be done."""
    try:
        f.truncate(end)
    except OSError:
        pass


def read_log(root: str | Path, since: str | None = None, skipped: list[Skipped] | None = None) -> list[dict]:
    """Every record in partitions dated `since` (YYYY-MM-DD) or later, oldest first. Lines that are not a whole
    JSON record (torn, undecodable) are left out, logged as a warning and appended to `skipped` when given."""
    root = Path(root).expanduser()
    records, bad = [], []
    for part in sorted(root.glob("date=*")):
        if since and part.name.removeprefix("date=") < since:
            continue
        for file in sorted(part.glob("*.jsonl")):
            with file.open("rb") as f:
                for number, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw.decode("utf-8"))
                        if not isinstance(record, dict) or "time" not in record:
                            raise ValueError("not a log record")
                    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                        bad.append(Skipped(str(file), number, f"{type(e).__name__}: {str(e)[:120]}"))
                        continue
                    records.append(record)
    for s in bad:
        logger.warning("skipped line %d of %s: %s", s.line, s.path, s.reason)
    if skipped is not None:
        skipped.extend(bad)
    return sorted(records, key=lambda r: r["time"])


def prune(root: str | Path, keep_days: int, now: float | None = None) -> list[Path]:
    """Delete the partitions older than `keep_days` days (UTC dates); returns what went."""
    import shutil

    cutoff = datetime.fromtimestamp((now or time.time()) - keep_days * 86400, timezone.utc).strftime("%Y-%m-%d")
    gone = [p for p in sorted(Path(root).expanduser().glob("date=*")) if p.name.removeprefix("date=") < cutoff]
    for part in gone:
        shutil.rmtree(part)
    return gone
