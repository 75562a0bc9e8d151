"""Validation of training rows. Every rejected row keeps its line number and the reason; nothing is dropped quietly.

Rows are chat (`{"messages": [{"role", "content", optional "weight": 0|1}, ...]}`) or prompt/response
(`{"prompt", "response"}`, optional `system`); both become messages. Checks, in order: schema and roles, empty
turns, token length (reject or truncate), likely secrets and personal data (flag or drop), exact and near
duplicates, and overlap between the train and eval splits (which near-duplicate grouping makes impossible by
construction: a group is assigned to one split).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

from tandem.errors import ConfigError

ROLES = ("system", "user", "assistant")

# Patterns for data that must not be trained into a model. Each is (name, regex); cards are Luhn-checked below.
SECRET_PATTERNS = [
    ("private key", re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")),
    ("AWS access key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
    ("API key assignment",
     re.compile(r"(?i)\b(?:api[_-]?key|secret|password|token)\s*[:=]\s*['\"]?[A-Za-z0-9_\-/+]{12,}")),
    ("bearer token", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9_\-.=]{20,}")),
    ("email address", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("US social security number", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("phone number", re.compile(r"(?<![\w-])\+?\d{1,3}[ .-]?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b")),
]
CARD = re.compile(r"\b(?:\d[ -]?){13,19}\b")


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
        messages = [{"role": m["role"], "content": m["content"], **({"weight": 0} if m.get("weight") == 0 else {})}
                    for m in messages]
    elif "prompt" in obj and "response" in obj:
        if not all(isinstance(obj.get(k, ""), str) for k in ("prompt", "response", "system")):
            raise ValueError("bad schema: prompt, response and system must be strings")
        messages = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else []) + [
            {"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    else:
        raise ValueError("bad schema: expected messages, or prompt and response")
    return messages


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
    text = "\n".join(m["content"] for m in messages)
    found = [name for name, pattern in SECRET_PATTERNS if pattern.search(text)]
    if any(_luhn(re.sub(r"\D", "", m.group())) for m in CARD.finditer(text)):
        found.append("payment card number")
    return found


def redact(text: str) -> str:
    """Each likely secret or piece of personal data replaced by `[REDACTED <what>]`: the row keeps its shape and
    the model learns that such things are not repeated, without ever seeing them."""
    for name, pattern in SECRET_PATTERNS:
        text = pattern.sub(f"[REDACTED {name}]", text)
    return CARD.sub(lambda m: "[REDACTED payment card number]" if _luhn(re.sub(r"\D", "", m.group())) else m.group(),
                    text)


def _luhn(digits: str) -> bool:
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def normalized_text(messages: list[dict]) -> str:
    text = " ".join(f"{m['role']} {m['content']}" for m in messages).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


class NearDuplicates:
    """MinHash over word 3-shingles with LSH banding: finds rows whose Jaccard similarity passes a threshold without
    comparing every pair."""

    def __init__(self, threshold: float, num_perm: int = 64, bands: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**61 - 1, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 2**61 - 1, num_perm, dtype=np.uint64)
        self.threshold = threshold
        self.bands, self.rows = bands, num_perm // bands
        self.buckets: dict[tuple, list[int]] = {}
        self.shingles: list[set] = []

    @staticmethod
    def _shingles(text: str) -> set:
        words = text.split()
        return {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}

    def add(self, text: str) -> int | None:
        """Return the index of an earlier near-duplicate if there is one; else index this text (as the next index)."""
        sh = self._shingles(text)
        hashes = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") >> 3
                           for s in sh], dtype=np.uint64)
        sig = ((np.outer(hashes, self.a) + self.b) % np.uint64(2**61 - 1)).min(axis=0)
        match = None
        keys = [(band, sig[band * self.rows : (band + 1) * self.rows].tobytes()) for band in range(self.bands)]
        for key in keys:
            for j in self.buckets.get(key, []):
                other = self.shingles[j]
                if len(sh & other) / len(sh | other) >= self.threshold:
                    match = j
                    break
            if match is not None:
                return match
        idx = len(self.shingles)
        self.shingles.append(sh)
        for key in keys:
            self.buckets.setdefault(key, []).append(idx)
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
            split = obj.get("split")
            if split not in (None, "train", "eval"):
                raise ValueError(f"bad split: {split!r} (expected train or eval)")
        except json.JSONDecodeError as e:
            result.rejected.append(Rejected(n, f"bad JSON: {e.msg} at column {e.colno}"))
            continue
        except ValueError as e:
            result.rejected.append(Rejected(n, str(e)))
            continue
        tokens = count_tokens(messages)
        if tokens > max_tokens:
            shortened = truncate(messages, max_tokens) if on_too_long == "truncate" and truncate else None
            if shortened is None:
                result.rejected.append(Rejected(n, f"too long: {tokens} tokens > dataset.max_tokens={max_tokens}"))
                continue
            messages = shortened
        flags = find_secrets(messages) if pii != "off" else []
        if flags and pii == "drop":
            result.rejected.append(Rejected(n, f"likely secret or personal data: {', '.join(flags)}"))
            continue
        if flags and pii == "redact":
            messages = [{**m, "content": redact(m["content"])} for m in messages]
            flags = [f"redacted {f}" for f in flags]
        text = normalized_text(messages)
        key = hashlib.sha256(text.encode()).hexdigest()
        split = split or ("eval" if _bucket(key) < eval_fraction else "train")
        twin, kind = (exact[key], "exact") if key in exact else (near.add(text), "near")
        if twin is not None:
            first = result.rows[twin]
            prefix = "train/eval overlap" if first["split"] != split else f"{kind} duplicate"
            result.rejected.append(Rejected(n, f"{prefix}: {kind} copy of line {first['line']} ({first['split']})"))
            continue
        exact[key] = len(result.rows)
        result.rows.append({"messages": messages, "line": n, "flags": flags, "split": split})
    return result


def _bucket(key: str) -> float:
    """A stable number in [0, 1) per row content: the split never changes when rows are added or reordered."""
    return int(key[:8], 16) / 16**8
