"""The Ray Data indexing pipeline: files -> documents -> changed documents' chunks -> embeddings -> Milvus.

    read_binary_files -> flat_map(parse_file) -> PrepareChunks (actor pool) -> EmbedChunks (actor pool, GPUs)
                      -> MilvusDatasink

Incremental by design: each chunk row carries its document's hash and chunk count, so `PrepareChunks` can tell an
unchanged, complete document (skipped before chunking or embedding) from a new, changed or half-written one
(re-chunked and upserted on stable keys). Re-running after a crash therefore converges to exactly one copy of
every chunk. What is skipped, and why, goes to a `Ledger` actor that the job summarises at the end.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from pymilvus import MilvusClient

from tandem.chunking import Chunker, chunk_id, doc_hash, load_embedder_tokenizer
from tandem.documents import parse_file
from tandem.embedding import Embedder, embedding_dim, resolve_model_path
from tandem.errors import ConfigError
from tandem.milvus import (
    CollectionSpec,
    MilvusDatasink,
    all_doc_ids,
    connect,
    delete_docs,
    ensure_collection,
    stored_docs,
)

CHUNK_SCHEMA = pa.schema([
    ("id", pa.int64()), ("doc_id", pa.string()), ("source", pa.string()), ("title", pa.string()),
    ("chunk_no", pa.int32()), ("n_chunks", pa.int32()), ("doc_hash", pa.string()), ("text", pa.string()),
    ("meta", pa.string()), ("replaced", pa.bool_()),
])


@ray.remote(num_cpus=0)
class Ledger:
    """Per-document outcomes from every worker, for the summary and for `index.prune`."""

    def __init__(self):
        self.rejected: list[dict] = []
        self.unchanged = 0
        self.queued = 0
        self.seen: set[str] = set()

    def record(self, rejected: list[dict], unchanged: list[str], queued: list[str]) -> None:
        self.rejected.extend(rejected)
        self.unchanged += len(unchanged)
        self.queued += len(queued)
        self.seen.update(unchanged, queued, (r["doc_id"] for r in rejected if r["doc_id"]))

    def counts(self) -> dict:
        return {"rejected": list(self.rejected), "unchanged": self.unchanged, "queued": self.queued}

    def seen_ids(self) -> set[str]:
        return self.seen


class PrepareChunks:
    """Drop unchanged documents, report rejected ones, chunk the rest (one output row per chunk)."""

    def __init__(self, uri: str, collection: str, tokenizer_dir: str, max_tokens: int, overlap: int,
                 embedder_id: str, ledger):
        self.client = connect(uri)
        self.collection = collection
        self.chunker = Chunker(load_embedder_tokenizer(tokenizer_dir), max_tokens, overlap)
        self.signature = f"{self.chunker.signature()}|{embedder_id}"
        self.ledger = ledger

    def __call__(self, batch: pa.Table) -> pa.Table:
        docs = batch.to_pylist()
        rejected = [{"source": d["source"], "reason": d["error"], "doc_id": d["doc_id"]} for d in docs if d["error"]]
        docs = list({d["doc_id"]: d for d in docs if not d["error"]}.values())  # last copy of a repeated id wins
        for d in docs:
            d["doc_hash"] = doc_hash(d["text"], d["title"], d["meta"], self.signature)
        stored = stored_docs(self.client, self.collection, [d["doc_id"] for d in docs])
        unchanged, todo = [], []
        for d in docs:
            hashes, count, n = stored.get(d["doc_id"], (set(), 0, -1))
            (unchanged if hashes == {d["doc_hash"]} and count == n else todo).append(d)
        out = {name: [] for name in CHUNK_SCHEMA.names}
        for d, chunks in zip(todo, self.chunker.split_many([d["text"] for d in todo])):
            for no, text in enumerate(chunks):
                row = {"id": chunk_id(d["doc_id"], no), "doc_id": d["doc_id"], "source": d["source"],
                       "title": d["title"], "chunk_no": no, "n_chunks": len(chunks), "doc_hash": d["doc_hash"],
                       "text": text, "meta": d["meta"], "replaced": d["doc_id"] in stored}
                for k, v in row.items():
                    out[k].append(v)
        ray.get(self.ledger.record.remote(rejected, [d["doc_id"] for d in unchanged], [d["doc_id"] for d in todo]))
        return pa.Table.from_pydict(out, schema=CHUNK_SCHEMA)


class EmbedChunks:
    """Loads the model in a background thread from the start, so loading overlaps reading and chunking; a re-index
    of an unchanged corpus never waits for it."""

    def __init__(self, embedder_cfg, dim: int):
        self.dim = dim
        self._loaded: dict = {}
        self._loader = threading.Thread(target=self._load, args=(embedder_cfg,), daemon=True)
        self._loader.start()

    def _load(self, cfg) -> None:
        try:
            self._loaded["embedder"] = Embedder.from_config(cfg)
        except Exception as e:  # re-raised on the first batch that needs the model
            self._loaded["error"] = e

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows:
            self._loader.join()
            if "error" in self._loaded:
                raise self._loaded["error"]
            vectors = self._loaded["embedder"].encode(batch.column("text").to_pylist())
        else:
            vectors = np.zeros((0, self.dim), np.float32)
        dense = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim)
        return batch.append_column("dense", dense)


def list_corpus(root: str, extensions: list[str]) -> list[str]:
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise ConfigError(f"corpus.path={root} is not a directory")
    exts = tuple(e.lower() for e in extensions)
    return sorted(str(p) for p in base.rglob("*") if p.is_file() and p.name.lower().endswith(exts))


class PeakMemory:
    """Peak memory of this process and its children (the local Ray workers and the Milvus Lite server), summed as
    PSS so that the pages they share (libraries, Ray's object store) are counted once."""

    def __init__(self, interval_s: float = 2.0):  # reading PSS costs ~20 ms a sample: keep it off the hot path
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _sample(self) -> int:
        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except Exception:  # a worker that exited between listing and reading
                pass
        return total

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, self._sample())

    def __enter__(self):
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_index(cfg, uri: str) -> dict:
    """Index `cfg.corpus.path` into `cfg.store.collection` at the Milvus `uri`; return the job summary."""
    files = list_corpus(cfg.corpus.path, list(cfg.corpus.extensions))
    model_dir = resolve_model_path(cfg.embedder.model)
    dim = embedding_dim(model_dir) or Embedder.from_config(cfg.embedder).dim
    client = connect(uri)
    ensure_collection(client, CollectionSpec.from_config(cfg.store, dim))
    rows_before = _count(client, cfg.store.collection)

    ledger = Ledger.remote()
    root = str(Path(cfg.corpus.path).expanduser().resolve())
    started = time.monotonic()
    with PeakMemory() as memory:
        written = {"chunks_written": 0, "chunks_deleted": 0}
        if files:
            # Small blocks keep the stages streaming: one big JSONL file must not become one block that each stage
            # holds whole (the embedder would start only when every document was chunked).
            ray.data.DataContext.get_current().target_max_block_size = cfg.index.block_bytes
            ds = ray.data.read_binary_files(files, include_paths=True, num_cpus=cfg.index.io_num_cpus)
            ds = ds.flat_map(lambda r: parse_file(r["path"], r["bytes"], root, cfg.corpus.max_bytes),
                             num_cpus=cfg.index.io_num_cpus)
            ds = ds.map_batches(
                PrepareChunks, batch_format="pyarrow", batch_size=cfg.index.prepare_batch_size,
                fn_constructor_kwargs=dict(uri=uri, collection=cfg.store.collection, tokenizer_dir=model_dir,
                                           max_tokens=cfg.chunking.max_tokens, overlap=cfg.chunking.overlap_tokens,
                                           embedder_id=f"{cfg.embedder.model}|{dim}", ledger=ledger),
                compute=ray.data.ActorPoolStrategy(size=cfg.index.prepare_actors), num_cpus=cfg.index.prepare_num_cpus)
            ds = ds.map_batches(
                EmbedChunks, batch_format="pyarrow", batch_size=cfg.embedder.batch_size,
                fn_constructor_kwargs=dict(embedder_cfg=cfg.embedder, dim=dim),
                compute=ray.data.ActorPoolStrategy(size=cfg.embedder.num_actors),
                num_cpus=cfg.embedder.num_cpus, num_gpus=cfg.embedder.num_gpus)
            sink = MilvusDatasink(uri, cfg.store.collection, cfg.store.write_batch_size)
            ds.write_datasink(sink, ray_remote_args={"num_cpus": cfg.index.io_num_cpus})
            written = sink.totals
        outcome = ray.get(ledger.counts.remote())
        pruned = 0
        if cfg.index.prune:
            stale = all_doc_ids(client, cfg.store.collection) - ray.get(ledger.seen_ids.remote())
            pruned = delete_docs(client, cfg.store.collection, sorted(stale))
            client.flush(cfg.store.collection)
    elapsed = time.monotonic() - started
    rows_after = _count(client, cfg.store.collection)
    client.close()
    ray.kill(ledger)
    return {
        "corpus": root,
        "store": {"uri": cfg.store.uri, "collection": cfg.store.collection},
        "files": len(files),
        "documents_read": outcome["unchanged"] + outcome["queued"],
        "documents_indexed": outcome["queued"],
        "documents_unchanged": outcome["unchanged"],
        "documents_skipped": len(outcome["rejected"]),
        "skipped": outcome["rejected"],
        "chunks_written": written["chunks_written"],
        "chunks_deleted": written["chunks_deleted"] + pruned,
        "chunks_pruned": pruned,
        "rows_before": rows_before,
        "rows_after": rows_after,
        "elapsed_s": round(elapsed, 2),
        "chunks_per_s": round(written["chunks_written"] / elapsed, 1) if elapsed else 0.0,
        "peak_memory_mb": round(memory.peak / 2**20),
    }


def _count(client: MilvusClient, collection: str) -> int:
    return int(client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"])
