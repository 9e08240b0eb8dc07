"""One streamed answer: upstream events in, judged chunks out.

A reader task parses the upstream's SSE into a queue; the answer takes what has arrived, feeds
its text to the answer's Stream session on the server's Stream worker (the batched step the
WebSocket streams share), and sends what ``release``'s rule lets through. A flag cuts the stream
or, with ``care``, rolls the session back to the released text and reads the upstream's
continuation instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx

from edgeguard.server.proxy import care, shapes, sse
from edgeguard.server.proxy.release import Transcript
from edgeguard.server.proxy.upstream_text import Surrogates, checked, function_of, tool_calls

if TYPE_CHECKING:
    from edgeguard.runtime.backend import Vocab

log = logging.getLogger("edgeguard.server")
_END, _FAIL = object(), object()
_FIELDS = ("reasoning_content", "content")
# How much text goes to the Stream worker per step. A decode costs a fixed part (reading the
# weights) plus a part per token; when the upstream sends tokens faster than the guard judges
# them, a step that took everything pending grew each time (a 1 s step left 45 tokens for the
# next one) and the client got the answer in bursts seconds apart. So a step takes about
# STEP_S of text, by this answer's own seconds per token so far, and at most MAX_PIECE tokens: the
# gap between the chunks the client gets stays near STEP_S, for a few percent of throughput.
# The first piece is FIRST_PIECE tokens, so the first token goes out one short step after the
# prompt's verdict. A guard that keeps up never has that much pending and is not affected.
# Where the engine decodes streamed tokens a few per llama.cpp call (the CPU's batch-invariant
# calls, ``StreamGuard.call_tokens``), a bigger step is only more calls of the same cost, so a
# step takes at most one call's tokens and the client gets each call's text as soon as it is
# judged: the gap between chunks stays one call long, for the same throughput.
STEP_S = 0.5
FIRST_PIECE = 2
MAX_PIECE = 512
CHARS_PER_TOKEN_MAX = 64  # a window that holds ``tokens`` tokens of any text but the rarest


def token_cut(vocab: Vocab, text: str, tokens: int) -> int:
    """Characters of ``text`` that make its first ``tokens`` tokens (all of it if fewer; at least
    one character of a non-empty text): the text tokenized alone, which the stream's retokenizer
    matches but for the boundaries."""
    window = text[: tokens * CHARS_PER_TOKEN_MAX]
    ids = vocab.tokenize(window)
    if len(ids) <= tokens:
        return len(window)
    head = b"".join(vocab.piece(i) for i in ids[:tokens])
    return max(1, len(head.decode("utf-8", "ignore")))


class StreamedAnswer:
    """``proxy``: the ``chat.Proxy`` (its state, upstream, config and metrics); ``live``: the
    answer's open stream on the Stream worker; ``response``: the upstream's open SSE response."""

    def __init__(self, proxy, body: dict, live, prompt, prefill: str, response: httpx.Response):
        self.proxy, self.body, self.live, self.prompt = proxy, body, live, prompt
        self.response = response
        self.reader: asyncio.Task | None = None
        self.action = "none"
        self.closed = False
        self.config = proxy.config
        vocab = proxy.state.stream.vocab
        self.transcript = Transcript(self.config.holdback, lambda token: len(vocab.piece(token)),
                                     holds=proxy.state.stream.pair_labels)
        self.call_tokens = proxy.state.stream.call_tokens  # fixed for the guard's life
        self.prefill = prefill
        self.head: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                                     "created": int(time.time()), "model": body.get("model") or ""}
        self.finish: str | None = None
        self.usage: dict | None = None
        self.state = None  # the session's debounced state after the last feed
        self.first_flag: int | None = None
        self.retries = 0
        self.per_token: float | None = None  # seconds a step takes per token judged (see STEP_S)
        self.arrivals: list[tuple[int, float]] = []  # (end of text in the judged text, arrival time)
        self.surrogates = Surrogates()  # pairs whose halves come in two chunks
        self.tools: dict[int, dict[str, Any]] = {}  # tool call index -> its head (shared by its segments)

    async def close(self) -> None:
        """Stop reading the upstream (closing its connection stops a local LLM generating) and
        free the session; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.proxy.metrics.requests.labels("true", self.action).inc()
        self.proxy.close_stream(self.live)
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        await self.response.aclose()

    async def events(self):
        proxy, worker, vocab = self.proxy, self.proxy.state.stream_worker, self.proxy.state.stream.vocab
        queue: asyncio.Queue = asyncio.Queue()
        self.reader = asyncio.create_task(self._read(self.response, queue))
        try:
            yield sse.event(shapes.chunk(self.head, {"role": "assistant", "content": ""}))
            pending = self.transcript.add("", self.prefill)  # the client's own prefill: judged, never sent
            whole = len(pending)  # the prefill goes whole, with the first piece
            tokens = FIRST_PIECE
            ended = False
            while True:
                items = [] if pending or ended else [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                failure = None
                for item in items:
                    if item is _END:
                        ended = True
                        if failure is None:
                            try:
                                self.surrogates.check_ended()
                            except sse.SSEError as e:
                                failure = e
                    elif isinstance(item, tuple) and item[0] is _FAIL:
                        failure = item[1]
                    elif failure is None:
                        try:
                            pending += self._take_chunk(item)
                        except sse.SSEError as e:
                            failure = e
                # A piece of the text per step; the rest waits for the next step (see STEP_S).
                cut = len(pending) if failure is not None else whole + token_cut(vocab, pending[whole:], tokens)
                piece, pending, whole = pending[:cut], pending[cut:], 0
                final = ended and not pending and failure is None
                report = None
                if piece or final:
                    try:
                        t0 = time.perf_counter()
                        report = await worker.submit("feed", stream=self.live, text=piece, final=final,
                                                     bounded=False)
                        self._timed(time.perf_counter() - t0, len(report["verdicts"]))
                    except Exception as e:
                        failure = e
                tokens = self._piece_tokens()
                if report is not None:
                    self.state = report["state"] or self.state
                    flagged = report["flagged"] and self.state is not None
                    self.transcript.judged(report["verdicts"], final=final and not flagged,
                                           flagged_at=self.state.flagged_at if flagged else None)
                    for event in self._release():
                        yield event
                    if flagged:
                        if self.first_flag is None:
                            self.first_flag = self.state.flagged_at
                        assert self.reader is not None
                        self.reader.cancel()
                        await asyncio.gather(self.reader, return_exceptions=True)
                        await self.response.aclose()
                        response = await self._continue()
                        if response is None:
                            self.action = "cut"
                            proxy.metrics.cuts.inc()
                            text = self.config.refusal_text
                            delta = {"content": text} if text else {}
                            yield sse.event(shapes.chunk(self.head, delta, "content_filter",
                                                         edgeguard=self._info(self.action)))
                            yield sse.done()
                            return
                        self.action, self.response = "care", response
                        pending, ended = "", False  # text after the released text is dropped (rollback)
                        self.surrogates, self.tools = Surrogates(), {}
                        tokens = FIRST_PIECE  # a fresh start, as at the beginning
                        queue = asyncio.Queue()
                        self.reader = asyncio.create_task(self._read(response, queue))
                        continue
                if failure is not None:
                    self.action = "error"
                    yield sse.event({"error": shapes.error_body(failure, self.config.base, proxy.state.config)})
                    return
                if final:
                    yield sse.event(shapes.chunk(self.head, {}, self.finish or "stop",
                                                 edgeguard=self._info(self.action)))
                    if self.usage is not None:
                        yield sse.event({**self.head, "choices": [], "usage": self.usage})
                    yield sse.done()
                    return
        finally:
            await self.close()

    def _timed(self, seconds: float, tokens: int) -> None:
        """Record a step: its seconds per token (a moving average over steps of 2 or more)."""
        if tokens >= 2:
            per_token = seconds / tokens
            self.per_token = per_token if self.per_token is None else 0.7 * self.per_token + 0.3 * per_token

    def _piece_tokens(self) -> int:
        """Tokens for the next step: about STEP_S of work, FIRST_PIECE to MAX_PIECE."""
        if self.per_token is None:
            return FIRST_PIECE
        cap = self.call_tokens or MAX_PIECE
        return max(FIRST_PIECE, min(cap, MAX_PIECE, int(STEP_S / self.per_token)))

    async def _read(self, response: httpx.Response, queue: asyncio.Queue) -> None:
        """Upstream events into the queue: chunk objects, then _END or (_FAIL, error)."""
        parser = sse.SSEParser(self.config.max_event)
        finished = False
        try:
            async for part in response.aiter_bytes():  # decoded, if the upstream compressed it
                for data in parser.feed(part):
                    if data.strip() == sse.DONE:
                        await queue.put(_END)
                        return
                    chunk = sse.parse_chunk(data)
                    finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or ())
                    await queue.put(chunk)
            for data in parser.close():  # a last event without its blank line
                if data.strip() == sse.DONE:
                    await queue.put(_END)
                    return
                chunk = sse.parse_chunk(data)
                finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or ())
                await queue.put(chunk)
            if not finished:
                raise sse.SSEError("the upstream closed the stream before the answer finished")
            await queue.put(_END)  # a finished answer whose [DONE] never came
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await queue.put((_FAIL, e))

    def _take_chunk(self, chunk: dict) -> str:
        """Record one upstream chunk; returns its text to judge."""
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None:
                self.head[key] = chunk[key]
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if len(choices) > 1 or any(c.get("index", 0) != 0 for c in choices):
            raise sse.SSEError("the upstream sent more than one choice")
        judged = ""
        for choice in choices:
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise sse.SSEError("an upstream chunk's 'delta' is not an object")
            for key in _FIELDS:
                text = self._text(delta.get(key), key, key)
                if text:
                    judged += self.transcript.add(key, text)
            for call in tool_calls(delta.get("tool_calls")):
                judged += self._take_tool_call(call)
            if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
                self.finish = choice["finish_reason"]
        if judged:
            self.arrivals.append((self.transcript.size, time.perf_counter()))
        return judged

    def _text(self, value, key, what: str) -> str:
        """A delta's text field: "" if absent or null, else a string whose surrogate pairs may
        come in two chunks (``key``: the field, or the tool call), checked once joined."""
        if value is not None and not isinstance(value, str):
            checked(value, what)  # raises: names the type
        return checked(self.surrogates.join(key, value or ""), what)

    def _take_tool_call(self, call) -> str:
        """Record one tool call delta: a new call's head, or arguments for the call its
        ``index`` names, wherever the last text went; returns its text to judge."""
        index = call.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise sse.SSEError(f"an upstream tool call's 'index' is {index!r}, not a whole number")
        function = function_of(call)
        arguments = self._text(function.get("arguments"), ("tool", index), "tool call arguments")
        if call.get("id") is not None or function.get("name") is not None:  # a new call
            self.tools[index] = {"index": index, "id": call.get("id"), "type": call.get("type", "function"),
                                 "name": function.get("name")}
            return self.transcript.add("tool_calls", arguments, self.tools[index])
        if not arguments:
            return ""
        tool = self.tools.get(index)
        last = self.transcript.segments[-1] if self.transcript.segments else None
        if tool is None or (last is not None and last.tool is tool):
            return self.transcript.add("tool_calls", arguments)  # on the call's own segment
        return self.transcript.add("tool_calls", arguments, tool)  # back to an earlier call

    def _release(self):
        now = time.perf_counter()
        for segment, piece in self.transcript.take():
            while self.arrivals and self.arrivals[0][0] <= segment.start + segment.sent - len(piece):
                self.arrivals.pop(0)
            if piece and self.arrivals:
                self.proxy.metrics.delay.observe(now - self.arrivals[0][1])
            if segment.field == "tool_calls":
                assert segment.tool is not None or piece  # an arguments segment always starts with its head
                yield sse.event(shapes.chunk(self.head, {"tool_calls": [shapes.tool_call_delta(segment.tool or {},
                                                                                              piece)]}))
            else:
                yield sse.event(shapes.chunk(self.head, {segment.field: piece}))

    async def _continue(self) -> httpx.Response | None:
        """After a flag: the upstream's continuation (CARE), or None to cut."""
        proxy, t = self.proxy, self.transcript
        if self.config.on_flag != "care" or self.retries >= self.config.care_retries:
            return None
        kept = t.rollback()
        content = t.content_sent()
        if any(s.field in ("reasoning_content", "tool_calls") for s in t.segments) or \
                t.released_chars < len(self.prefill):
            return None  # CARE continues message content; a flag elsewhere cuts
        capability = await proxy.client().continues()
        if not capability["continues"]:
            return None
        await proxy.state.stream_worker.submit("rollback", stream=self.live, n=kept, bounded=False)
        self.retries += 1
        proxy.metrics.care.inc()
        self.finish = None
        body = care.continuation({**self.body, "stream": True}, self.prefill + content, vllm=capability["vllm"])
        try:
            return await proxy.client().open_chat(body)
        except Exception as e:
            log.warning("CARE continuation failed: %s", e)
            return None

    def _info(self, action: str) -> dict[str, Any]:
        answer = None
        if self.state is not None:
            answer = {**self.state.to_dict(), "flagged": bool(self.state.flagged),
                      "tokens": self.transcript.tokens}
        return shapes.info(self.prompt, answer, action, self.first_flag, self.retries)
