"""Validation of training rows. Every rejected row keeps its line number and the reason; nothing is dropped quietly.

Rows are chat (`{"messages": [{"role", "content", optional "weight": 0|1}, ...]}`), ShareGPT (`{"conversations":
[{"from": "human"|"gpt"|"system", "value"}, ...]}`), prompt/response (`{"prompt", "response"}`) or Alpaca
(`{"instruction", "input", "output"}`), each with an optional `system`; all become messages. A preference pair
(TRL's `{"prompt", "chosen", "rejected"}`, prompt as text or messages) becomes the messages with the chosen answer,
and keeps its `rejected` answer beside them. Checks, in order:
schema and roles, empty turns, token length (reject or truncate), likely secrets and personal data
(tandem/data/privacy.py: flag, drop or redact), exact and near duplicates (MinHash LSH), and overlap between the
train and eval splits (which near-duplicate grouping makes impossible by construction: a group is assigned to one
split).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from datasketch import MinHash, MinHashLSH

from tandem.data import privacy
from tandem.errors import ConfigError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

@dataclass
class Rejected:
    line: int
    reason: str


@dataclass
class ValidationResult:
    rows: list[dict] = field(default_factory=list)  # {"messages", "split", "line", "flags"}
    rejected: list[Rejected] = field(default_factory=list)
    seen: int = 0

    @property
    def reject_fraction(self) -> float:
        return len(self.rejected) / self.seen if self.seen else 0.0

    def reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rejected:
            key = r.reason.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        return counts

    def report(self) -> str:
        lines = [f"{self.seen} rows read, {len(self.rows)} kept, {len(self.rejected)} rejected "
                 f"({self.reject_fraction:.1%})"]
        lines += [f"  {n} x {reason}" for reason, n in sorted(self.reasons().items(), key=lambda kv: -kv[1])]
        lines += [f"  line {r.line}: {r.reason}" for r in self.rejected[:50]]
        if len(self.rejected) > 50:
            lines.append(f"  ... {len(self.rejected) - 50} more in the report file")
        return "\n".join(lines)


def to_messages(obj) -> list[dict]:
    """Normalise one row to messages, or raise ValueError with the reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"bad schema: a row must be a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        obj = {"messages": _sharegpt(obj)}
    if "chosen" in obj or "rejected" in obj:  # a preference pair: the chosen answer is the row's answer
        obj = {"messages": [*_prompt_turns(obj), {"role": "assistant", "content": _answer(obj, "chosen")}]}
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("bad schema: messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"bad schema: message {i} needs string role and content")
            if m.get("weight", 1) not in (0, 1) or isinstance(m.get("weight"), bool):
                raise ValueError(f"bad schema: message {i} has weight {m['weight']!r}; expected 0 (no loss) or 1")
            if m.get("weight") == 0 and i == len(messages) - 1:
                raise ValueError("bad schema: the last turn has weight 0, so the row would teach nothing")
        # weight 0 (Axolotl's per-message field): a turn kept as context that gets no loss
        return [{"role": m["role"], "content": m["content"], **({"weight": 0} if m.get("weight") == 0 else {})}
                for m in messages]
    if "prompt" in obj and "response" in obj:
        return _single_turn(obj, "prompt", "response", obj.get("prompt"))
    if "instruction" in obj and "output" in obj:  # Alpaca: the input, when there is one, follows the instruction
        if not isinstance(obj.get("input", ""), str):
            raise ValueError("bad schema: instruction, input, output and system must be strings")
        text = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        return _single_turn(obj, "instruction", "output", text if isinstance(obj["instruction"], str) else None)
    raise ValueError("bad schema: expected messages, conversations (ShareGPT), prompt and response, or instruction "
                     "and output (Alpaca)")


def _prompt_turns(obj: dict) -> list[dict]:
    """A preference row's prompt: TRL's `prompt` (text or messages) or `messages`, ending with the user's turn."""
    prompt = obj.get("prompt", obj.get("messages"))
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(turns, list) or not turns:
        raise ValueError("bad schema: a preference row needs a prompt (text or messages), chosen and rejected")
    return _system(obj) + turns


def _answer(obj: dict, key: str) -> str:
    """`chosen` or `rejected`: text, or (TRL's conversational form) a list of one assistant message."""
    value = obj.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ValueError(f"bad schema: {key} must be text or one assistant message")
    return value


def rejected_answer(obj: dict, messages: list[dict]) -> str | None:
    """The rejected answer of a preference row (None for any other row), checked against the chosen one."""
    if "chosen" not in obj and "rejected" not in obj:
        return None
    rejected = _answer(obj, "rejected")
    if not rejected.strip():
        raise ValueError("empty turn: the rejected answer has no content")
    if rejected.strip() == messages[-1]["content"].strip():
        raise ValueError("bad preference: chosen and rejected are the same answer")
    return rejected


def _system(obj: dict) -> list[dict]:
    return [{"role": "system", "content": obj["system"]}] if obj.get("system") else []


def _single_turn(obj: dict, asked: str, answer: str, prompt) -> list[dict]:
    if not all(isinstance(x, str) for x in (prompt, obj[answer], obj.get("system", ""))):
        raise ValueError(f"bad schema: {asked}, {answer} and system must be strings")
    return _system(obj) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj[answer]}]


