"""An adapter merged into its base as one safetensors model, for engines that load merged weights as they are.

    python -m jobs.export adapter=NAME@ALIAS|NAME@VERSION [export.dtype=bfloat16|float16|float32] [export.dir=PATH]

The adapter is downloaded from the registry and checked (its sha256, and that it was trained on `model.path`'s
weights); the merged model is written with the tokenizer and a manifest, and registered as a version of
`<adapter>-merged` with its checksum and lineage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tandem.adapters import verify_adapter
from tandem.commandline import Job, run
from tandem.config import require
from tandem.export import merge_adapter
from tandem.models import prepare_base
from tandem.registry import Registry

JOB = Job("export", __doc__, ("export", "model", "mlflow"), shorthands={"adapter": "export.adapter"})


def main(argv: list[str] | None = None) -> dict:
    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    e = cfg.export
    registry = Registry.from_config(cfg)
    version = registry.resolve(require(e.adapter, "export.adapter"))
    ref = f"{version.name}@{version.version}"
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    local = registry.download(ref)
    adapter = verify_adapter(local, base.sha256)
    out = Path(e.dir or Path(cfg.workdir) / "merged" / f"{version.name}-v{version.version}-{e.dtype}").expanduser()
    manifest = merge_adapter(base, local, out, e.dtype, {"adapter": ref, "adapter_sha256": adapter["sha256"],
                                                         "dataset": adapter.get("dataset")})
    name = e.name or f"{version.name}-merged"
    manifest["registry"] = {"name": name, "version": registry.register_merged(name, manifest)}
    print(json.dumps({k: manifest[k] for k in ("adapter", "path", "dtype", "sha256", "registry")}, indent=2))
    return manifest


if __name__ == "__main__":
    run(main)
