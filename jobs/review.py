"""The review queue for corrections: nobody's correction is trained on until a person (or a trusted key) says so.

    python -m jobs.review list [route=assistant]
    python -m jobs.review accept id=chatcmpl-... [reason="..."]
    python -m jobs.review reject id=chatcmpl-... [reason="..."]

`list` shows each correction from a key not in feedback.trusted_keys that has no decision yet: the question, the
answer served, the correction and the key that sent it. Decisions are appended to feedback.review_log with who made
them and why; `jobs.feedback` trains on accepted corrections and leaves rejected ones out.
"""

from __future__ import annotations

import getpass
import sys

from jobs.feedback import correction_state
from tandem.commandline import Job, run
from tandem.config import require
from tandem.errors import ConfigError
from tandem.requestlog import JsonlLog, read_log

JOB = Job("review", __doc__, ("feedback", "serve.request_log", "serve.feedback_log"),
          shorthands={"route": "feedback.route", "id": "feedback.id", "reason": "feedback.reason"},
          commands=("list", "accept", "reject"))


def pending(cfg) -> list[dict]:
    """Corrections from untrusted keys without a decision, newest last, each with what was asked and served."""
    f = cfg.feedback
    decisions = {d["request_id"]: d["decision"] for d in read_log(f.review_log)}
    served = {r["request_id"]: r for r in read_log(cfg.serve.request_log)}
    latest = {x["request_id"]: x for x in read_log(cfg.serve.feedback_log)}
    out = []
    for request_id, x in latest.items():
        r = served.get(request_id)
        if not x.get("correction") or correction_state(x, set(f.trusted_keys), decisions) != "pending" or \
                r is None or (f.route and r["route"] != f.route):
            continue
        out.append({"request_id": request_id, "route": r["route"], "key_id": x["key_id"],
                    "question": r["messages"][-1]["content"], "served": r["response"], "correction": x["correction"]})
    return out


def main(argv: list[str] | None = None):
    command, cfg = JOB.command(sys.argv[1:] if argv is None else argv)
    if command == "list":
        queue = pending(cfg)
        for c in queue:
            print(f"{c['request_id']}  route={c['route']}  key={c['key_id']}\n  asked:     {c['question'][-300:]}\n"
                  f"  served:    {c['served'][:300]}\n  corrected: {c['correction'][:300]}")
        print(f"{len(queue)} corrections awaiting review")
        return queue
    request_id = require(cfg.feedback.id, "feedback.id")
    if request_id not in {c["request_id"] for c in pending(cfg)}:
        raise ConfigError(f"{request_id} has no correction awaiting review (`python -m jobs.review list`)")
    record = {"request_id": request_id, "decision": command, "who": getpass.getuser(), "why": cfg.feedback.reason}
    JsonlLog(cfg.feedback.review_log, writer="review").append(record)
    print(f"{command}ed the correction to {request_id}")
    return record


if __name__ == "__main__":
    run(main)
