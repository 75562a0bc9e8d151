"""Retention for the served-traffic logs: delete request and feedback partitions past serve.log_retention_days.

    python -m jobs.logs prune [serve.log_retention_days=90]

Run it daily (a cron job, or a Kubernetes CronJob running this command). Whole UTC days go at once; what the
feedback job has already turned into a dataset version keeps living there, with its lineage.
"""

from __future__ import annotations

import sys

from tandem.commandline import Job, run
from tandem.requestlog import prune

JOB = Job("logs", __doc__, ("serve.request_log", "serve.feedback_log", "serve.log_retention_days"),
          commands=("prune",))


def main(argv: list[str] | None = None) -> dict:
    _, cfg = JOB.command(sys.argv[1:] if argv is None else argv)
    s = cfg.serve
    gone = {root: [p.name for p in prune(root, s.log_retention_days)] for root in (s.request_log, s.feedback_log)}
    for root, parts in gone.items():
        print(f"{root}: {len(parts)} partitions older than {s.log_retention_days} days deleted {parts}")
    return gone


if __name__ == "__main__":
    run(main)
