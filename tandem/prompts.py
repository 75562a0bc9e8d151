"""The RAG prompt: numbered context passages and a question, answered as strict JSON.

One definition shared by the training data that teaches the format and the serving router that uses it,
so the adapter sees at serving time exactly the shape it was trained on.
"""

from __future__ import annotations

import json

SYSTEM = ('Answer the question using only the numbered context. Reply with JSON only: '
          '{"answer": "<a short answer>", "sources": [<numbers of the passages used>]}. '
          'If the context does not answer the question, reply {"answer": "", "sources": []}.')


def rag_messages(question: str, passages: list[str]) -> list[dict]:
    context = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, start=1))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]


MAX_ANSWER_CHARS = 240  # a name, a date, or one sentence (the FAQ's answers are sentences)


def answer_format(passages: int) -> dict:
    """The answer shape as an OpenAI `response_format` (json_schema), for constrained decoding: a short answer and
    sources that can only be the numbers of the passages given (none without passages)."""
    sources = {"type": "array", "items": {"type": "integer", "enum": list(range(1, passages + 1))} if passages else
               {"type": "integer"}, "maxItems": passages}
    schema = {"type": "object",
              "properties": {"answer": {"type": "string", "maxLength": MAX_ANSWER_CHARS}, "sources": sources},
              "required": ["answer", "sources"], "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "rag_answer", "schema": schema}}


def rag_answer(answer: str, sources: list[int]) -> str:
    return json.dumps({"answer": answer, "sources": sources}, ensure_ascii=False)


def parse_rag_answer(text: str) -> dict | None:
    """The answer as {"answer": str, "sources": [int]}, or None when it does not have exactly that shape."""
    try:
        obj = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or set(obj) != {"answer", "sources"} or not isinstance(obj["answer"], str):
        return None
    sources = obj["sources"]
    if not isinstance(sources, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sources):
        return None
    return obj
