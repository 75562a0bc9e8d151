"""The Router deployment: the OpenAI-compatible HTTP ingress that puts RAG and the adapters in front of users.

A chat request is resolved to a route's variant (`routes.py`: production, a sticky canary, or a pinned version);
a RAG route retrieves passages (the Retriever deployment) and builds the numbered-context prompt the adapter was
trained on (`tandem.prompts`); the LLM deployment streams the answer with that variant's adapter. The answer goes
back with its sources, its variant and adapter version (headers and a `tandem` field), and every request is logged
before it is acknowledged, so feedback can join it by id.

Callers present API keys as OpenAI clients do (`Authorization: Bearer`, tandem/keys.py), each endpoint asks for its
scope, and the request log records the key's id; keyless mode (`auth.mode=none`) exists only on a loopback address.

No `from __future__ import annotations` here: FastAPI must see the request models, not strings, through Serve's
class-based view.
"""

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict, deque

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from serving.limits import BodyLimit
from serving.metrics import RouterMetrics
from serving.openai_api import APIError, ChatCompletionRequest, FeedbackRequest, RetrieveRequest, error
from serving.routes import RouteError, RouteTable
from tandem.abstention import Threshold
from tandem.answers import served_grounding
from tandem.canary import user_hash
from tandem.data import privacy
from tandem.keys import AuthError, Key, KeyStore, auth_mode, authenticate, authorize, user_secret
from tandem.milvus import all_of
from tandem.models import BaseModel, load_tokenizer
from tandem.prompts import answer_format, parse_rag_answer, rag_messages
from tandem.registry import Registry, base_model_name
from tandem.requestlog import JsonlLog, LogWriteError
from tandem.structured import SchemaError, response_regex

logger = logging.getLogger("ray.serve")
MAX_CHARS_PER_TOKEN = 10  # no tokenizer here spells a token in more: a cheap bound checked before tokenizing
app = FastAPI(title="Tandem", version="0.1.0",
              description="RAG for knowledge, LoRA adapters for behaviour: OpenAI-compatible chat over both.")
app.add_middleware(BodyLimit)


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None
    return error(400, f"{param}: {message}" if param else message, param=param, code=first.get("type"))


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error(exc.status, exc.message, exc.param, exc.code, exc.headers)


@app.exception_handler(LogWriteError)
async def _log_unavailable(request: Request, exc: LogWriteError) -> JSONResponse:
    """Nothing is acknowledged that could not be logged: feedback must be able to join it, and the gates see it."""
    logger.error("%s", exc)
    return error(503, f"the request log could not be written ({exc.reason}); nothing was recorded, try again",
                 code="log_unavailable", headers={"retry-after": "10"})


@app.exception_handler(AuthError)
async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
    code = "invalid_api_key" if exc.status == 401 else "insufficient_scope"
    return error(exc.status, exc.message, code=code,
                 headers={"www-authenticate": "Bearer"} if exc.status == 401 else None)


async def _chain(first: dict, events):
    yield first
    async for event in events:
        yield event


