"""Token-aware chunking with overlap, counted in the embedder's own tokens so no chunk is truncated at embed time."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer

SENTENCE_ENDS = (".", "!", "?", ":", ";", "\n")


def load_embedder_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The fast tokenizer alone: a chunking worker need not import torch or transformers."""
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


class Chunker:
    """Windows of at most `max_tokens` tokens, `overlap_tokens` shared with the previous window.

    A window ends at the last sentence or paragraph end in its final third when there is one, so chunks rarely cut a
    sentence in half; otherwise it ends at a token boundary. Text is sliced by character offsets, never re-joined
    from tokens, so a chunk is an exact substring of the document.
    """

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, overlap_tokens: int):
        if not 0 <= overlap_tokens < max_tokens:
            raise ValueError(f"chunking.overlap_tokens={overlap_tokens} must be >= 0 and < max_tokens={max_tokens}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = overlap_tokens

    def signature(self) -> str:
        """Part of each document's hash, so changing the chunking re-indexes everything."""
        return f"chunk:{self.max_tokens}:{self.overlap}"

    def split_many(self, texts: list[str]) -> list[list[str]]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [self._split(t, [o for o in enc.offsets if o[1] > o[0]]) for t, enc in zip(texts, encodings)]

    def _split(self, text: str, offsets: list[tuple[int, int]]) -> list[str]:
        if len(offsets) <= self.max_tokens:
            return [text]
        ends = [e for _, e in offsets]
        chunks, start_tok = [], 0
        while start_tok < len(offsets):
            stop_tok = min(start_tok + self.max_tokens, len(offsets))
            if stop_tok < len(offsets):
                stop_tok = self._sentence_stop(text, offsets, start_tok, stop_tok)
            begin, end = offsets[start_tok][0], ends[stop_tok - 1]
            chunks.append(text[begin:end].strip())
            if stop_tok == len(offsets):
                break
            start_tok = max(stop_tok - self.overlap, start_tok + 1)
        return [c for c in chunks if c]

    def _sentence_stop(self, text: str, offsets, start_tok: int, stop_tok: int) -> int:
        floor = start_tok + (2 * (stop_tok - start_tok)) // 3
        for t in range(stop_tok, floor, -1):
            end = offsets[t - 1][1]
            if text[end - 1] in SENTENCE_ENDS or (end < len(text) and text[end] == "\n"):
                return t
        return stop_tok


def chunk_id(doc_id: str, chunk_no: int) -> int:
    """A stable signed 64-bit primary key: re-indexing the same chunk upserts the same row."""
    digest = hashlib.blake2b(f"{doc_id}\x1f{chunk_no}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def doc_hash(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x1f")
    return h.hexdigest()[:32]
