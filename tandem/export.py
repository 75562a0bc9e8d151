"""Adapters merged into their base, for engines that want plain weights (vLLM without LoRA, llama.cpp converters,
TGI): PEFT's `merge_and_unload` on a full-precision base, saved as safetensors with the tokenizer and a manifest
that ties the result to the adapter and base it came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tandem.models import BaseModel, hash_files, load_tokenizer

MANIFEST = "tandem-merged.json"
DTYPES = ("bfloat16", "float16", "float32")


def merge_adapter(base: BaseModel, adapter_dir: str | Path, out: str | Path, dtype: str, lineage: dict) -> dict:
    """Write base + adapter as one model at `out` (immutable: an existing `out` is refused); returns the manifest.

    The base is loaded unquantized in `dtype`: merging into 4-bit weights would round the adapter's update away."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"export.dtype={dtype}; expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; merged models are immutable, pick another export.dir")
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(base).save_pretrained(tmp)
    manifest = {**lineage, "base": base.manifest(), "dtype": dtype,
                "sha256": hash_files(sorted(tmp.glob("*.safetensors")))}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    tmp.rename(out)
    return {**manifest, "path": str(out.resolve())}
