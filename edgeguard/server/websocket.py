"""``WebSocket /v1/stream``: live moderation of a response as an LLM generates it.

Protocol (JSON text frames). The client opens with ``{"prompt": text}`` or ``{"messages":
[...]}``; the server answers ``{"event": "prompt", ...}`` (the prompt's verdict, the ``check
--json`` object). Then the client sends any number of ``{"text": chunk}`` or ``{"tokens":
[ids]}`` frames (one kind per stream), ``{"rollback": n}`` and finally ``{"finish": true}``
(which may carry a last ``text`` or ``tokens``). The server answers each judged token with one
``edgeguard stream --json`` line, sends ``{"event": "flagged", ...}`` the moment the debounced
verdict flags under the policy, ``{"event": "rollback", ...}`` after a rollback, and after
``finish`` the ``{"event": "verdict", ...}`` line of ``edgeguard stream --json``, then closes.
Frames are judged in order, each as if it had come alone, even when several arrive together:
a bad frame gets ``{"event": "error", "error": {...}}`` and changes nothing; the stream goes on.
Binary frames are bad frames. A ``finish`` frame always ends the stream: with the verdict and
close 1000, or, when that frame itself fails, with its error event and close 1008 (a verdict
never leaves out text that was sent with the finish). A stream whose client sends nothing for
``idle_timeout`` seconds, while the server owes it nothing, gets an error event (408) and close
1008. A client that leaves is logged as 499, and its frames not yet judged are dropped.

Browsers cannot set headers on a WebSocket: a client may offer the subprotocols ``edgeguard``
and ``bearer.<API key>``; the server checks the key (``offered_key``) and answers ``edgeguard``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from edgeguard.engines import inputs
from edgeguard.errors import UsageError
from edgeguard.server.errors import CLIENT_GONE, OUTCOME, HTTPError, check_conversation, check_text, http_error
from edgeguard.server.workers import LiveStream, QueueFull

PIPELINE = 64  # frames one stream may have waiting for the engine before reading pauses
CLOSE_NORMAL, CLOSE_UNSUPPORTED, CLOSE_POLICY, CLOSE_TRY_LATER = 1000, 1003, 1008, 1013
SUBPROTOCOL = "edgeguard"
KEY_PREFIX = "bearer."


def offered_key(scope) -> bytes | None:
    """The API key a WebSocket client offers as a ``bearer.<key>`` subprotocol, if any."""
    for protocol in scope.get("subprotocols", ()):
        if protocol.startswith(KEY_PREFIX):
            return protocol[len(KEY_PREFIX):].encode()
    return None


def _error_event(error: BaseException, config) -> dict:
    e = http_error(error, config)
    return {"event": "error", "error": {"message": e.message, "type": e.kind, "code": e.code},
            "status": e.status}


class _Gone(Exception):
    """The client closed the connection."""


class _Idle(Exception):
    """No frame from the client within the idle timeout."""


def _idle_error(seconds: float) -> HTTPError:
    return HTTPError(408, f"no frame from the client in {seconds:g} s (--idle-timeout); closing the stream",
                     "idle_timeout")


async def _receive(ws: WebSocket, seconds: float) -> str | bytes:
    """The next frame's data; _Gone when the client left, _Idle after ``seconds``."""
    try:
        message = await asyncio.wait_for(ws.receive(), seconds)
    except asyncio.TimeoutError as e:  # not the builtin TimeoutError before Python 3.11
        raise _Idle from e
    if message["type"] == "websocket.disconnect":
        raise _Gone
    text = message.get("text")
    return text if text is not None else message.get("bytes") or b""


def _frame(raw: str | bytes) -> dict:
    if not isinstance(raw, str):
        raise HTTPError(400, f"frames are JSON text frames; got a binary frame of {len(raw)} bytes", "invalid_frame")
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
    if text is not None:
        inputs.text(text, "text")  # as StreamSession.feed_text checks it; 'tokens' as feed does, in the worker
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
        first = _frame(await _receive(ws, config.idle_timeout))
        if "messages" in first:
            prompt = first["messages"]
            check_text(prompt, "messages")
        elif "prompt" in first:
            prompt = first["prompt"]
            check_conversation(prompt, None)
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
    except (_Gone, WebSocketDisconnect):
        ws.scope[OUTCOME] = CLIENT_GONE
        return None
    except _Idle:
        ws.scope[OUTCOME] = 408
        error: Exception = _idle_error(config.idle_timeout)
    except Exception as e:
        error = e
    event = _error_event(error, config)
    await ws.send_json(event)
    await ws.close(CLOSE_TRY_LATER if event["status"] == 503 else CLOSE_POLICY)
    return None


@dataclass
class _Answer:
    """What the writer owes the client for one frame, in the order the frames came."""

    kind: str  # "job", "error" (a frame refused before the engine), "gone" or "idle"
    future: asyncio.Future | None = None
    job: dict | None = None
    error: Exception | None = None
    final: bool = False


