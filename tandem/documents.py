"""Reading and cleaning documents, one file at a time, with a reason for everything that is skipped.

`parse_file` is what Ray Data's `flat_map` runs over `read_binary_files` rows. It yields document rows; a file or
JSONL line that cannot be used yields a row whose `error` says why, so the job can report it and go on.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import PurePosixPath

TEXT_KEYS = ("text", "contents", "body")
ID_KEYS = ("id", "_id", "doc_id")


@dataclass
class DocRow:
    """One document (or one rejected input, when `error` is set). Flat, so Ray Data stores it as Arrow."""

    doc_id: str = ""
    source: str = ""
    title: str = ""
    text: str = ""
    meta: str = "{}"  # JSON: Arrow cannot hold dicts whose keys differ from row to row
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def rejected(source: str, reason: str, doc_id: str = "") -> dict:
    return DocRow(doc_id=doc_id, source=source, error=reason).to_dict()


def clean_text(text: str) -> str:
    """Normalise whitespace but keep paragraph breaks, which chunking uses as cut points."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def looks_binary(data: bytes) -> bool:
    head = data[:8192]
    if b"\x00" in head:
        return True
    control = sum(1 for b in head if b < 9 or 13 < b < 32)
    return bool(head) and control / len(head) > 0.05


def decode(data: bytes) -> str:
    """Strict UTF-8 (with BOM): a file in another encoding is rejected rather than indexed as mojibake."""
    return data.decode("utf-8-sig")


def _title_from_markup(text: str, fallback: str) -> str:
    lines = [ln.strip() for ln in text.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("#"):
            return line.lstrip("#").strip()
        # reStructuredText: a line underlined (or over- and underlined) with punctuation
        if line and i + 1 < len(lines) and re.fullmatch(r"([=\-~^\"'`#*+])\1{2,}", lines[i + 1]):
            if not re.fullmatch(r"([=\-~^\"'`#*+])\1{2,}", line):
                return line
    return fallback


def _html_text(raw: str, fallback: str) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(raw, "html.parser")
    for tag in soup(["script", "style", "noscript", "nav", "footer", "header"]):
        tag.decompose()
    title = soup.title.get_text(strip=True) if soup.title else ""
    if not title and soup.h1:
        title = soup.h1.get_text(strip=True)
    return title or fallback, soup.get_text("\n")


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader

    return "\n\n".join(page.extract_text() or "" for page in PdfReader(BytesIO(data)).pages)


def _jsonl_rows(data: bytes, source: str) -> list[dict]:
    rows = []
    try:
        lines = decode(data).splitlines()
    except UnicodeDecodeError as e:
        return [rejected(source, f"not valid UTF-8: {e.reason} at byte {e.start}")]
    for n, line in enumerate(lines, start=1):
        where = f"{source}:{n}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(rejected(where, f"broken JSON line: {e.msg} at column {e.colno}"))
            continue
        if not isinstance(obj, dict):
            rows.append(rejected(where, f"JSONL line is a {type(obj).__name__}, expected an object"))
            continue
        doc_id = next((str(obj[k]) for k in ID_KEYS if obj.get(k) not in (None, "")), "")
        text = next((obj[k] for k in TEXT_KEYS if isinstance(obj.get(k), str)), None)
        if not doc_id:
            rows.append(rejected(where, f"no document id (one of {', '.join(ID_KEYS)})"))
            continue
        if text is None:
            rows.append(rejected(where, f"no text field (one of {', '.join(TEXT_KEYS)})", doc_id))
            continue
        text = clean_text(text)
        if not text:
            rows.append(rejected(where, "empty text", doc_id))
            continue
        meta = {k: v for k, v in obj.items() if k not in (*ID_KEYS, *TEXT_KEYS, "title")}
        meta = meta.get("metadata", meta) if set(meta) == {"metadata"} else meta  # BEIR nests it
        rows.append(
            DocRow(doc_id, where, str(obj.get("title") or ""), text, json.dumps(meta, ensure_ascii=False)).to_dict()
        )
    return rows


def parse_file(path: str, data: bytes, root: str, max_bytes: int) -> list[dict]:
    """Turn one file into document rows (a JSONL file gives many). The doc id of a plain file is its path under root."""
    rel = str(PurePosixPath(path).relative_to(root)) if path.startswith(root) else path
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".gz":  # compressed docs, as Debian ships them: read as the file inside
        if data[:2] == b"\x1f\x8b":  # Ray's file readers may have decompressed it already
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as e:
                return [rejected(rel, f"broken gzip: {e}", rel)]
        suffix = PurePosixPath(path[:-3]).suffix.lower()
    if len(data) > max_bytes:
        return [rejected(rel, f"over the size limit: {len(data)} bytes > corpus.max_bytes={max_bytes}", rel)]
    if not data.strip():
        return [rejected(rel, "empty file", rel)]
    if suffix == ".jsonl":
        return _jsonl_rows(data, rel)
    if suffix == ".pdf":
        try:
            raw, title = _pdf_text(data), PurePosixPath(rel).stem
        except Exception as e:  # pypdf raises many types for broken files
            return [rejected(rel, f"unreadable PDF: {type(e).__name__}: {e}", rel)]
    else:
        if looks_binary(data):
            return [rejected(rel, "binary content in a text file", rel)]
        try:
            raw = decode(data)
        except UnicodeDecodeError as e:
            return [rejected(rel, f"not valid UTF-8: {e.reason} at byte {e.start}", rel)]
        if suffix in (".html", ".htm"):
            title, raw = _html_text(raw, PurePosixPath(rel).stem)
        else:
            title = _title_from_markup(raw, PurePosixPath(rel).stem)
    text = clean_text(raw)
    if not text:
        return [rejected(rel, "no text after cleaning", rel)]
    return [DocRow(rel, rel, title, text, json.dumps({"path": rel})).to_dict()]
