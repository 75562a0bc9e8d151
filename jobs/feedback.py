"""Served traffic back into training: logged interactions and their feedback become a new dataset version.

    python -m jobs.feedback route=assistant [since=2026-11-01] [name=assistant-feedback]

- An answer rated good (rating 1) becomes a row: the prompt exactly as it was served (for a RAG route: the system
  prompt, the numbered retrieved context and the question) and the answer. Assistant turns in the prompt came from
  the client, not from the app, so they get weight 0: context, never a training target.
- A corrected answer (any rating) becomes a row with the correction in place of the answer, once it is trusted: sent
  without a key (loopback), by a key in feedback.trusted_keys, or accepted with `jobs.review`. Until then it waits,
  counted; a rejected one leaves the request out.
- A trusted correction of an answer rated bad (-1) is also a preference pair: the correction chosen, the answer
  served rejected. The pairs become a version of `<name>-preferences` (`train.objective=dpo` trains on it).
- Answers rated bad without a correction, unrated, failed and shadow answers are left out, and counted; so are log
  lines that are torn or undecodable (a writer killed mid-record), each reported with its file and line.
The rows then go through the same validation and store as any training data (`tandem.data.ingest`): duplicates and
bad rows are rejected with their reason and request id; the version's manifest maps every row to its request id.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tandem.commandline import Job, run
from tandem.config import require
from tandem.data.dataset_store import DatasetStore
from tandem.data.ingest import ingest
from tandem.errors import ConfigError
from tandem.requestlog import Skipped, read_log

JOB = Job("feedback", __doc__, ("feedback", "serve.request_log", "serve.feedback_log", "dataset", "model"),
          shorthands={"route": "feedback.route", "since": "feedback.since", "name": "feedback.name"})


def correction_state(f: dict, trusted_keys: set[str], decisions: dict[str, str]) -> str:
    """`trusted` (keyless, a trusted key, or accepted in review), `rejected`, or `pending` review."""
    decision = decisions.get(f["request_id"])
    if decision is not None:
        return "trusted" if decision == "accept" else "rejected"
    return "trusted" if f.get("key_id") is None or f["key_id"] in trusted_keys else "pending"


def training_rows(requests: list[dict], feedback: list[dict], route: str, trusted_keys: set[str] = frozenset(),
                  decisions: dict[str, str] | None = None) -> tuple[list[dict], list[dict], dict]:
    """(rows with their request id and key id, preference pairs, counts of what was left out and why).

    One row per distinct prompt: a correction beats a good rating, and a later one an earlier one, so the same
    question asked twice does not teach two answers. A correction from a key that is not trusted waits for
    `jobs.review` and a rejected one leaves its request out; both are counted. A trusted correction of an answer
    rated bad is also a preference pair: the correction chosen over the answer served.
    """
    latest = {f["request_id"]: f for f in feedback}  # the last word on a request counts
    decisions = decisions or {}
    rows, pairs = [], []
    skipped = {"unrated": 0, "rated bad, no correction": 0, "neutral": 0, "not ok": 0, "superseded": 0,
               "correction awaiting review": 0, "correction rejected in review": 0}
    for r in requests:
        if r["route"] != route or r["variant"] == "shadow":
            continue
        if r["status"] != "ok":
            skipped["not ok"] += 1
            continue
        f = latest.get(r["request_id"])
        answer = None
        corrected = bool(f and f.get("correction"))
        if corrected and (state := correction_state(f, trusted_keys, decisions)) != "trusted":
            skipped["correction awaiting review" if state == "pending" else "correction rejected in review"] += 1
            continue
        if f is None:
            skipped["unrated"] += 1
        elif corrected:
            answer = f["correction"]
        elif f["rating"] > 0:
            answer = r["response"]
        else:
            skipped["rated bad, no correction" if f["rating"] < 0 else "neutral"] += 1
        if answer is not None:
            # an assistant turn in the logged prompt came from the client, not from this app: context, no loss
            served = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in r["messages"]]
            rows.append({"messages": [*served, {"role": "assistant", "content": answer}],
                         "request_id": r["request_id"], "key_id": r.get("key_id"), "corrected": corrected,
                         "rank": (corrected, f["time"])})
            if corrected and f["rating"] < 0:
                pairs.append({"messages": served, "chosen": answer, "rejected": r["response"],
                              "request_id": r["request_id"], "key_id": r.get("key_id"), "rank": (True, f["time"])})
    rows, superseded = _one_per_prompt(rows, lambda row: row["messages"][:-1])
    pairs, _ = _one_per_prompt(pairs, lambda pair: pair["messages"])
    skipped["superseded"] = superseded
    return rows, pairs, skipped


def _one_per_prompt(rows: list[dict], prompt) -> tuple[list[dict], int]:
    """The best-ranked row for each prompt (a correction, then the latest), and how many were superseded."""
    best: dict[str, dict] = {}
    superseded = 0
    for row in rows:
        key = json.dumps(prompt(row), sort_keys=True)
        if key in best:
            superseded += 1
            if row["rank"] < best[key]["rank"]:
                continue
        best[key] = row
    return [{k: v for k, v in row.items() if k != "rank"} for row in best.values()], superseded


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    f = cfg.feedback
    route = require(f.route, "route")
    name = f.name or f"{route}-feedback"
    torn: list[Skipped] = []
    requests = read_log(cfg.serve.request_log, f.since, torn)
    feedback = read_log(cfg.serve.feedback_log, f.since, torn)
    decisions = {d["request_id"]: d["decision"] for d in read_log(f.review_log, skipped=torn)}
    rows, pairs, skipped = training_rows(requests, feedback, route, set(f.trusted_keys), decisions)
    print(f"{route}: {len(rows)} rows from {len(requests)} logged requests and {len(feedback)} feedback records; "
          f"left out: {skipped}")
    for t in torn:
        print(f"skipped line {t.line} of {t.path}: {t.reason}")
    if not rows:
        raise ConfigError(f"no rated or corrected answers for route {route!r} since {f.since or 'the start'}")
    export = Path(f.exports).expanduser() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    lineage = {"source": "served traffic", "route": route, "since": f.since, "skipped": skipped,
               "unreadable_lines": [f"{t.path}:{t.line}: {t.reason}" for t in torn],
               "corrected": sum(r["corrected"] for r in rows),
               "keys": {str(i): r["key_id"] for i, r in enumerate(rows, start=1)}}  # who stands behind each row
    lines = [json.dumps({"messages": r["messages"]}, ensure_ascii=False) for r in rows]
    manifest = ingest(cfg, name, lines, str(export), lineage, {i: r["request_id"] for i, r in enumerate(rows, 1)})
    # the export is what was stored, after validation: a dropped row is not on disk, a redacted one only redacted
    stored = DatasetStore(cfg.dataset.root).resolve(f"{name}@{manifest['version']}").rows()
    export.parent.mkdir(parents=True, exist_ok=True)
    export.write_text("".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in stored))
    if pairs:  # the same validation and store; `train.objective=dpo` trains on it
        lines = [json.dumps({k: p[k] for k in ("messages", "chosen", "rejected")}, ensure_ascii=False) for p in pairs]
        manifest["preferences"] = ingest(
            cfg, f"{name}-preferences", lines, str(export.with_name(export.stem + "-preferences.jsonl")),
            {**lineage, "corrected": len(pairs), "keys": {str(i): p["key_id"] for i, p in enumerate(pairs, 1)}},
            {i: p["request_id"] for i, p in enumerate(pairs, 1)})
    return manifest


if __name__ == "__main__":
    run(main)
