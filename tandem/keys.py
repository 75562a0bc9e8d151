"""API keys as OpenAI clients already send them (`Authorization: Bearer ...`), stored hashed, each with scopes.

A key reads `tdk_<id>_<secret>`. The id names the key's record and is what logs and dataset manifests carry; the
secret is 32 random bytes of which only the sha256 is stored (a high-entropy token needs no slow hash), so the keys
file, or the Kubernetes Secret it is mounted from, holds nothing a caller could present. Scopes:

- `chat:<route>`: chat completions on a route, with its production and canary versions;
- `retrieve:<collection>`: /v1/retrieve on a collection;
- `feedback`: /v1/feedback, for requests this same key made;
- `admin`: everything, plus rollout state, every version in /v1/models, pinning a version that is neither production
  nor canary (a candidate, a rolled-back one), and `ignore_eos`.

`chat:*` and `retrieve:*` cover every route or collection. A key may also carry a filter, a Milvus expression
that every retrieval made for it must satisfy: the documents it may see (a tenant's, a topic's).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tandem.errors import ConfigError, TandemError
from tandem.milvus import all_of

PREFIX = "tdk"
SCOPE = re.compile(r"^(admin|feedback|(chat|retrieve):([\w.-]+|\*))$")


class AuthError(TandemError):
    """A request without a usable key (401) or without the scope it needs (403)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Key:
    id: str
    name: str  # who or what it was made for
    sha256: str  # of the secret; the secret itself is shown once, at creation
    scopes: list[str]
    created: float = field(default_factory=time.time)
    revoked: float | None = None
    # the documents this key may retrieve: a Milvus expression every retrieval made for it must also satisfy (on
    # /v1/retrieve and on RAG routes), ANDed with the route's and the caller's filters; "" allows every document
    filter: str = ""

    def allows(self, scope: str) -> bool:
        kind, _, _ = scope.partition(":")
        return "admin" in self.scopes or scope in self.scopes or f"{kind}:*" in self.scopes


def check_scopes(scopes: list[str]) -> list[str]:
    bad = [s for s in scopes if not SCOPE.match(str(s))]
    if bad or not scopes:
        raise ConfigError(f"bad scopes {bad or scopes}: expected chat:<route>, retrieve:<collection> (or :*), "
                          f"feedback, admin")
    return [str(s) for s in scopes]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """The keys file: JSON, written whole and atomically (0600), read again by servers at every refresh."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def keys(self) -> dict[str, Key]:
        if not self.path.is_file():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {k["id"]: Key(**k) for k in raw["keys"]}
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.path} is not a keys file written by `tandem keys`: {e}") from None

    def active(self) -> dict[str, Key]:
        return {i: k for i, k in self.keys().items() if k.revoked is None}

    def _write(self, keys: dict[str, Key]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(k) for k in keys.values()]}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def create(self, name: str, scopes: list[str], filter: str = "") -> tuple[Key, str]:
        """A new key and its token; the token is never stored and cannot be shown again."""
        keys = self.keys()
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        try:
            filter = all_of(filter or "")
        except ValueError as e:
            raise ConfigError(f"auth.filter: {e}") from None
        key = Key(key_id, name, _digest(secret), check_scopes(list(scopes)), filter=filter)
        self._write({**keys, key_id: key})
        return key, f"{PREFIX}_{key_id}_{secret}"

    def revoke(self, key_id: str) -> Key:
        keys = self.keys()
        if key_id not in keys:
            raise ConfigError(f"no key {key_id!r} in {self.path}; `tandem keys list` shows them")
        keys[key_id].revoked = keys[key_id].revoked or time.time()
        self._write(keys)
        return keys[key_id]


def authenticate(keys: dict[str, Key], authorization: str | None) -> Key:
    """The active key an `Authorization: Bearer tdk_<id>_<secret>` header presents; AuthError(401) otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "You didn't provide an API key: send `Authorization: Bearer <key>` (the openai client's "
                             "api_key); `tandem keys create` makes one")
    prefix, _, rest = token.strip().partition("_")
    key_id, _, secret = rest.partition("_")
    key = keys.get(key_id) if prefix == PREFIX else None
    # compare even for an unknown id, so timing does not tell which ids exist
    matches = hmac.compare_digest(_digest(secret), key.sha256 if key else _digest(""))
    if key is None or not matches or not secret:
        raise AuthError(401, "Incorrect API key provided")
    return key


def authorize(key: Key | None, scope: str) -> None:
    """AuthError(403) unless the key holds `scope`; None (keyless mode, loopback only) holds every scope."""
    if key is not None and not key.allows(scope):
        raise AuthError(403, f"key {key.id} ({key.name}) lacks the scope {scope!r}; it has {', '.join(key.scopes)}")


def user_secret(path: str | Path) -> bytes:
    """The key that pseudonymizes `user` in logs: $TANDEM_USER_HMAC_KEY, else the file at `path` (made once, 0600;
    on a cluster a shared path or a mounted Secret, so every router replica keys users alike)."""
    if value := os.environ.get("TANDEM_USER_HMAC_KEY"):
        return value.encode()
    path = Path(path).expanduser()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another replica made it first
            return path.read_bytes().strip()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_bytes().strip()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_mode(mode: str | None, host: str, store: KeyStore) -> str:
    """`keys` or `none`, checked before the app starts. Keyless serving is for this machine only: anywhere else,
    whoever reaches the port could rate, correct and so steer the feedback -> train -> canary loop."""
    mode = mode or ("none" if is_loopback(host) else "keys")
    if mode not in ("keys", "none"):
        raise ConfigError(f"auth.mode={mode}; expected keys or none")
    if mode == "none" and not is_loopback(host):
        raise ConfigError(f"serve.host={host} without API keys (auth.mode=none): anyone who reaches the port could "
                          "steer the feedback loop. Create keys with `tandem keys create name=NAME scopes=[...]` and "
                          "set auth.mode=keys, or bind serve.host=127.0.0.1")
    if mode == "keys" and not store.active():
        raise ConfigError(f"auth.mode=keys, but {store.path} holds no active key: "
                          "`tandem keys create name=NAME scopes=[chat:*,feedback]` makes one")
    return mode
