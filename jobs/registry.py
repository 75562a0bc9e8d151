"""Base models and adapters in the registry, for people.

    python -m jobs.registry list
    python -m jobs.registry show registry.name=NAME
    python -m jobs.registry alias registry.name=NAME registry.alias=production registry.version=3|validated \
        registry.reason="..."
"""

from __future__ import annotations

import json
import sys

from tandem.commandline import Job, run
from tandem.config import require
from tandem.registry import Registry

JOB = Job("registry", __doc__, ("registry", "mlflow"), commands=("list", "show", "alias"))


def main(argv: list[str] | None = None):
    command, cfg = JOB.command(sys.argv[1:] if argv is None else argv)
    registry = Registry.from_config(cfg)
    r = cfg.registry
    if command == "alias":
        name, alias, version = require(r.name, "registry.name"), require(r.alias, "registry.alias"), \
            require(r.version, "registry.version")
        version = registry.resolve(f"{name}@{version}").version  # a number, or another alias: validated
        registry.set_alias(name, alias, version, reason=r.reason)
        print(f"{name}@{alias} -> version {version}")
        return registry.describe(name)[0]
    models = registry.describe(require(r.name, "registry.name") if command == "show" else None)
    if command == "show":
        print(json.dumps(models[0], indent=2))
        return models[0]
    for m in models:
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(m["aliases"].items())) or "-"
        print(f"{m['name']} ({m['kind']}): {len(m['versions'])} versions; aliases {aliases}")
    return models


if __name__ == "__main__":
    run(main)
