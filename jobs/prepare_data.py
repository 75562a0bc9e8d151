"""Build a corpus or a BEIR evaluation set from data shipped in packages.

    python -m jobs.prepare_data data.dataset=wiki|wiki_beir|python_faq [data.out=DIR] [data.source=PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

from tandem.commandline import Job, run
from tandem.datasets import BUILDERS
from tandem.errors import ConfigError

JOB = Job("prepare_data", __doc__, ("data",))


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    if cfg.data.dataset not in BUILDERS:
        raise ConfigError(f"data.dataset={cfg.data.dataset}; expected one of {', '.join(BUILDERS)}")
    out = Path(cfg.data.out)
    stats = BUILDERS[cfg.data.dataset](out, cfg.data.source)
    print(f"{cfg.data.dataset} -> {out}: {stats}")
    return stats


if __name__ == "__main__":
    run(main)
