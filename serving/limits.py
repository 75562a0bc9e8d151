"""Limits that hold before any work is done: a body over `serve.max_body_bytes` is refused with 413 while it is
still arriving, before JSON parsing, validation or tokenization can make one request everyone's problem.

A plain ASGI middleware, so it sees the body as the server receives it: by its Content-Length when the client
sends one, else by counting the chunks as they arrive (a body under the limit is then handed on from memory). The
limit is read from the app's state, which the Router sets from config.
"""

from __future__ import annotations

from serving.openai_api import error

DEFAULT_MAX_BODY_BYTES = 1 << 20


class BodyLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(scope["app"].state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(int(declared), limit, scope, receive, send)
        # No (or a false) length: take the body in, counting, up to the limit; the app then reads it from memory.
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > limit:
                return await self._refuse(received, limit, scope, receive, send)
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(size: int, limit: int, scope, receive, send):
        response = error(413, f"the request body ({size} bytes so far) is over this server's limit of {limit} bytes "
                              "(serve.max_body_bytes)", code="request_too_large")
        await response(scope, receive, send)
