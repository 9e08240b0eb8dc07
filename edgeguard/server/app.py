"""`edgeguard serve`: the ASGI app (Starlette): OpenAI's ``POST /v1/moderations``, edgeguard's own
``POST /v1/check``, live moderation over ``WebSocket /v1/stream``, and ``/health``, ``/ready``,
``/metrics``.

Every engine call runs on the engine's worker thread (``edgeguard.server.workers``); handlers
only parse, wait and answer. Every error is JSON in OpenAI's shape
``{"error": {"message", "type", "code"}}``; nothing a client sends reaches it as a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from edgeguard.errors import UsageError
from edgeguard.policy import BUILTIN, decide
from edgeguard.server import moderation, playground
from edgeguard.server.clients import ClientWatch
from edgeguard.server.errors import OUTCOME, HTTPError, ServerConfig, check_conversation, check_text, http_error
from edgeguard.server.proxy import ProxyConfig
from edgeguard.server.proxy.chat import Proxy
from edgeguard.server.websocket import offered_key, stream_endpoint
from edgeguard.server.workers import GenWorker, StreamWorker

log = logging.getLogger("edgeguard.server")
access_log = logging.getLogger("edgeguard.access")

ENDPOINTS = ("/v1/moderations", "/v1/check", "/v1/stream", "/v1/models", "/health", "/ready", "/metrics",
             "/v1/chat/completions")
OPEN_PATHS = ("/health", "/ready", *playground.PATHS)  # no API key: they tell nothing (the page asks for it)


class Metrics:
    """Prometheus metrics of one app (its own registry: several apps never mix)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("edgeguard_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("edgeguard_request_duration_seconds", "Request latency by endpoint",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.tokens = Counter("edgeguard_tokens_judged", "Response tokens judged by the Stream model",
                              registry=self.registry)
        self.queue = Gauge("edgeguard_queue_depth", "Conversations waiting or running, per engine",
                           ["engine"], registry=self.registry)
        self.streams = Gauge("edgeguard_streams_live", "Open WebSocket streams", registry=self.registry)
        self.cancelled = Counter("edgeguard_items_cancelled", "Conversations and stream frames dropped unjudged "
                                 "because their client left", ["engine"], registry=self.registry)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)


def default_batch(guard) -> int:
    """Gen conversations per decode when --max-batch is not given. On a CPU a Gen check is
    already compute-bound, so batches gain little (bench/batch_bench.py; docs/performance.md):
    4 at most; a GPU gains from the engine's full batch."""
    on_gpu = getattr(getattr(guard, "device", None), "device", "cpu") == "gpu"
    return guard.options.max_batch if on_gpu else min(4, guard.options.max_batch)


class State:
    """What the handlers share: the guards, their workers, the config and the metrics."""

    def __init__(self, gen, stream, config: ServerConfig):
        self.gen, self.stream, self.config = gen, stream, config
        self.metrics = Metrics()
        self.gen_worker: GenWorker | None = None
        self.stream_worker: StreamWorker | None = None
        self.ready = False
        self.live_streams = 0
        # One Stream sequence stays free for /v1/check and /v1/moderations on the Stream model.
        self.max_streams = max(1, stream.options.max_sessions - 1) if stream is not None else 0

    def start(self) -> None:
        cfg = self.config
        if self.gen is not None:
            batch = cfg.max_batch or default_batch(self.gen)
            self.gen_worker = GenWorker(self.gen, max_queue=cfg.max_queue, max_batch=batch,
                                        on_cancel=self.metrics.cancelled.labels("gen").inc)
            self.metrics.queue.labels("gen").set_function(lambda: self.gen_worker.depth)
        if self.stream is not None:
            self.stream_worker = StreamWorker(self.stream, max_queue=cfg.max_queue,
                                              on_tokens=self.metrics.tokens.inc,
                                              on_cancel=self.metrics.cancelled.labels("stream").inc)
            self.metrics.queue.labels("stream").set_function(lambda: self.stream_worker.depth)
        self.metrics.streams.set_function(lambda: self.live_streams)
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        for worker in (self.gen_worker, self.stream_worker):
            if worker is not None:
                worker.close()

    def guards(self):
        return [g for g in (self.gen, self.stream) if g is not None]

    def pick(self, model: Any):
        """The guard a request names (by model name or engine), or the default one (Gen first)."""
        if model is None:
            return self.guards()[0]
        if not isinstance(model, str):
            raise HTTPError(400, "'model' must be a string", "invalid_input")
        for guard in self.guards():
            if model in (guard.name, guard.engine):
                return guard
        names = ", ".join(g.name for g in self.guards())
        raise HTTPError(404, f"The model `{model}` does not exist (this server has: {names})", "model_not_found")

    def worker(self, guard):
        return self.gen_worker if guard is self.gen else self.stream_worker

    async def checks(self, guard, items: list[tuple]) -> list:
        # Always (prompt or messages, response or None): StreamGuard.check_many unpacks pairs.
        pairs = [(args[0], args[1] if len(args) > 1 else None) for args in items]
        return await self.worker(guard).submit("check", items=pairs)

    async def token_verdicts(self, prompt, response: str) -> list[dict]:
        """The response's per-token lines (``edgeguard stream --json``), judged as
        ``/v1/stream`` judges them; the check holds one stream slot while it runs."""
        worker = self.stream_worker
        assert worker is not None  # the caller picked the Stream guard
        if self.live_streams >= self.max_streams:
            raise HTTPError(503, f"all {self.max_streams} streams are busy; retry later", "too_many_streams",
                            "server_error")
        self.live_streams += 1
        try:
            live = await worker.submit("open", items=[prompt])
            try:
                report = await worker.submit("feed", stream=live, text=response, final=True)
            finally:
                await worker.submit("close", stream=live, bounded=False)
        finally:
            self.live_streams -= 1
        return [v.to_dict() for v in report["verdicts"]]


