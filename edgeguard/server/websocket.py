"""``WebSocket /v1/stream``: live moderation of a response as an LLM generates it.

Protocol (JSON text frames). The client opens with ``{"prompt": text}`` or ``{"messages":
[...]}``; the server answers ``{"event": "prompt", ...}`` (the prompt's verdict, the ``check
--json`` object). Then the client sends any number of ``{"text": chunk}`` or ``{"tokens":
[ids]}`` frames (one kind per stream), ``{"rollback": n}`` and finally ``{"finish": true}``
(which may carry a last ``text`` or ``tokens``). The server answers each judged token with one
``edgeguard stream --json`` line, sends ``{"event": "flagged", ...}`` the moment the debounced
verdict flags under the policy, ``{"event": "rollback", ...}`` after a rollback, and after
``finish`` the ``{"event": "verdict", ...}`` line of ``edgeguard stream --json``, then closes.
A bad frame gets ``{"event": "error", "error": {...}}`` and changes nothing; the stream goes on.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from edgeguard.server.errors import HTTPError, check_text, http_error
from edgeguard.server.workers import LiveStream, QueueFull

PIPELINE = 64  # frames one stream may have waiting for the engine before reading pauses
CLOSE_NORMAL, CLOSE_UNSUPPORTED, CLOSE_POLICY, CLOSE_TRY_LATER = 1000, 1003, 1008, 1013


def _error_event(error: BaseException, config) -> dict:
    e = http_error(error, config)
    return {"event": "error", "error": {"message": e.message, "type": e.kind, "code": e.code},
            "status": e.status}


def _frame(raw: str) -> dict:
    try:
        frame = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise HTTPError(400, f"the frame is not valid JSON ({type(e).__name__}: {e})", "invalid_json") from e
    if not isinstance(frame, dict):
        raise HTTPError(400, "a frame must be a JSON object", "invalid_json")
    return frame


def _job(frame: dict) -> dict[str, Any]:
    """The worker job a client frame asks for."""
    if "rollback" in frame:
        n = frame["rollback"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise HTTPError(400, "'rollback' must be a non-negative integer", "invalid_input")
        return {"kind": "rollback", "n": n}
    text, tokens, final = frame.get("text"), frame.get("tokens"), frame.get("finish", False)
    if text is not None and tokens is not None:
        raise HTTPError(400, "a frame carries 'text' or 'tokens', not both", "invalid_input")
    if text is not None and not isinstance(text, str):
        raise HTTPError(400, "'text' must be a string", "invalid_input")
    if tokens is not None and not isinstance(tokens, list):
        raise HTTPError(400, "'tokens' must be a list of token ids", "invalid_input")
    check_text(text, "text")
    if not isinstance(final, bool):
        raise HTTPError(400, "'finish' must be true or false", "invalid_input")
    if text is None and tokens is None and not final:
        raise HTTPError(400, "expected a frame with 'text', 'tokens', 'rollback' or 'finish'", "invalid_input")
    return {"kind": "feed", "text": text, "ids": tokens, "final": final}


async def _open(ws: WebSocket, state) -> LiveStream | None:
    """Read the opening frame and open the session; None when the stream cannot start."""
    config = state.config
    if state.stream_worker is None:
        await ws.send_json(_error_event(HTTPError(404, "this server has no Stream model", "model_not_found"),
                                        config))
        await ws.close(CLOSE_POLICY)
        return None
    try:
        first = _frame(await ws.receive_text())
        if "messages" in first:
            prompt = first["messages"]
            if not isinstance(prompt, list):
                raise HTTPError(400, "'messages' must be a list of {\"role\", \"content\"} objects", "invalid_input")
            check_text(prompt, "messages")
        elif isinstance(first.get("prompt"), str):
            prompt = first["prompt"]
            check_text(prompt, "prompt")
        else:
            raise HTTPError(400, "the first frame must be {\"prompt\": text} or {\"messages\": [...]}",
                            "missing_field")
        if state.live_streams >= state.max_streams:
            raise HTTPError(503, f"all {state.max_streams} streams are busy; retry later", "too_many_streams",
                            "server_error")
        state.live_streams += 1
        try:
            return await state.stream_worker.submit("open", items=[prompt], bounded=False)
        except BaseException:
            state.live_streams -= 1
            raise
    except WebSocketDisconnect:
        return None
    except Exception as e:
        event = _error_event(e, config)
        await ws.send_json(event)
        await ws.close(CLOSE_TRY_LATER if event["status"] == 503 else CLOSE_POLICY)
        return None


async def stream_endpoint(ws: WebSocket) -> None:
    state = ws.app.state.edgeguard
    await ws.accept()
    stream = await _open(ws, state)
    if stream is None:
        return
    worker = state.stream_worker
    try:
        await ws.send_json({"event": "prompt", **stream.session.prompt_verdict.to_dict()})
        pending: asyncio.Queue = asyncio.Queue(PIPELINE)
        reader = asyncio.create_task(_read(ws, worker, stream, pending))
        try:
            await _write(ws, state, pending)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            while not pending.empty():  # let queued feeds land before the session closes
                future = pending.get_nowait()[1]
                if future is not None:
                    await asyncio.gather(future, return_exceptions=True)
    except (WebSocketDisconnect, OSError, RuntimeError):
        pass  # the client went away mid-answer: nothing left to tell it
    finally:
        state.live_streams -= 1
        try:
            await worker.submit("close", stream=stream, bounded=False)
        except QueueFull:
            pass  # shutting down: closing the guard frees the session


async def _read(ws: WebSocket, worker, stream: LiveStream, pending: asyncio.Queue) -> None:
    """Turn client frames into worker jobs, in order, without waiting for their results."""
    try:
        while True:
            raw = await ws.receive_text()
            try:
                job = _job(_frame(raw))
            except HTTPError as e:
                await pending.put(("error", None, e))
                continue
            future = worker.submit(stream=stream, bounded=False, **job)
            await pending.put((job["kind"], future, job))
            if job.get("final"):
                return
    except (WebSocketDisconnect, RuntimeError, KeyError):
        await pending.put(("gone", None, None))


async def _write(ws: WebSocket, state, pending: asyncio.Queue) -> None:
    """Send the answers of the jobs in the order their frames came."""
    flagged_sent = False
    while True:
        kind, future, job = await pending.get()
        if kind == "gone":
            return
        if kind == "error":
            await ws.send_json(_error_event(job, state.config))
            continue
        try:
            report = await future
        except Exception as e:
            await ws.send_json(_error_event(e, state.config))
            if job.get("final"):
                await ws.close(CLOSE_POLICY)
                return
            continue
        for verdict in report["verdicts"]:
            await ws.send_text(json.dumps(verdict.to_dict(), ensure_ascii=False))
        summary = None
        if report["state"] is not None:
            summary = {**report["state"].to_dict(), "flagged": report["flagged"]}
            if report["flagged"] and not flagged_sent:
                await ws.send_json({"event": "flagged", **summary})
            flagged_sent = report["flagged"]
        if kind == "rollback":
            assert summary is not None  # a rollback's report always carries the state
            await ws.send_json({"event": "rollback", "tokens": report["tokens"], **summary})
        if job.get("final"):
            assert summary is not None  # a final frame is its stream's last feed: its report carries the state
            await ws.send_text(json.dumps({"event": "verdict", **summary,
                                           "prompt": report["prompt"].to_dict()}, ensure_ascii=False))
            await ws.close(CLOSE_NORMAL)
            return
