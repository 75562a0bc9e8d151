"""Likely secrets and personal data in text that must not be trained into a model: found and redacted.

Secrets come from Yelp's detect-secrets: its regex detectors (cloud and SaaS keys, private keys, JWTs, ...) and its
keyword detector with configuration-style rules (`password: ...`, `api_key = "..."`). Its entropy detectors are
left out: in prose they flag ordinary words. Its network verification is never called (we use `analyze_string`,
not `analyze_line`). Personal data (email, phone, US SSN, Luhn-checked payment cards) and Tandem's own API keys,
which detect-secrets does not know, are matched by the patterns below.
"""

from __future__ import annotations

import re
from functools import cache

from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.keyword import CONFIG_DENYLIST_REGEX_TO_GROUP, KeywordDetector

NOT_SECRETS = {"Base64 High Entropy String", "Hex High Entropy String", "Public IP (ipv4)"}

PATTERNS = [
    ("Tandem API key", re.compile(r"\btdk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}")),
    ("bearer token", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9_\-.=]{20,}")),
    ("email address", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("US social security number", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("phone number", re.compile(r"(?<![\w-])\+?\d{1,3}[ .-]?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b")),
]
CARD = re.compile(r"\b(?:\d[ -]?){13,19}\b")


@cache
def _detectors() -> tuple[list[RegexBasedDetector], KeywordDetector]:
    plugins = [cls() for name, cls in sorted(get_mapping_from_secret_type_to_class().items())
               if name not in NOT_SECRETS and issubclass(cls, RegexBasedDetector)]
    return plugins, KeywordDetector()


def _keyword_values(text: str) -> set[str]:
    _, keyword = _detectors()
    return set(keyword.analyze_string(text, denylist_regex_to_group=CONFIG_DENYLIST_REGEX_TO_GROUP))


def find(text: str) -> list[str]:
    """What kinds of secret or personal data the text seems to hold, in a stable order."""
    regexes, _ = _detectors()
    found = {p.secret_type for p in regexes if any(r.search(text) for r in p.denylist)}
    found |= {"Secret Keyword"} if _keyword_values(text) else set()
    found |= {name for name, pattern in PATTERNS if pattern.search(text)}
    if any(_luhn(m.group()) for m in CARD.finditer(text)):
        found.add("payment card number")
    return sorted(found)


def redact(text: str) -> str:
    """Each likely secret or piece of personal data replaced by `[REDACTED <what>]`: the row keeps its shape and
    the model learns that such things are not repeated, without ever seeing them."""
    for value in sorted(_keyword_values(text), key=len, reverse=True):  # the keyword detector gives values only
        text = text.replace(value, "[REDACTED Secret Keyword]")
    regexes, _ = _detectors()
    for plugin in regexes:
        for regex in plugin.denylist:
            text = regex.sub(f"[REDACTED {plugin.secret_type}]", text)
    for name, pattern in PATTERNS:
        text = pattern.sub(f"[REDACTED {name}]", text)
    return CARD.sub(lambda m: "[REDACTED payment card number]" if _luhn(m.group()) else m.group(), text)


def redact_messages(messages: list[dict]) -> list[dict]:
    return [{**m, "content": redact(m["content"])} for m in messages]


def _luhn(number: str) -> bool:
    digits = re.sub(r"\D", "", number)
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0