class _Pace:
    """When the client last sent a frame or got an answer, and how many answers it is owed:
    a stream is idle only while it owes nothing."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.owed: list[asyncio.Future] = []

    def touch(self) -> None:
        self.last = time.monotonic()


async def stream_endpoint(ws: WebSocket) -> None:
    state = ws.app.state.edgeguard
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in ws.scope.get("subprotocols", ()) else None)
    stream = await _open(ws, state)
    if stream is None:
        return
    worker = state.stream_worker
    pace = _Pace()
    try:
        await ws.send_json({"event": "prompt", **stream.session.prompt_verdict.to_dict()})
        pending: asyncio.Queue = asyncio.Queue(PIPELINE)
        reader = asyncio.create_task(_read(ws, state, worker, stream, pending, pace))
        try:
            await _write(ws, state, pending, pace)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    except (WebSocketDisconnect, OSError, RuntimeError):
        ws.scope[OUTCOME] = CLIENT_GONE  # it went away mid-answer: nothing left to tell it
    finally:
        for future in pace.owed:  # nobody will read these answers: the worker skips them
            future.cancel()
        state.live_streams -= 1
        try:
            await worker.submit("close", stream=stream, bounded=False)
        except QueueFull:
            pass  # shutting down: closing the guard frees the session


async def _read(ws: WebSocket, state, worker, stream: LiveStream, pending: asyncio.Queue, pace: _Pace) -> None:
    """Turn client frames into worker jobs, in order, without waiting for their results."""
    try:
        await _read_frames(ws, state, worker, stream, pending, pace)
    except Exception as e:  # a bug here must end the stream with an error, not leave the writer waiting
        await pending.put(_Answer("error", error=e, final=True))


async def _read_frames(ws: WebSocket, state, worker, stream: LiveStream, pending: asyncio.Queue,
                       pace: _Pace) -> None:
    idle = state.config.idle_timeout
    while True:
        # While answers are owed the client is waiting, not idle: look again a whole period later.
        wait = idle if pace.owed else max(0.05, pace.last + idle - time.monotonic())
        try:
            raw = await _receive(ws, wait)
        except _Idle:
            if pace.owed or time.monotonic() < pace.last + idle:
                continue  # the server still owes answers (or just sent one): the client is waiting
            await pending.put(_Answer("idle"))
            return
        except (_Gone, WebSocketDisconnect, RuntimeError):
            for future in pace.owed:  # the client left: drop the work it will never read
                future.cancel()
            await pending.put(_Answer("gone"))
            return
        pace.touch()
        final = False
        try:
            frame = _frame(raw)
            final = frame.get("finish") is True
            job = _job(frame)
        except (HTTPError, UsageError) as e:
            await pending.put(_Answer("error", error=e, final=final))
            if final:
                return
            continue
        future = worker.submit(stream=stream, bounded=False, **job)
        pace.owed.append(future)
        await pending.put(_Answer("job", future=future, job=job, final=job.get("final", False)))
        if job.get("final"):
            return


async def _write(ws: WebSocket, state, pending: asyncio.Queue, pace: _Pace) -> None:
    """Send the answers of the frames in the order they came."""
    flagged_sent = False
    while True:
        answer = await pending.get()
        if answer.kind == "gone":
            ws.scope[OUTCOME] = CLIENT_GONE
            return
        if answer.kind == "idle":
            ws.scope[OUTCOME] = 408
            await ws.send_json(_error_event(_idle_error(state.config.idle_timeout), state.config))
            await ws.close(CLOSE_POLICY)
            return
        if answer.kind == "error":
            assert answer.error is not None  # an "error" answer carries it
            await ws.send_json(_error_event(answer.error, state.config))
            pace.touch()
            if answer.final:
                await ws.close(CLOSE_POLICY)
                return
            continue
        future, job = answer.future, answer.job
        assert future is not None and job is not None  # a "job" answer carries both
        await asyncio.wait([future])  # a future cancelled because the client left raises nothing here
        pace.owed.remove(future)
        if future.cancelled():
            ws.scope[OUTCOME] = CLIENT_GONE
            return
        pace.touch()
        error = future.exception()
        if error is not None:
            await ws.send_json(_error_event(error, state.config))
            if answer.final:
                await ws.close(CLOSE_POLICY)
                return
            continue
        report = future.result()
        for verdict in report["verdicts"]:
            await ws.send_text(json.dumps(verdict.to_dict(), ensure_ascii=False))
        summary = None
        if report["state"] is not None:
            summary = {**report["state"].to_dict(), "flagged": report["flagged"]}
            if report["flagged"] and not flagged_sent:
                await ws.send_json({"event": "flagged", **summary})
            flagged_sent = report["flagged"]
        if job["kind"] == "rollback":
            assert summary is not None  # a rollback's report always carries the state
            await ws.send_json({"event": "rollback", "tokens": report["tokens"], **summary})
        if answer.final:
            assert summary is not None  # a final frame is its stream's last feed: its report carries the state
            await ws.send_text(json.dumps({"event": "verdict", **summary,
                                           "prompt": report["prompt"].to_dict()}, ensure_ascii=False))
            await ws.close(CLOSE_NORMAL)
            return
