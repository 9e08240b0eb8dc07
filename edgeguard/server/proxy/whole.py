"""An answer judged whole: a request that does not stream, or any answer when only Gen is
loaded. The upstream request starts while the prompt is judged; the answer is judged by Stream
(or Gen's response mode) and sent whole, in one response or as one chunk. Only the judged
fields of its message reach the client (``upstream_text.whole_message``)."""

from __future__ import annotations

import asyncio
import time

from starlette.responses import JSONResponse, Response

from edgeguard.server.errors import HTTPError
from edgeguard.server.proxy import shapes, sse
from edgeguard.server.proxy.response import cancel
from edgeguard.server.proxy.upstream_text import whole_message

# The answer object's fields besides its choices that the client gets: none holds model text.
_ANSWER_KEYS = ("id", "object", "created", "model", "system_fingerprint", "service_tier", "usage")


async def judge_whole(proxy, body: dict, turns: list[dict], prefill: str, streamed: bool) -> Response:
    """``proxy``: the ``chat.Proxy`` (its guards, upstream, config and metrics)."""
    state, config = proxy.state, proxy.config
    t0 = time.perf_counter()
    upstream = asyncio.create_task(proxy.client().answer({**body, "stream": False}))
    try:
        prompt = await proxy.prompt_verdict(turns)
        proxy.metrics.prompt.observe(time.perf_counter() - t0)
        if prompt.flagged:
            await cancel(upstream)
            return proxy.refusal(body, prompt, streamed)
    except BaseException:
        await cancel(upstream)
        raise
    answer = await upstream
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict) \
            or not isinstance(choices[0].get("message"), dict):
        raise HTTPError(502, "the upstream's answer has no single choice with a message", "upstream_invalid",
                        "server_error")
    try:
        text, message = whole_message(choices[0]["message"], prefill)
    except sse.SSEError as e:
        raise HTTPError(502, str(e), "upstream_invalid", "server_error") from None
    finish = choices[0].get("finish_reason")
    choices[0] = {"index": 0, "message": message, "finish_reason": finish if isinstance(finish, str) else None,
                  "logprobs": None}
    verdict = None
    if text.strip():
        if state.stream is not None:
            verdict = (await state.checks(state.stream, [(turns, text)]))[0]
        else:
            verdict = (await state.checks(state.gen, [(turns + [{"role": "assistant", "content": text}],)]))[0]
    action = "cut" if verdict is not None and verdict.flagged else "none"
    if action == "cut":
        proxy.metrics.cuts.inc()
        choices[0]["message"] = {"role": "assistant", "content": config.refusal_text}
        choices[0]["finish_reason"] = "content_filter"
    info = shapes.info(prompt, verdict.to_dict() if verdict is not None else None, action,
                       verdict.flagged_at if verdict is not None else None)
    proxy.metrics.requests.labels(str(streamed).lower(), action).inc()
    if not streamed:
        kept = {k: answer[k] for k in _ANSWER_KEYS if k in answer}  # nothing else the model wrote
        return JSONResponse({**kept, "choices": choices, "edgeguard": info})
    head = {k: answer.get(k) for k in ("id", "created", "model", "system_fingerprint") if k in answer}
    head["object"] = "chat.completion.chunk"
    message = choices[0]["message"]
    delta = {k: v for k, v in message.items() if v is not None}
    if isinstance(delta.get("content"), list):  # a chunk's content is a string
        delta["content"] = "".join(part["text"] for part in delta["content"])
    for i, call in enumerate(delta.get("tool_calls") or ()):
        call["index"] = i
    events = [sse.event(shapes.chunk(head, delta)),
              sse.event(shapes.chunk(head, {}, choices[0].get("finish_reason") or "stop", edgeguard=info))]
    if answer.get("usage") is not None:
        events.append(sse.event({**head, "choices": [], "usage": answer["usage"]}))
    return Response(b"".join([*events, sse.done()]), media_type="text/event-stream")
