"""Milvus: the chunk schema, the connection (Milvus Lite or a server, by URI), and the Ray Data sink that writes to it.

A local `store.uri` is a Milvus Lite directory. Only one process may open it, so `milvus_endpoint` serves it with a
`milvus-lite server` child on 127.0.0.1 for the length of a job; Ray workers then reach it over gRPC exactly as they
would reach a Milvus server, and one code path serves both.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pymilvus import DataType, Function, FunctionType, MilvusClient
from ray.data import Datasink
from ray.data.block import BlockAccessor

FIELDS = ["id", "doc_id", "source", "title", "chunk_no", "n_chunks", "doc_hash", "text", "meta"]
TEXT_MAX = 65535


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://"))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a child server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the server child gets SIGTERM if the job is killed, so it never outlives it holding the lock."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_unlocked(data_dir: Path, timeout_s: float) -> None:
    """Wait for nobody to hold a Milvus Lite directory's lock: the job before may still be closing it (its server
    exiting), and the next one would fail on it; `make demo` runs jobs back to back."""
    import fcntl

    lock = data_dir / "LOCK"
    if not lock.exists():
        return
    deadline = time.monotonic() + timeout_s
    with open(lock, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Milvus Lite at {data_dir} stayed locked for {timeout_s:.0f}s: another process "
                                       "has it open (a job or the app); point store.uri at that process's server "
                                       "instead") from None
                time.sleep(0.1)


@contextmanager
def milvus_endpoint(uri: str, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Yield a URI every process can use: a server URI as is, a Milvus Lite directory through a local server."""
    if is_server_uri(uri):
        yield uri
        return
    data_dir = Path(uri).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    wait_unlocked(data_dir, start_timeout_s)
    port = free_port()
    log_path = data_dir.parent / f"{data_dir.name}.server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    served = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"could not serve Milvus Lite at {data_dir} (is another process using it? point store.uri at "
                    f"that process's server instead):\n{tail}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"milvus-lite server for {data_dir} did not start in {start_timeout_s}s")
                time.sleep(0.05)
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# pymilvus pings every 10 s even when idle; servers with gRPC's default policy (Milvus Lite's among them) answer an
# idle client's pings with GOAWAY "too_many_pings" and the next call fails. Five and a half minutes is within it.
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 330_000}


def connect(uri: str) -> MilvusClient:
    """A client for a Milvus server URI (a served Milvus Lite included)."""
    return MilvusClient(uri=uri, grpc_options=GRPC_OPTIONS)


@contextmanager
def local_or_server(uri: str) -> Iterator[MilvusClient]:
    """A client in this process: Milvus Lite opened directly, or a server. Closes (and unlocks) on exit."""
    if is_server_uri(uri):
        client = connect(uri)
        try:
            yield client
        finally:
            client.close()
        return
    path = str(Path(uri).expanduser().resolve())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    wait_unlocked(Path(path), 60.0)
    client = MilvusClient(path)
    try:
        yield client
    finally:
        client.close()
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(path)  # close() alone keeps the directory locked


def is_lite(client: MilvusClient) -> bool:
    return "lite" in str(client.get_server_version()).lower()


def supports_bm25(client: MilvusClient) -> bool:
    """BM25 functions arrived in Milvus 2.5; Milvus Lite has them."""
    version = str(client.get_server_version()).lstrip("v")
    if "lite" in version.lower():
        return True
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return True  # an unknown build string: assume a current server
    return (major, minor) >= (2, 5)


def has_bm25(client: MilvusClient, collection: str) -> bool:
    fields = client.describe_collection(collection)["fields"]
    return any(f["name"] == "sparse" for f in fields)


@dataclass
class CollectionSpec:
    name: str
    dim: int
    index_type: str = "auto"
    index_params: dict | None = None
    bm25: str = "auto"
    num_shards: int = 1

    @classmethod
    def from_config(cls, store_cfg, dim: int) -> "CollectionSpec":
        return cls(store_cfg.collection, dim, store_cfg.index_type, dict(store_cfg.index_params), store_cfg.bm25,
                   store_cfg.num_shards)