def _state(request) -> State:
    return request.app.state.edgeguard


# -- request bodies -------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object; 413 past ``limit`` bytes (read no further), 400 if malformed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"the request body is {declared} bytes, more than the {limit} allowed",
                        "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"the request body is more than the {limit} bytes allowed", "request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8 and bad JSON
        raise HTTPError(400, f"the request body is not valid JSON ({type(e).__name__}: {e})", "invalid_json") from e
    if not isinstance(data, dict):
        raise HTTPError(400, "the request body must be a JSON object", "invalid_json")
    return data


def conversation(data: Mapping) -> tuple:
    """``check`` arguments from ``{"prompt", "response"?}`` or ``{"messages": [...]}``."""
    if "messages" in data:
        if "prompt" in data or "response" in data:
            raise HTTPError(400, "give either 'messages' or 'prompt' (+ 'response'), not both", "invalid_input")
        messages = data["messages"]
        check_text(messages, "messages")
        return (messages,)
    if "prompt" not in data:
        raise HTTPError(400, "missing field 'prompt' (or 'messages')", "missing_field")
    prompt, response = data["prompt"], data.get("response")
    check_conversation(prompt, response)  # as check(prompt, response) in Python: the same messages
    return (prompt,) if response is None else (prompt, response)


def with_policy(verdict, name: Any) -> dict:
    """``verdict.to_dict()``, re-decided under a built-in policy a request asked for."""
    out = verdict.to_dict()
    if name is None or name == verdict.policy:
        return out
    if not isinstance(name, str) or name.lower() not in BUILTIN:
        raise HTTPError(400, f"'policy' must be one of {sorted(BUILTIN)} or the server's "
                             f"{verdict.policy!r}, got {name!r}", "invalid_input")
    policy = BUILTIN[name.lower()]
    evidence = verdict.categories if verdict.response_tokens is not None else verdict.category_scores
    out["flagged"] = bool(decide(policy, verdict.label, evidence))
    out["policy"] = policy.name
    return out


# -- endpoints ----------------------------------------------------------------------------
async def moderations(request: Request) -> Response:
    state = _state(request)
    data = await read_json(request, state.config.max_body)
    guard = state.pick(moderation.model_alias(data.get("model")))
    if "input" not in data:
        raise HTTPError(400, "missing field 'input'", "missing_field")
    texts = moderation.parse_inputs(data["input"])
    if len(texts) > state.config.max_queue:
        raise HTTPError(400, f"'input' has {len(texts)} items; this server takes at most {state.config.max_queue} "
                             "per request (--max-queue)", "too_many_inputs")
    check_text(texts, "input")
    verdicts = await state.checks(guard, [(t,) for t in texts])
    return JSONResponse(moderation.response(guard.name, verdicts))


async def check(request: Request) -> Response:
    state = _state(request)
    data = await read_json(request, state.config.max_body)
    guard = state.pick(data.get("model"))
    args = conversation(data)
    tokens = data.get("tokens", False)
    if not isinstance(tokens, bool) or (tokens and (guard is not state.stream or len(args) != 2)):
        raise HTTPError(400, "'tokens' (true or false) asks the Stream model for a 'prompt' and 'response' "
                             "pair's per-token verdicts", "invalid_input")
    verdict = (await state.checks(guard, [args]))[0]
    out = with_policy(verdict, data.get("policy"))
    if tokens:
        out["tokens"] = await state.token_verdicts(*args)
    return JSONResponse(out)


