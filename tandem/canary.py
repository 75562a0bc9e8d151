"""Which variant of a route a user gets: a keyed hash of the caller (API key id and `user`), so a user stays on one
variant, and nobody can work out offline which `user` values land on the canary (the hash needs the server's secret).

The bucket is uniform in [0, 1); users below the canary weight get the canary. Raising the weight only moves users
from production to canary (never back), which is what a progressive rollout needs. That one key cannot make a
canary look healthy with many chosen `user` values is the rollout gate's part (`rollout.min_callers`).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

PRODUCTION, CANARY = "production", "canary"
BASE = "base"  # the base model alone: what a route serves before its adapter has a production version


def bucket(route: str, caller: str, secret: bytes) -> float:
    digest = hmac.new(secret, f"{route}\x00{caller}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(route: str, user: str | None, weight: float, secret: bytes, key_id: str | None = None) -> str:
    """`canary` or `production`; a request without a user is placed at random. The same `user` under two keys is
    two callers."""
    if weight <= 0:
        return PRODUCTION
    caller = f"{key_id or ''}\x00{user}" if user else uuid.uuid4().hex
    return CANARY if bucket(route, caller, secret) < weight else PRODUCTION


def user_hash(user: str | None, secret: bytes) -> str | None:
    """What the request log keeps of a user: enough to group and join, not the identifier itself. Keyed (HMAC), so
    whoever reads the log cannot test guesses of user ids against it without the secret."""
    return hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()[:16] if user else None