def ensure_collection(client: MilvusClient, spec: CollectionSpec) -> None:
    """Create the chunk collection if it is missing; refuse one whose vectors have another dimension."""
    if client.has_collection(spec.name):
        dim = collection_dim(client, spec.name)
        if dim != spec.dim:
            raise ValueError(f"collection {spec.name!r} holds {dim}-dim vectors but the embedder makes {spec.dim}")
        client.load_collection(spec.name)
        return
    bm25 = {"auto": supports_bm25(client), "true": True, "false": False}[str(spec.bm25).lower()]
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=1024)
    schema.add_field("source", DataType.VARCHAR, max_length=2048)
    schema.add_field("title", DataType.VARCHAR, max_length=2048)
    schema.add_field("chunk_no", DataType.INT32)
    schema.add_field("n_chunks", DataType.INT32)
    schema.add_field("doc_hash", DataType.VARCHAR, max_length=64)
    schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX, enable_analyzer=bm25, enable_match=bm25)
    schema.add_field("meta", DataType.JSON)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=spec.dim)
    index = client.prepare_index_params()
    index_type = spec.index_type
    if index_type == "auto":
        index_type = "HNSW" if is_lite(client) else "AUTOINDEX"
    index.add_index("dense", index_type=index_type, metric_type="COSINE",
                    params=(spec.index_params or {}) if index_type.startswith("HNSW") else {})
    index.add_index("doc_id", index_type="INVERTED")
    if bm25:
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["text"],
                                     output_field_names=["sparse"]))
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    client.create_collection(spec.name, schema=schema, index_params=index, num_shards=spec.num_shards)
    client.load_collection(spec.name)


def collection_dim(client: MilvusClient, collection: str) -> int:
    dense = next(f for f in client.describe_collection(collection)["fields"] if f["name"] == "dense")
    return int(dense["params"]["dim"])


def copy_collection(client: MilvusClient, source: str, spec: CollectionSpec, batch: int = 512) -> int:
    """`spec.name` made anew as a copy of `source`'s rows, their vectors included (BM25's are derived again from the
    text), so a variant of an indexed corpus costs a copy, not embedding it all again; returns the rows copied.
    `spec` gives the copy's index settings (its dim must be the source's)."""
    if spec.name == source:
        raise ValueError(f"collection {source!r} cannot be copied onto itself")
    if client.has_collection(spec.name):
        client.drop_collection(spec.name)
    ensure_collection(client, spec)
    fields = [*FIELDS, "dense"]
    rows = ({k: row[k] for k in fields} for row in _iterate(client, source, "", fields))
    copied = 0
    while part := list(itertools.islice(rows, batch)):
        client.insert(spec.name, part)
        copied += len(part)
    client.flush(spec.name)
    return copied


def quote(s: str) -> str:
    """A Milvus string literal (JSON escaping is what its expression parser accepts)."""
    return json.dumps(s, ensure_ascii=False)


def in_filter(field: str, values: Iterable[str]) -> str:
    return f"{field} in [{', '.join(quote(v) for v in values)}]"


def all_of(*filters: str) -> str:
    """Filters that must all hold, each in its own parentheses. A filter whose brackets or quotes do not balance is
    refused: `x == 1) or (x != 1` would otherwise close its parentheses early and widen a key's allowed filter.
    Quotes are scanned as Milvus reads them, so a bracket inside a string literal is text."""
    parts = [f.strip() for f in filters if f and f.strip()]
    for f in parts:
        _check_balanced(f)
    return parts[0] if len(parts) == 1 else " and ".join(f"({f})" for f in parts)


def _check_balanced(expr: str) -> None:
    closers, stack, quote, escaped = {")": "(", "]": "[", "}": "{"}, [], None, False
    for i, c in enumerate(expr):
        if quote:
            escaped, quote = (False, quote) if escaped else (c == "\\", None if c == quote else quote)
        elif c in "\"'":
            quote = c
        elif c in "([{":
            stack.append(c)
        elif c in closers and (not stack or stack.pop() != closers[c]):
            raise ValueError(f"filter {expr!r}: unmatched {c!r} at character {i + 1}")
    if quote or stack:
        raise ValueError(f"filter {expr!r}: unclosed {quote or stack[-1]!r}")


