"""The packaged GGUF base becomes a normal safetensors directory that plain from_pretrained loads."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.prepare_base import main as prepare_main
from tandem.models import MANIFEST, sha256_file


def test_prepare_base_converts_once_and_loads_with_from_pretrained(workdir):
    base = prepare_main([])
    manifest = json.loads((base.path / MANIFEST).read_text())
    assert manifest["gguf"].endswith(".gguf") and manifest["dtype"] == "bfloat16"
    assert manifest["sha256"] == base.sha256
    mtime = (base.path / "model.safetensors").stat().st_mtime
    assert prepare_main([]).path == base.path  # cached: not converted again
    assert (base.path / "model.safetensors").stat().st_mtime == mtime
    assert len(sha256_file(base.path / "model.safetensors")) == 64

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids.shape[1]:])
