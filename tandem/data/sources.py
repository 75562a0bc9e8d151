"""Training rows from the files people bring, as JSON lines for validation: JSONL, a JSON array, Parquet, or a
Hugging Face dataset saved with `save_to_disk`. Every source then passes the same checks, with line numbers (the
row's position in the file or split) in its reasons."""

from __future__ import annotations

import json
from pathlib import Path

from tandem.errors import ConfigError

SPLITS = {"train": "train", "validation": "eval", "eval": "eval", "test": "eval"}


def read_rows(path: str | Path) -> list[str]:
    """JSONL is passed through line by line, so a torn line is one rejected row, not a failed file."""
    path = Path(path)
    if path.is_dir():
        return _saved_dataset(path)
    if not path.is_file():
        raise ConfigError(f"dataset.path={path} is neither a file nor a dataset directory")
    if path.suffix == ".jsonl":
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"dataset.path={path} is not JSON ({e}); JSONL rows go in a .jsonl file") from None
        if not isinstance(rows, list):
            raise ConfigError(f"dataset.path={path} holds a JSON {type(rows).__name__}; expected an array of rows")
        return [json.dumps(r, ensure_ascii=False) for r in rows]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [json.dumps(r, ensure_ascii=False, default=str) for r in pq.read_table(path).to_pylist()]
    raise ConfigError(f"dataset.path={path}: expected .jsonl, .json, .parquet or a directory written by a Hugging "
                      "Face dataset's save_to_disk")


def _saved_dataset(path: Path) -> list[str]:
    """A Dataset, or a DatasetDict whose train split trains and whose validation/eval/test split evaluates."""
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ConfigError(f"dataset.path={path} is a directory but not a saved Hugging Face dataset: {e}") from None
    splits = data.items() if isinstance(data, DatasetDict) else [(None, data)]
    unknown = sorted(name for name, _ in splits if name is not None and name not in SPLITS)
    if unknown:
        raise ConfigError(f"dataset.path={path} has splits {', '.join(unknown)}; expected "
                          f"{', '.join(SPLITS)}")
    return [json.dumps({**({"split": SPLITS[name]} if name else {}), **row}, ensure_ascii=False, default=str)
            for name, split in splits for row in split]
