"""Which variant of a route a user gets: a deterministic hash of the user, so a user stays on one variant.

The bucket is uniform in [0, 1); users below the canary weight get the canary. Raising the weight only moves users
from production to canary (never back), which is what a progressive rollout needs.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

PRODUCTION, CANARY = "production", "canary"
BASE = "base"  # the base model alone: what a route serves before its adapter has a production version


def bucket(route: str, user: str) -> float:
    digest = hashlib.sha256(f"{route}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(route: str, user: str | None, weight: float) -> str:
    """`canary` or `production`; a request without a user is placed at random."""
    if weight <= 0:
        return PRODUCTION
    return CANARY if bucket(route, user or uuid.uuid4().hex) < weight else PRODUCTION


def user_hash(user: str | None, secret: bytes) -> str | None:
    """What the request log keeps of a user: enough to group and join, not the identifier itself. Keyed (HMAC), so
    whoever reads the log cannot test guesses of user ids against it without the secret."""
    return hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()[:16] if user else None