def _sharegpt(obj: dict) -> list[dict]:
    """ShareGPT turns ({"from": human|gpt|system, "value"}) as messages; an unknown `from` stays, for check_roles to
    name."""
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise ValueError("bad schema: conversations must be a non-empty list of {from, value} objects")
    return _system(obj) + [{**{k: v for k, v in t.items() if k not in ("from", "value")},
                            "role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
                           for t in turns]


def check_roles(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"bad role: {', '.join(unknown)} (expected {', '.join(ROLES)})")
    if "system" in roles[1:]:
        raise ValueError("bad role order: system may only come first")
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(turns)):
        raise ValueError("bad role order: turns must alternate user, assistant, starting with user")
    if turns[-1] != "assistant":
        raise ValueError("bad role order: the last turn must be the assistant's (it is what the model learns)")
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise ValueError(f"empty turn: message {i} ({m['role']}) has no content")


def find_secrets(messages: list[dict]) -> list[str]:
    return privacy.find("\n".join(m["content"] for m in messages))


def normalized_text(messages: list[dict]) -> str:
    text = " ".join(f"{m['role']} {m['content']}" for m in messages).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


LSH_THRESHOLD = 0.9


class NearDuplicates:
    """datasketch's MinHash LSH over word 3-shingles finds candidates without comparing every pair; a candidate
    counts only when the exact Jaccard similarity of the shingles passes the threshold (LSH gives false positives)."""

    def __init__(self, threshold: float, num_perm: int = 64, seed: int = 0):
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"dataset.near_duplicate_threshold must be within (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        # LSH only proposes candidates. Near 1 datasketch finds no banding for the threshold (b < 2 raises), so it
        # proposes at LSH_THRESHOLD at most: more candidates, the same decisions.
        self.lsh = MinHashLSH(threshold=min(threshold, LSH_THRESHOLD), num_perm=num_perm)
        self.shingles: list[set] = []

    @staticmethod
    def _shingles(text: str) -> set:
        words = text.split()
        return {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}

    def add(self, text: str) -> int | None:
        """Return the index of an earlier near-duplicate if there is one; else index this text (as the next index)."""
        sh = self._shingles(text)
        sig = MinHash(num_perm=self.num_perm, seed=self.seed)
        sig.update_batch([s.encode() for s in sh])
        twins = [j for j in sorted(self.lsh.query(sig))
                 if len(sh & self.shingles[j]) / len(sh | self.shingles[j]) >= self.threshold]
        if twins:
            return twins[0]
        self.shingles.append(sh)
        self.lsh.insert(len(self.shingles) - 1, sig)
        return None


def validate_rows(lines: list[str], count_tokens, *, max_tokens: int, on_too_long: str = "reject",
                  pii: str = "flag", near_duplicate_threshold: float = 0.9, eval_fraction: float = 0.1,
                  truncate=None) -> ValidationResult:
    """Validate JSONL lines. `count_tokens(messages)` measures a row as it will be trained (chat template);
    `truncate(messages, max_tokens)` shortens the last assistant turn to fit, or returns None when it cannot."""
    if pii not in ("flag", "drop", "redact", "off"):
        raise ConfigError(f"dataset.pii={pii}; expected flag, drop, redact or off")
    result = ValidationResult()
    exact: dict[str, int] = {}
    near = NearDuplicates(near_duplicate_threshold)
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        result.seen += 1
        try:
            obj = json.loads(line)
            messages = to_messages(obj)
            check_roles(messages)
            rejected = rejected_answer(obj, messages)
            split = obj.get("split")
            if split not in (None, "train", "eval"):
                raise ValueError(f"bad split: {split!r} (expected train or eval)")
        except json.JSONDecodeError as e:
            result.rejected.append(Rejected(n, f"bad JSON: {e.msg} at column {e.colno}"))
            continue
        except ValueError as e:
            result.rejected.append(Rejected(n, str(e)))
            continue
        tokens = max(count_tokens(messages), count_tokens([*messages[:-1], {"role": "assistant", "content": rejected}])
                     if rejected is not None else 0)
        if tokens > max_tokens:  # a preference pair is not cut: a shortened answer would change the preference
            shortened = (truncate(messages, max_tokens) if on_too_long == "truncate" and truncate and rejected is None
                         else None)
            if shortened is None:
                result.rejected.append(Rejected(n, f"too long: {tokens} tokens > dataset.max_tokens={max_tokens}"))
                continue
            messages = shortened
        answers = [*messages, {"role": "assistant", "content": rejected}] if rejected is not None else messages
        flags = find_secrets(answers) if pii != "off" else []
        if flags and pii == "drop":
            result.rejected.append(Rejected(n, f"likely secret or personal data: {', '.join(flags)}"))
            continue
        if flags and pii == "redact":
            messages = privacy.redact_messages(messages)
            rejected = privacy.redact(rejected) if rejected is not None else None
            flags = [f"redacted {f}" for f in flags]
        text = normalized_text(messages) + (f" rejected {normalized_text([{'role': '', 'content': rejected}])}"
                                            if rejected is not None else "")
        key = hashlib.sha256(text.encode()).hexdigest()
        split = split or ("eval" if _bucket(key) < eval_fraction else "train")
        twin, kind = (exact[key], "exact") if key in exact else (near.add(text), "near")
        if twin is not None:
            first = result.rows[twin]
            prefix = "train/eval overlap" if first["split"] != split else f"{kind} duplicate"
            result.rejected.append(Rejected(n, f"{prefix}: {kind} copy of line {first['line']} ({first['split']})"))
            continue
        exact[key] = len(result.rows)
        result.rows.append({"messages": messages, "line": n, "flags": flags, "split": split,
                            **({"rejected": rejected} if rejected is not None else {})})
    return result


def _bucket(key: str) -> float:
    """A stable number in [0, 1) per row content: the split never changes when rows are added or reordered."""
    return int(key[:8], 16) / 16**8
