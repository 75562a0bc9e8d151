"""LoRA adapters as artifacts: the PEFT directory plus a manifest with checksums and lineage.

The manifest ties an adapter to the exact base weights (their sha256), the dataset version and the config it was
trained with; loading refuses an adapter whose files or base do not match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tandem.models import sha256_file

MANIFEST = "tandem-adapter.json"
WEIGHTS = "adapter_model.safetensors"


def publish_adapter(adapter_dir: str | Path, out: str | Path, lineage: dict) -> dict:
    """Copy a trained adapter to `out` with its manifest; return the manifest."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; adapters are immutable, pick another train.name")
    shutil.copytree(adapter_dir, out)
    manifest = {**lineage, "sha256": sha256_file(out / WEIGHTS), "path": str(out.resolve())}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_adapter(path: str | Path, base_sha256: str) -> dict:
    """The manifest, after checking the weights' checksum and that the adapter was trained on this base."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    actual = sha256_file(path / WEIGHTS)
    if actual != manifest["sha256"]:
        raise ValueError(f"adapter {path} is corrupt: sha256 {actual[:12]} != manifest {manifest['sha256'][:12]}")
    if manifest["base"]["sha256"] != base_sha256:
        raise ValueError(f"adapter {path} was trained on base {manifest['base']['sha256'][:12]}, "
                         f"not on the loaded base {base_sha256[:12]}")
    return manifest
