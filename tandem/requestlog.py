"""Served interactions and feedback as append-only JSONL partitions: `<root>/date=YYYY-MM-DD/<writer>.jsonl`.

Each writer (a router replica) owns its files, so replicas never interleave lines; every record is flushed when
written, so a stopped replica loses nothing it acknowledged. Readers (the feedback job, reports) read every
partition since a date; feedback joins requests by `request_id`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path


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
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return path


def read_log(root: str | Path, since: str | None = None) -> list[dict]:
    """Every record in partitions dated `since` (YYYY-MM-DD) or later, oldest first."""
    root = Path(root).expanduser()
    records = []
    for part in sorted(root.glob("date=*")):
        if since and part.name.removeprefix("date=") < since:
            continue
        for file in sorted(part.glob("*.jsonl")):
            with file.open(encoding="utf-8") as f:
                records += [json.loads(line) for line in f if line.strip()]
    return sorted(records, key=lambda r: r["time"])