QUERY_WINDOW = 16384  # Milvus's largest result for one query; beyond it, page with an iterator


def _iterate(client: MilvusClient, collection: str, filter: str, fields: list[str]) -> Iterator[dict]:
    it = client.query_iterator(collection, batch_size=8192, filter=filter, output_fields=fields)
    try:
        while batch := it.next():
            yield from batch
    finally:
        it.close()


def _query_all(client: MilvusClient, collection: str, filter: str, fields: list[str]) -> list[dict]:
    rows = client.query(collection, filter=filter, output_fields=fields, limit=QUERY_WINDOW)
    return rows if len(rows) < QUERY_WINDOW else list(_iterate(client, collection, filter, fields))


def stored_docs(client: MilvusClient, collection: str, doc_ids: list[str]) -> dict[str, tuple[set, int, int]]:
    """doc_id -> (doc hashes of its rows, row count, n_chunks recorded): enough to tell complete from partial."""
    out: dict[str, tuple[set, int, int]] = {}
    if not doc_ids:
        return out
    for row in _query_all(client, collection, in_filter("doc_id", doc_ids), ["doc_id", "doc_hash", "n_chunks"]):
        hashes, count, n = out.get(row["doc_id"], (set(), 0, row["n_chunks"]))
        hashes.add(row["doc_hash"])
        out[row["doc_id"]] = (hashes, count + 1, n)
    return out


def all_doc_ids(client: MilvusClient, collection: str) -> set[str]:
    return {row["doc_id"] for row in _iterate(client, collection, "", ["doc_id"])}


def delete_docs(client: MilvusClient, collection: str, doc_ids: list[str], batch: int = 500) -> int:
    deleted = 0
    for i in range(0, len(doc_ids), batch):
        deleted += _delete_count(client.delete(collection, filter=in_filter("doc_id", doc_ids[i : i + batch])))
    return deleted


def delete_tails(client: MilvusClient, collection: str, tails: dict[str, int]) -> int:
    """Delete chunks past a document's new end (`chunk_no >= n_chunks`) left from a longer old version."""
    if not tails:
        return 0
    expr = " or ".join(f"(doc_id == {quote(d)} and chunk_no >= {n})" for d, n in tails.items())
    return _delete_count(client.delete(collection, filter=expr))


def _delete_count(result) -> int:
    """A Milvus server answers {"delete_count": n}; Milvus Lite the list of deleted keys (or {} for none)."""
    return int(result.get("delete_count", 0)) if isinstance(result, dict) else len(result)


class MilvusDatasink(Datasink):
    """Ray Data sink: upserts chunk rows in batches, trims replaced documents' stale tails, flushes at the end.

    Upsert on a stable primary key makes a re-run after a crash write the same rows again instead of duplicates.
    """

    def __init__(self, uri: str, collection: str, batch_size: int = 512):
        self.uri = uri
        self.collection = collection
        self.batch_size = batch_size
        self.totals = {"chunks_written": 0, "chunks_deleted": 0}

    def write(self, blocks, ctx) -> dict:
        client = connect(self.uri)
        written = deleted = 0
        try:
            for block in blocks:
                rows = BlockAccessor.for_block(block).to_arrow().to_pylist()
                for i in range(0, len(rows), self.batch_size):
                    part = rows[i : i + self.batch_size]
                    client.upsert(self.collection, [_milvus_row(r) for r in part])
                    written += len(part)
                tails = {r["doc_id"]: r["n_chunks"] for r in rows if r["replaced"]}
                deleted += delete_tails(client, self.collection, tails)
        finally:
            client.close()
        return {"chunks_written": written, "chunks_deleted": deleted}

    def on_write_complete(self, write_result) -> None:
        for ret in write_result.write_returns:
            for k in self.totals:
                self.totals[k] += ret[k]
        client = connect(self.uri)
        try:
            client.flush(self.collection)
        finally:
            client.close()

    def get_name(self) -> str:
        return "Milvus"


def _milvus_row(r: dict) -> dict:
    row = {k: r[k] for k in FIELDS if k != "meta"}
    row["meta"] = json.loads(r["meta"])
    row["dense"] = list(r["dense"])
    return row