def _usage(last: dict, prompt_tokens: int) -> dict:
    prompt = last.get("prompt_tokens", prompt_tokens)
    completion = last.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Router:
    def __init__(self, cfg, base: BaseModel, retriever, llm, controller=None):
        from transformers import AutoConfig

        self.cfg = cfg
        app.state.max_body_bytes = cfg.serve.max_body_bytes
        self.retriever, self.llm = retriever, llm
        self.controller = controller
        self.base_name = base_model_name(cfg.model.path)
        self.tokenizer = load_tokenizer(base)
        self.max_context = cfg.serve.llm.max_context or AutoConfig.from_pretrained(base.path).max_position_embeddings
        self.user_secret = user_secret(cfg.auth.user_key_file)
        self.table = RouteTable(cfg.serve.routes, Registry.from_config(cfg), self.base_name, self.user_secret)
        self.key_store = KeyStore(cfg.auth.keys_file)
        self.auth = auth_mode(cfg.auth.mode, cfg.serve.host, self.key_store)
        self.keys = self.key_store.active() if self.auth == "keys" else {}
        self.refreshed, self.refreshing = time.monotonic(), None
        self.metrics = RouterMetrics()
        self.requests = JsonlLog(cfg.serve.request_log)
        self.feedback_log = JsonlLog(cfg.serve.feedback_log)
        self.recent: OrderedDict[str, dict] = OrderedDict()  # request id -> {key_id}, served here, for feedback
        self.shadows: set = set()  # shadow requests in flight (kept referenced until done)
        self.feedback_times: dict[str | None, deque] = {}  # key id -> when its recent feedback posts came

    def _maybe_refresh(self) -> None:
        """Pick up promotions and rollout steps from the registry every serve.refresh_s, off the request path:
        requests keep the table they started with, so a change never fails one."""
        if self.refreshing is None and time.monotonic() - self.refreshed >= self.cfg.serve.refresh_s:
            self.refreshing = asyncio.get_running_loop().run_in_executor(None, self._refresh)
            self.refreshing.add_done_callback(self._refreshed)

    def _refresh(self) -> None:
        self.table.refresh()
        if self.auth == "keys":  # new and revoked keys take effect here, without a restart
            self.keys = self.key_store.active()

    def _caller(self, request: Request, scope: str | None = None) -> Key | None:
        """The key this request presents, holding `scope` when one is given (AuthError: 401 or 403); None in
        keyless mode, where every caller is this machine."""
        self._maybe_refresh()  # also when keys are all this request brings: a new key works from the next refresh
        if self.auth == "none":
            return None
        key = authenticate(self.keys, request.headers.get("authorization"))
        if scope:
            authorize(key, scope)
        return key

    def _refreshed(self, future) -> None:
        self.refreshed, self.refreshing = time.monotonic(), None
        if future.exception() is not None:  # the registry was unreachable: keep serving the last table
            logger.warning("route refresh failed: %s", future.exception())

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "routes": {r.name: {"variant": r.default_variant, "adapter": r.production}
                                           for r in self.table.routes.values()}}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """Routes and the versions serving on them; every registered version for an admin key."""
        key = self._caller(request)
        data = self.table.models()
        if key is not None and not key.allows("admin"):
            data = [m for m in data if m["tandem"]["kind"] == "route"
                    or {"production", "canary"} & set(m["tandem"]["aliases"])]
        return {"object": "list", "data": data}

    @app.get("/v1/rollouts")
    async def rollouts(self, request: Request) -> dict:
        """The rollout controller's recent decisions, with the metrics behind each."""
        self._caller(request, "admin")
        data = await self.controller.recent.remote() if self.controller is not None else []
        return {"object": "list", "data": data}

    @app.post("/v1/retrieve")
    async def retrieve(self, body: RetrieveRequest, request: Request) -> dict:
        collection = body.collection or self.cfg.store.collection
        key = self._caller(request, f"retrieve:{collection}")
        hits = await self._retrieve(body.query, collection, body.k, body.mode, body.filter, key)
        return {"object": "list", "collection": collection, "mode": body.mode, "data": hits}

    async def _retrieve(self, query: str, collection: str, k: int, mode: str, filter: str,
                        key: Key | None) -> list[dict]:
        """Top-k passages within the caller's `filter`, the route's (passed in as `filter` on RAG routes) and the
        key's own: a key's filter is the documents it may see, whatever the request asks."""
        if k > self.cfg.serve.retriever.max_k:
            raise APIError(400, f"k={k} is above this server's limit of {self.cfg.serve.retriever.max_k}", "k")
        try:
            filter = all_of(key.filter if key else "", filter)
        except ValueError as e:
            raise APIError(400, str(e), "filter") from None
        try:
            return await self.retriever.remote({"query": query, "collection": collection, "k": k, "mode": mode,
                                                "filter": filter})
        except BackPressureError as e:
            raise self._busy("retriever", e) from None
        except ValueError as e:  # unknown collection, bad filter, mode without BM25: the caller's to fix
            cause = getattr(e, "cause", None) or e  # the replica's own exception inside Ray's wrapper
            raise APIError(400, " ".join(str(cause).split()) or "invalid retrieval request") from None

    def _busy(self, what: str, e: BackPressureError) -> APIError:
        """A full queue (serve.*.max_queued_requests): 429 and when to come back, not a wait without end."""
        logger.warning("%s queue full: %s", what, e)
        return APIError(429, f"the server is at capacity (the {what} queue is full); retry after "
                             f"{self.cfg.serve.retry_after_s:g} s", code="server_busy",
                        headers={"retry-after": str(max(1, round(self.cfg.serve.retry_after_s)))})

    @app.post("/v1/feedback")
    async def feedback(self, body: FeedbackRequest, request: Request) -> dict:
        """Feedback on a request this same key made: nobody rates or corrects someone else's answers."""
        key = self._caller(request, "feedback")
        self._limit_feedback(key.id if key else None)
        served = await asyncio.to_thread(self._served_to, body.request_id)
        if served is None:
            raise APIError(404, f"no request {body.request_id!r} was served here", "request_id", "unknown_request")
        caller = key.id if key else None
        if served.get("key_id") != caller:
            raise AuthError(403, f"request {body.request_id} was made with another key; feedback comes only from the "
                                 "key that made the request")
        self.feedback_log.append({**body.model_dump(), "key_id": caller})
        self.metrics.feedback.inc(1, {"rating": str(body.rating)})
        return {"object": "feedback", "request_id": body.request_id, "recorded": True}

    def _limit_feedback(self, key_id: str | None) -> None:
        """At most serve.feedback_per_minute feedback posts per key and minute, per replica: 429 beyond."""
        now, window = time.monotonic(), self.feedback_times.setdefault(key_id, deque())
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= self.cfg.serve.feedback_per_minute:
            raise APIError(429, f"more than {self.cfg.serve.feedback_per_minute} feedback posts a minute from this "
                                "key; wait and send again", code="rate_limit_exceeded",
                           headers={"retry-after": str(int(61 - (now - window[0])))})
        window.append(now)

    def _served_to(self, request_id: str) -> dict | None:
        """{key_id} of a request served here, or None when there was no such request."""
        if request_id in self.recent:
            return self.recent[request_id]
        # served by another replica or before a restart: only the partitions of the day in its id and the next (a
        # request logged after midnight), off the event loop
        started = int(request_id.removeprefix("chatcmpl-")[:8], 16)
        days = sorted({time.strftime("%Y-%m-%d", time.gmtime(started + d)) for d in (0, 86400)})
        needle = f'"request_id": "{request_id}"'
        for file in (f for day in days for f in sorted(self.requests.root.glob(f"date={day}/*.jsonl"))):
            with file.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    if needle in line:
                        try:
                            return {"key_id": json.loads(line).get("key_id")}
                        except ValueError:  # a torn record: look on
                            continue
        return None

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatCompletionRequest, request: Request):
        started = time.perf_counter()
        key = self._caller(request)
        try:
            choice = self.table.choose(body.model, body.user, key.id if key else None)
        except RouteError as e:
            raise APIError(e.status, e.message, "model", "model_not_found" if e.status == 404 else None) from None
        authorize(key, f"chat:{choice.route.name}")
        if choice.variant == "pinned" and choice.adapter not in (choice.route.production, choice.route.canary):
            authorize(key, "admin")  # a candidate or rolled-back version is not for users yet
        if body.ignore_eos:
            authorize(key, "admin")
        try:
            regex = response_regex(body.response_format.model_dump() if body.response_format else None)
        except SchemaError as e:
            raise APIError(400, str(e), "response_format", "invalid_response_format") from None
        route = choice.route
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        chars, most = sum(len(m["content"]) for m in messages), self.max_context * MAX_CHARS_PER_TOKEN
        if chars > most:  # cannot fit, whatever the tokens: refused before retrieval or tokenization spend on it
            raise APIError(400, f"This model's maximum context length is {self.max_context} tokens; the messages "
                                f"hold {chars} characters, more than any {self.max_context} tokens spell ({most})",
                           "messages", "context_length_exceeded")
        sources = []
        if route.cfg.rag:
            question = messages[-1]["content"]
            hits = await self._retrieve(question, self._collection(route), route.cfg.k, route.cfg.mode,
                                        route.cfg.filter, key)
            sources = [{"index": i, **h} for i, h in enumerate(hits, start=1)]
            system, user = rag_messages(question, [h["text"] for h in hits])
            messages = [system, *[m for m in messages[:-1] if m["role"] != "system"], user]
        if route.cfg.guided and regex is None:
            regex = response_regex(answer_format(len(sources)))
        prompt, prompt_tokens = await asyncio.to_thread(self._prompt, messages)  # off the event loop
        # redaction costs about a second per MB of text: off the loop too
        logged = (await asyncio.to_thread(privacy.redact_messages, messages) if self.cfg.serve.request_log_redact
                  else messages)
        limits = self.cfg.serve.llm
        max_tokens = body.completion_limit() or limits.default_max_tokens
        if max_tokens > limits.max_new_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {limits.max_new_tokens}",
                           "max_tokens", "invalid_value")
        if prompt_tokens + max_tokens > self.max_context:
            raise APIError(400, f"This model's maximum context length is {self.max_context} tokens; the prompt has "
                                f"{prompt_tokens} (with retrieved context) and max_tokens asks for {max_tokens}",
                           "messages", "context_length_exceeded")
        # the id carries its time (8 hex digits of the epoch second), so feedback finds its log partition directly
        request_id = f"chatcmpl-{int(time.time()):08x}{uuid.uuid4().hex[:24]}"
        rule = self._rule(route, choice.adapter)
        payload = {"prompt": prompt, "adapter": choice.adapter, "max_tokens": max_tokens,
                   "temperature": body.temperature or 0.0, "top_p": body.top_p or 1.0, "stop": body.stop or [],
                   "ignore_eos": body.ignore_eos, "regex": regex,
                   "abstain_threshold": self._threshold(rule, route, sources)}
        events = self._generate(payload)
        record = {"request_id": request_id, "model": body.model, "route": route.name, "variant": choice.variant,
                  "adapter": choice.adapter, "key_id": key.id if key else None,
                  "user_hash": user_hash(body.user, self.user_secret), "messages": logged, "rag": route.cfg.rag,
                  "retrieved": [s["id"] for s in sources], "stream": body.stream, "max_tokens": max_tokens}
        meta = {"request_id": request_id, "route": route.name, "variant": choice.variant, "adapter": choice.adapter}
        headers = {"x-tandem-request-id": request_id, "x-tandem-route": route.name, "x-tandem-variant": choice.variant,
                   "x-tandem-adapter": choice.adapter or "base"}
        if route.shadow and route.canary and choice.variant == route.default_variant:
            shadow = {**record, "variant": "shadow", "adapter": route.canary,
                      "request_id": f"shadow-{request_id.removeprefix('chatcmpl-')}", "shadow_of": request_id}
            canary_rule = self._rule(route, route.canary)
            self.shadows.add(asyncio.create_task(self._shadow(
                {**payload, "adapter": route.canary, "abstain_threshold": self._threshold(canary_rule, route, sources)},
                shadow, sources, canary_rule)))
        try:  # the first event before any answer is sent: a full queue or an unloadable adapter is a status code
            first = await events.__anext__()
            if "error" in first and first.get("status") != 400:
                raise APIError(503, first["error"], code="adapter_unavailable")
        except BackPressureError as e:  # nothing was served: not logged as an answer, and not the canary's fault
            raise self._busy("LLM", e) from None
        except BaseException as e:
            raise self._failed(e, events, record, started, "", {}, sources) from None
        if "error" in first:  # the caller's request could not be served as asked: not an answer, not logged
            raise APIError(400, first["error"], "response_format", "invalid_response_format")
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        if body.stream and (rule is None or rule.min_grounded is None):
            return StreamingResponse(self._sse(first, events, body.model, sources, meta, record, started,
                                               include_usage), media_type="text/event-stream", headers=headers)
        text, last = first["text"], first
        try:
            async for event in events:
                if "error" in event:
                    raise APIError(503, event["error"], code="adapter_unavailable")
                text, last = text + event["text"], event
        except BaseException as e:
            raise self._failed(e, events, record, started, text, last, sources) from None
        text = self._served(rule, text, sources, record)
        if body.stream:  # held back for the grounding check: streamed in one piece
            return StreamingResponse(self._sse({**last, "text": text}, events, body.model, sources, meta, record,
                                               started, include_usage), media_type="text/event-stream",
                                     headers=headers)
        format_valid = self._log(record, started, text, last, sources)
        completion = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                   "finish_reason": last.get("finish_reason") or "stop"}],
                      "usage": _usage(last, prompt_tokens), "sources": sources,
                      "tandem": {**meta, "format_valid": format_valid}}
        return JSONResponse(completion, headers=headers)

    def _failed(self, e: BaseException, events, record: dict, started: float, text: str, last: dict,
                sources: list[dict]) -> BaseException:
        """Log an answer that did not complete, and what to raise: the client left (Serve cancels the handler), so
        generation is cancelled too; else the server's fault, 503, an error for the rollout gates."""
        if isinstance(e, asyncio.CancelledError):
            events.cancel()  # the LLM replica stops generating this row
            self._log(record, started, text, last, sources, status="disconnected")
            return e
        if not isinstance(e, APIError):  # the details (a Ray traceback, pids, addresses) stay in the server log
            logger.exception("request %s: generation failed", record["request_id"])
        self._log(record, started, text, last, sources, status="error", error=f"{type(e).__name__}: {e}"[:2000])
        return e if isinstance(e, APIError) else APIError(
            503, f"generation failed; the server log has the details under {record['request_id']}",
            code="llm_unavailable")

    def _rule(self, route, adapter: str | None) -> Threshold | None:
        """The adapter version's abstention rule calibrated on the route's collection, on a RAG route (where its
        prompt asks for abstention)."""
        return self.table.thresholds.get(adapter, {}).get(self._collection(route)) if route.cfg.rag else None

    @staticmethod
    def _threshold(rule: Threshold | None, route, sources: list[dict]) -> float | None:
        """The rule's threshold at the top passage's score."""
        return rule.at(sources[0]["score"] if sources else None, route.cfg.mode) if rule else None

    @staticmethod
    def _served(rule: Threshold | None, text: str, sources: list[dict], record: dict) -> str:
        """The reply as served: the abstention reply where the rule withholds the answer (its cited passages hold
        too little of it); the log keeps what was withheld."""
        served = rule.reply(text, [s["text"] for s in sources]) if rule else text
        if served != text:
            record["withheld"] = text
        return served

    def _collection(self, route) -> str:
        return route.cfg.collection or self.cfg.store.collection

    def _prompt(self, messages: list[dict]) -> tuple[str, int]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt, len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def _generate(self, payload: dict):
        """The LLM's event stream for `payload`. The adapter rides as Serve's multiplexed model id, so Serve sends
        it to a replica that has that adapter loaded where one does (both engines batch across adapters, so this
        splits no batch); any replica can still serve any adapter, loading it on demand."""
        return self.llm.options(stream=True, multiplexed_model_id=payload["adapter"] or "").remote(payload)

    async def _shadow(self, payload: dict, record: dict, sources: list[dict], rule: Threshold | None) -> None:
        """The canary answers a copy of the request; the answer is logged as it would be served, never returned."""
        started, text, last, status, message = time.perf_counter(), "", {}, "ok", None
        try:
            async for event in self._generate(payload):
                if "error" in event:
                    status, message = "error", event["error"]
                    break
                text += event["text"]
                last = event if event.get("finish_reason") else last
        except Exception as e:  # a failing shadow must not touch the user's request
            status, message = "error", str(e)
        if status == "ok":
            text = self._served(rule, text, sources, record)
        try:
            self._log(record, started, text, last, sources, status=status, error=message)
        except LogWriteError as e:  # nobody waits for a shadow answer: the operator's log says it was lost
            logger.error("shadow answer not logged: %s", e)
        self.shadows.discard(asyncio.current_task())

    async def _sse(self, first: dict, events, model: str, sources: list, meta: dict, record: dict, started: float,
                   include_usage: bool):
        chunk = {"id": meta["request_id"], "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": model}

        def sse(choices: list, **extra) -> str:
            return f"data: {json.dumps({**chunk, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

        text, last, status, message = "", {}, "disconnected", None
        try:
            yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                      sources=sources, tandem=meta)
            async for event in _chain(first, events):
                if "error" in event:
                    status, message = "error", event["error"]
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                    return
                text, last = text + event["text"], event
                if event["text"]:
                    yield sse([{"index": 0, "delta": {"content": event["text"]}, "finish_reason": None}])
            yield sse([{"index": 0, "delta": {}, "finish_reason": last.get("finish_reason") or "stop"}])
            if include_usage:
                yield sse([], usage=_usage(last, 0))
            yield "data: [DONE]\n\n"
            status = "ok"
        except Exception as e:  # the engine failed mid-stream: an error for the rollout gates, not a disconnect
            logger.exception("request %s: generation failed mid-stream", meta["request_id"])
            status, message = "error", f"{type(e).__name__}: {e}"[:2000]
            yield f"data: {json.dumps({'error': {'message': 'generation failed', 'type': 'server_error'}})}\n\n"
        finally:  # also when the client goes away mid-stream: what was generated is still logged
            if status == "disconnected":
                events.cancel()  # the LLM replica stops generating this row
            try:
                self._log(record, started, text, last, sources, status=status, error=message)
            except LogWriteError as e:  # the stream has been sent: the operator's log is all that can say so
                logger.error("streamed answer not logged: %s", e)

    def _log(self, record: dict, started: float, text: str, last: dict, sources: list[dict], status: str = "ok",
             error: str | None = None) -> bool | None:
        """Log one answer with what the rollout gates read: status, latency, format and, for a RAG answer, how much
        of it the passages it cites support."""
        format_valid = parse_rag_answer(text) is not None if record["rag"] else None
        grounded = served_grounding(text, [s["text"] for s in sources]) if record["rag"] else None
        record = {**record, "response": text, "finish_reason": last.get("finish_reason"), "status": status,
                  "error": error, "format_valid": format_valid, "grounded": grounded,
                  "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                  "adapter_load_ms": last.get("adapter_load_ms"),
                  "prompt_tokens": last.get("prompt_tokens"), "completion_tokens": last.get("completion_tokens")}
        if self.cfg.serve.request_log_redact:  # after the gates' measures, which need the words as served
            record["response"] = privacy.redact(text)  # short (max_new_tokens); the prompt was redacted off the loop
        self.requests.append(record)
        self.metrics.observe(record)
        self.recent[record["request_id"]] = {"key_id": record.get("key_id")}
        while len(self.recent) > 100_000:
            self.recent.popitem(last=False)
        return format_valid

