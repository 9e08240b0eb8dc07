"""The OpenAI objects the client gets: chunks, the ``edgeguard`` object, refusals, error bodies."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
from starlette.responses import JSONResponse, Response

from edgeguard.server.errors import HTTPError, http_error
from edgeguard.server.proxy import sse
from edgeguard.server.proxy.upstream import unreachable


def chunk(head: dict, delta: dict, finish: str | None = None, **extra) -> dict:
    """A ``chat.completion.chunk`` with one choice (``head``: id, object, created, model)."""
    return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}


def info(prompt, answer: dict | None, action: str, flagged_at: int | None = None, retries: int = 0) -> dict:
    """The ``edgeguard`` object of a response's last chunk."""
    return {"prompt": prompt.to_dict(), "answer": answer, "flagged_at": flagged_at, "action": action,
            "care_retries": retries}


def refusal(body: dict, prompt, text: str, streamed: bool, action: str = "block") -> Response:
    """A normal completion whose content is ``text``, finished by ``content_filter`` (chunks
    when the request streams)."""
    edgeguard = info(prompt, None, action)
    cid, model, created = f"chatcmpl-{uuid.uuid4().hex}", body.get("model") or "", int(time.time())
    if not streamed:
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "content_filter", "logprobs": None}],
                             "edgeguard": edgeguard})
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    events = [sse.event(chunk(head, {"role": "assistant", "content": text})),
              sse.event(chunk(head, {}, "content_filter", edgeguard=edgeguard)), sse.done()]
    return Response(b"".join(events), media_type="text/event-stream")


def error_body(error: BaseException, base: str, config) -> dict:
    """The ``error`` object of a mid-stream error chunk (``config``: the server's)."""
    if isinstance(error, httpx.HTTPError):
        error = unreachable(error, base)
    elif isinstance(error, sse.SSEError):
        error = HTTPError(502, str(error), "upstream_invalid", "server_error")
    e = http_error(error, config)
    return {"message": e.message, "type": e.kind, "code": e.code}


def tool_call_delta(tool: dict[str, Any], arguments: str) -> dict[str, Any]:
    """A streamed tool call's delta: its head (id, type, name) the first time, then arguments."""
    call: dict[str, Any] = {"index": tool.get("index", 0), "function": {"arguments": arguments}}
    if not tool.get("announced"):
        call.update(id=tool.get("id"), type=tool.get("type"))
        call["function"]["name"] = tool.get("name")
        tool["announced"] = True
    return call
