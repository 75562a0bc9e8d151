"""The embedder: one SentenceTransformer per process, on the GPU when the process has one.

Used by the indexing actor pool and by the serving retriever, so queries and chunks are embedded alike.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub at run time: a missing model is an error, not a download


def resolve_model_path(model: str) -> str:
    """`pkg:<module>` is a model shipped inside a Python package (its `get_model_path()`); else a path or HF id."""
    if model.startswith("pkg:"):
        module = importlib.import_module(model[4:])
        return str(module.get_model_path())
    return model


def select_device(device: str) -> str:
    """`auto` falls back to CPU when CUDA is absent in this process, e.g. a GPU actor on a CPU-only node."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"embedder.device={device} but this process sees no CUDA device")
    return device


def embedding_dim(model_path: str) -> int | None:
    """The output dimension from a SentenceTransformer directory's module configs, without loading torch."""
    root = Path(model_path)
    if not (root / "modules.json").is_file():
        return None
    dim = None
    for module in json.loads((root / "modules.json").read_text()):
        conf = root / module["path"] / "config.json"
        if module["type"].endswith("Dense") and conf.is_file():
            dim = json.loads(conf.read_text())["out_features"]
        elif module["type"].endswith("Pooling") and conf.is_file():
            dim = json.loads(conf.read_text())["word_embedding_dimension"]
    return dim


class Embedder:
    def __init__(self, model: str, device: str = "auto", normalize: bool = True, encode_batch_size: int = 64,
                 torch_threads: int = 0):
        import torch
        from sentence_transformers import SentenceTransformer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.path = resolve_model_path(model)
        self.device = select_device(device)
        self.model = SentenceTransformer(self.path, device=self.device)
        self.normalize = normalize
        self.encode_batch_size = encode_batch_size
        self.dim = self.model.get_embedding_dimension()
        self.name = Path(self.path).name if Path(self.path).exists() else self.path

    @classmethod
    def from_config(cls, cfg) -> "Embedder":
        return cls(cfg.model, cfg.device, cfg.normalize, cfg.encode_batch_size, cfg.torch_threads)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            list(texts),
            batch_size=self.encode_batch_size,
            normalize_embeddings=self.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)