async def models(request: Request) -> Response:
    state = _state(request)
    return JSONResponse({"object": "list", "data": [
        {"id": g.name, "object": "model", "owned_by": "edgeguard", "engine": g.engine} for g in state.guards()]})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    state = _state(request)
    body = {"ready": state.ready, "models": {g.engine: g.name for g in state.guards()}}
    return JSONResponse(body, status_code=200 if state.ready else 503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _endpoint(handler):
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as e:
            return http_error(e, _state(request).config).response()

    return wrapped


async def _not_found(request: Request, exc: Exception) -> Response:
    return HTTPError(404, f"no route {request.method} {request.url.path}", "not_found").response()


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return HTTPError(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed").response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return http_error(exc, _state(request).config).response()


# -- the app ------------------------------------------------------------------------------
def create_app(gen=None, stream=None, config: ServerConfig = ServerConfig(),
               proxy: ProxyConfig | None = None) -> Starlette:
    """The ASGI app over loaded guards (either may be None, not both). The caller owns the
    guards: the app starts their workers on startup and stops them (after running what is
    queued) on shutdown, but never closes the guards. With ``proxy``, the app also guards an
    upstream LLM server's chat completions (``edgeguard.server.proxy``)."""
    if gen is None and stream is None:
        raise UsageError("the server needs a Gen model, a Stream model or both")
    state = State(gen, stream, config)
    chat_proxy = Proxy(proxy, state, read_json) if proxy is not None else None

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        if chat_proxy is not None:
            await chat_proxy.start()
        try:
            yield
        finally:
            if chat_proxy is not None:
                await chat_proxy.stop()
            await asyncio.to_thread(state.stop)

    routes = [
        *(chat_proxy.routes() if chat_proxy is not None else []),  # its /v1/models lists the upstream's
        Route("/v1/moderations", _endpoint(moderations), methods=["POST"]),
        Route("/v1/check", _endpoint(check), methods=["POST"]),
        Route("/v1/models", _endpoint(models), methods=["GET"]),
        WebSocketRoute("/v1/stream", stream_endpoint),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *playground.routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _not_allowed, 500: _server_error})
    app.state.edgeguard = state
    app.add_middleware(ClientWatch, config=config)  # inside _Guarded: it sees the 499s ClientWatch marks
    app.add_middleware(_Guarded, state=state)
    return app


class _Guarded:
    """ASGI middleware: the API key check, then one access-log line and the metrics of every
    request (a WebSocket counts once, when it ends)."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = {"code": 101 if scope["type"] == "websocket" else 500}

        async def send_status(message):
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                status["code"] = message["status"]
            elif message["type"] == "websocket.close" and status["code"] == 101 and not status.get("accepted"):
                status["code"] = 403
            elif message["type"] == "websocket.accept":
                status["accepted"] = True
            await send(message)

        try:
            if not self._authorized(scope):
                await self._refuse(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            method = scope.get("method", "WS")
            status["code"] = scope.get(OUTCOME, status["code"])  # 499: the client left; 408: an idle stream
            self.state.metrics.observe(endpoint, status["code"], ms / 1e3)
            access_log.info("%s %s %d %.1f ms", method, path, status["code"], ms)

    def _authorized(self, scope) -> bool:
        key = self.state.config.api_key
        if key is None or scope.get("path") in OPEN_PATHS:
            return True
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
        scheme, _, token = given.partition(b" ")
        # hmac.compare_digest: the time taken does not reveal how much of a guess was right.
        by_header = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())
        # Browsers cannot set headers on a WebSocket: they offer the key as a subprotocol.
        offered = offered_key(scope) if scope["type"] == "websocket" else None
        return by_header or (offered is not None and hmac.compare_digest(offered, key.encode()))

    async def _refuse(self, scope, receive, send):
        error = HTTPError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})
        if scope["type"] == "http":
            return await error.response()(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await receive()  # websocket.connect
            response = error.response()
            await send({"type": "websocket.http.response.start", "status": response.status_code,
                        "headers": response.raw_headers})
            await send({"type": "websocket.http.response.body", "body": response.body})
        else:
            await receive()
            await send({"type": "websocket.close", "code": 1008})
