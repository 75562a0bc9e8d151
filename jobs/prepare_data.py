"""Build a corpus, an evaluation set or a training task from data shipped in packages.

    python -m jobs.prepare_data data.dataset=wiki|wiki_beir|wiki_qa|python_faq|faq_qa|grounded_qa [data.out=DIR]
    python -m jobs.prepare_data data.dataset=grounded_qa [data.rows=1200] [evaluate.qa=DIR]

`grounded_qa` is the behaviour task that teaches grounded answering: the train split of the QA set in evaluate.qa
(built by `data.dataset=wiki_qa`), each question with the passages the app's retriever returns for it, answered as
a short span citing the passage that states it, or an abstention when none does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tandem.commandline import Job, run
from tandem.datasets import BUILDERS
from tandem.errors import ConfigError
from tandem.qa import build_grounded

JOB = Job("prepare_data", __doc__, ("data", "evaluate.qa", "evaluate.collection", "evaluate.k", "evaluate.mode"))


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    out = Path(cfg.data.out)
    if cfg.data.dataset == "grounded_qa":  # needs the retriever, so the config, not only files
        stats = build_grounded(cfg, out / "grounded_qa.jsonl")
    elif cfg.data.dataset in BUILDERS:
        stats = BUILDERS[cfg.data.dataset](out, cfg.data.source)
    else:
        raise ConfigError(f"data.dataset={cfg.data.dataset}; expected one of {', '.join(BUILDERS)}, grounded_qa")
    print(f"{cfg.data.dataset} -> {out}: {stats}")
    return stats


if __name__ == "__main__":
    run(main)
