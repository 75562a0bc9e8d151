"""API keys for the app: made, listed and revoked here, stored hashed in auth.keys_file (tandem/keys.py).

    python -m jobs.keys create name=NAME scopes=[chat:assistant,feedback]   # prints the key, once
    python -m jobs.keys create name=NAME scopes=[retrieve:docs] "filter='meta[\"tenant\"] == \"acme\"'"
    python -m jobs.keys list
    python -m jobs.keys revoke id=KEY_ID

Scopes: chat:<route>, retrieve:<collection> (or chat:*, retrieve:*), feedback, admin. A filter limits every
retrieval made for the key (on /v1/retrieve and on RAG routes) to the documents it matches. A running app reads
the file again at every refresh (serve.refresh_s), so a new or revoked key takes effect without a restart. On a
cluster, create keys on a machine that holds the file and put it in a Kubernetes Secret mounted at auth.keys_file.
"""

from __future__ import annotations

import sys
import time

from tandem.commandline import Job, run
from tandem.config import require
from tandem.keys import KeyStore

JOB = Job("keys", __doc__, ("auth",), shorthands={"name": "auth.name", "scopes": "auth.scopes", "id": "auth.id",
                                                               "filter": "auth.filter"},
          commands=("create", "list", "revoke"))


def main(argv: list[str] | None = None) -> dict:
    command, cfg = JOB.command(sys.argv[1:] if argv is None else argv)
    store = KeyStore(cfg.auth.keys_file)
    if command == "create":
        key, token = store.create(require(cfg.auth.name, "auth.name"), list(cfg.auth.scopes), cfg.auth.filter)
        limit = f", documents where {key.filter}" if key.filter else ""
        print(f"key {key.id} for {key.name}, scopes {', '.join(key.scopes)}{limit}:\n{token}\n"
              f"(shown once: only its hash is kept in {store.path})")
        return {"id": key.id, "token": token, "scopes": key.scopes, "filter": key.filter}
    if command == "revoke":
        key = store.revoke(require(cfg.auth.id, "auth.id"))
        print(f"key {key.id} ({key.name}) revoked")
        return {"id": key.id, "revoked": key.revoked}
    keys = store.keys()
    for key in keys.values():
        state = f"revoked {time.strftime('%Y-%m-%d %H:%M', time.localtime(key.revoked))}" if key.revoked else "active"
        limit = f"  where {key.filter}" if key.filter else ""
        print(f"{key.id}  {key.name:<20} {state:<24} {', '.join(key.scopes)}{limit}")
    return {"keys": [{"id": k.id, "name": k.name, "scopes": k.scopes, "filter": k.filter, "revoked": k.revoked}
                     for k in keys.values()]}


if __name__ == "__main__":
    run(main)
