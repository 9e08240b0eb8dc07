"""The server's configuration and its one error shape, shared by the HTTP and WebSocket endpoints:
``{"error": {"message", "type", "code"}}`` as OpenAI answers, and the text checks every
endpoint applies before a text reaches an engine."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from edgeguard.engines import inputs
from edgeguard.errors import EdgeguardError, InputTooLong, UsageError
from edgeguard.server.workers import QueueFull

log = logging.getLogger("edgeguard.server")


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes of one request body; more is 413
    max_queue: int = 64  # conversations waiting per engine; more is 503 with Retry-After
    max_batch: int | None = None  # Gen conversations per decode (default: the guard's max_batch)
    retry_after: int = 1  # seconds, in a 503's Retry-After
    request_timeout: float = 30.0  # seconds for a request's headers and body to arrive; then 408
    idle_timeout: float = 120.0  # seconds a WebSocket stream may wait for its client's next frame


CLIENT_GONE = 499  # nginx's "client closed request": in logs and metrics, never a 500
OUTCOME = "edgeguard.outcome"  # scope key: the status to log when no response tells it (499, 408)


class RequestTimeout(Exception):
    """A request's body did not arrive within ``request_timeout`` seconds (408)."""


class HTTPError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def http_error(error: BaseException, config: ServerConfig) -> HTTPError:
    """The HTTP answer for anything an engine or a handler raised."""
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, ClientDisconnect):
        return HTTPError(CLIENT_GONE, "the client closed the connection", "client_closed_request")
    if isinstance(error, RequestTimeout):
        return HTTPError(408, str(error), "request_timeout", headers={"Connection": "close"})
    if isinstance(error, QueueFull):
        return HTTPError(503, f"the server is busy ({error}); retry later", "queue_full", "server_error",
                         {"Retry-After": str(config.retry_after)})
    if isinstance(error, InputTooLong):
        return HTTPError(400, str(error), "context_length_exceeded")
    if isinstance(error, UsageError):
        return HTTPError(400, str(error), "invalid_input")
    if isinstance(error, EdgeguardError):
        return HTTPError(500, str(error), "engine_error", "server_error")
    log.error("unexpected error", exc_info=error)
    return HTTPError(500, f"internal error ({type(error).__name__})", "internal_error", "server_error")


def check_text(value: Any, what: str) -> None:
    """Texts the engines take, checked by the Python API's own rules (``edgeguard.engines.inputs``:
    the same checks, the same messages): ``messages`` is a list of ``{"role", "content"}``
    objects; anything else a string or a list of strings (``input``), or None where optional;
    every text valid Unicode (JSON's escapes can carry lone surrogates) without NUL."""
    if what == "messages":
        inputs.messages(value, what)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            inputs.text(item, f"{what}[{i}]")
    elif value is not None:
        inputs.text(value, what)


def check_conversation(prompt: Any, response: Any) -> None:
    """A ``prompt`` (+ ``response``) as ``check(prompt, response)`` takes them."""
    inputs.conversation(prompt, response)
