"""``POST /v1/chat/completions`` and ``GET /v1/models`` in front of an upstream LLM server.

The prompt is judged while the upstream request starts (Gen when loaded, else Stream's query
heads); nothing of the answer reaches the client before the prompt's verdict. A streamed answer
is fed, as it arrives, to a Stream session on the server's Stream worker (the batched path the
WebSocket streams use) and released by ``release``'s rule; a flag cuts the stream or, with
``care``, rolls the session back to the released text and asks the upstream to continue from
there. An answer that is not streamed (or any answer when only Gen is loaded) is judged whole.
The last chunk, or the response, carries an ``edgeguard`` object with the verdicts and the
action taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import httpx
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeguard.server.errors import HTTPError, http_error
from edgeguard.server.proxy import care, sse
from edgeguard.server.proxy.config import ProxyConfig
from edgeguard.server.proxy.conversation import check_request, guard_conversation
from edgeguard.server.proxy.release import SEPARATOR, Transcript
from edgeguard.server.proxy.upstream import Upstream, UpstreamStatus
from edgeguard.server.workers import QueueFull

log = logging.getLogger("edgeguard.server")
_END, _FAIL = object(), object()
_FIELDS = ("reasoning_content", "content")


class ProxyMetrics:
    def __init__(self, registry):
        self.requests = Counter("edgeguard_proxy_requests", "Chat completions proxied, by stream and outcome",
                                ["stream", "action"], registry=registry)
        self.cuts = Counter("edgeguard_proxy_cuts", "Answers cut after a flag", registry=registry)
        self.care = Counter("edgeguard_proxy_care_continuations", "CARE continuations asked of the upstream",
                            registry=registry)
        self.blocks = Counter("edgeguard_proxy_prompt_blocks", "Prompts refused before any answer",
                              registry=registry)
        self.delay = Histogram("edgeguard_proxy_release_delay_seconds",
                               "Time from the upstream sending text to the client getting it", registry=registry,
                               buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.prompt = Histogram("edgeguard_proxy_prompt_seconds", "Time to the prompt's verdict", registry=registry,
                                buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))


class Proxy:
    """The proxy's endpoints over the app's ``State`` (its guards, workers and metrics)."""

    def __init__(self, config: ProxyConfig, state, read_json):
        self.config, self.state = config, state
        self.read_json = read_json  # the app's body reader: 413 and 400 as on every endpoint
        self.metrics = ProxyMetrics(state.metrics.registry)
        self.upstream: Upstream | None = None

    async def start(self) -> None:
        self.upstream = Upstream(self.config)

    async def stop(self) -> None:
        if self.upstream is not None:
            await self.upstream.close()

    def routes(self) -> list[Route]:
        return [Route("/v1/chat/completions", self._endpoint(self.chat), methods=["POST"]),
                Route("/v1/models", self._endpoint(self.models), methods=["GET"])]

    def _endpoint(self, handler):
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except UpstreamStatus as e:
                return Response(e.body, status_code=e.status, media_type=e.content_type)
            except Exception as e:
                return http_error(e, self.state.config).response()

        return wrapped

    def _upstream(self) -> Upstream:
        assert self.upstream is not None  # set by the app's lifespan before any request
        return self.upstream

    async def models(self, request: Request) -> Response:
        status, body, kind = await self._upstream().models()
        return Response(body, status_code=status, media_type=kind)

    # -- chat -------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = await self.read_json(request, self.state.config.max_body)
        check_request(body)
        turns, prefill = guard_conversation(body["messages"])
        streamed = bool(body.get("stream"))
        if streamed and self.state.stream is not None:
            return await self._streamed(body, turns, prefill)
        return await self._whole(body, turns, prefill, streamed)

    async def _prompt_verdict(self, turns: list[dict], session_verdict=None):
        if self.state.gen is not None:
            return (await self.state.checks(self.state.gen, [(turns,)]))[0]
        if session_verdict is not None:
            return session_verdict
        return (await self.state.checks(self.state.stream, [(turns,)]))[0]

    def _refusal(self, body: dict, prompt, streamed: bool, action: str = "block") -> Response:
        self.metrics.blocks.inc()
        self.metrics.requests.labels(str(streamed).lower(), action).inc()
        info = _info(prompt, None, action)
        text = self.config.refusal_text
        cid, model, created = f"chatcmpl-{uuid.uuid4().hex}", body.get("model") or "", int(time.time())
        if not streamed:
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "content_filter", "logprobs": None}],
                                 "edgeguard": info})
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        events = [sse.event(_chunk(head, {"role": "assistant", "content": text})),
                  sse.event(_chunk(head, {}, "content_filter", edgeguard=info)), sse.done()]
        return Response(b"".join(events), media_type="text/event-stream")

    # -- an answer judged whole ----------------------------------------------------------------
    async def _whole(self, body: dict, turns: list[dict], prefill: str, streamed: bool) -> Response:
        t0 = time.perf_counter()
        upstream = asyncio.create_task(self._read_whole({**body, "stream": False}))
        try:
            prompt = await self._prompt_verdict(turns)
            self.metrics.prompt.observe(time.perf_counter() - t0)
            if prompt.flagged:
                await _cancel(upstream)
                return self._refusal(body, prompt, streamed)
        except BaseException:
            await _cancel(upstream)
            raise
        answer = await upstream
        choices = answer.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict) \
                or not isinstance(choices[0].get("message"), dict):
            raise HTTPError(502, "the upstream's answer has no single choice with a message", "upstream_invalid",
                            "server_error")
        message = choices[0]["message"]
        text = _answer_text(message, prefill)
        verdict = None
        if text.strip():
            if self.state.stream is not None:
                verdict = (await self.state.checks(self.state.stream, [(turns, text)]))[0]
            else:
                verdict = (await self.state.checks(self.state.gen, [(turns + [{"role": "assistant",
                                                                              "content": text}],)]))[0]
        action = "cut" if verdict is not None and verdict.flagged else "none"
        if action == "cut":
            self.metrics.cuts.inc()
            choices[0]["message"] = {"role": "assistant", "content": self.config.refusal_text}
            choices[0]["finish_reason"] = "content_filter"
        info = _info(prompt, verdict.to_dict() if verdict is not None else None, action,
                     verdict.flagged_at if verdict is not None else None)
        self.metrics.requests.labels(str(streamed).lower(), action).inc()
        if not streamed:
            return JSONResponse({**answer, "edgeguard": info})
        head = {k: answer.get(k) for k in ("id", "created", "model", "system_fingerprint") if k in answer}
        head["object"] = "chat.completion.chunk"
        message = choices[0]["message"]
        delta = {"role": "assistant", **{k: message[k] for k in ("content", "reasoning_content", "tool_calls")
                                         if message.get(k) is not None}}
        for i, call in enumerate(delta.get("tool_calls") or ()):
            call.setdefault("index", i)
        events = [sse.event(_chunk(head, delta)),
                  sse.event(_chunk(head, {}, choices[0].get("finish_reason") or "stop", edgeguard=info))]
        if answer.get("usage") is not None:
            events.append(sse.event({**head, "choices": [], "usage": answer["usage"]}))
        return Response(b"".join([*events, sse.done()]), media_type="text/event-stream")

    async def _read_whole(self, body: dict) -> dict:
        import json

        response = await self._upstream().open_chat(body)
        try:
            raw = bytearray()
            async for part in response.aiter_bytes():
                raw += part
                if len(raw) > self.config.max_event:
                    raise HTTPError(502, f"the upstream's answer is larger than {self.config.max_event} bytes",
                                    "upstream_invalid", "server_error")
        except httpx.HTTPError as e:
            from edgeguard.server.proxy.upstream import unreachable

            raise unreachable(e, self.config.base) from e
        finally:
            await response.aclose()
        try:
            answer = json.loads(raw)
        except ValueError as e:
            raise HTTPError(502, "the upstream's answer is not JSON", "upstream_invalid", "server_error") from e
        if not isinstance(answer, dict):
            raise HTTPError(502, "the upstream's answer is not a JSON object", "upstream_invalid", "server_error")
        return answer

    # -- a streamed answer ---------------------------------------------------------------------
    async def _streamed(self, body: dict, turns: list[dict], prefill: str) -> Response:
        state = self.state
        t0 = time.perf_counter()
        upstream = asyncio.create_task(self._upstream().open_chat({**body, "stream": True}))
        if state.live_streams >= state.max_streams:
            await _cancel(upstream)
            raise HTTPError(503, f"all {state.max_streams} streams are busy; retry later", "too_many_streams",
                            "server_error", {"Retry-After": str(state.config.retry_after)})
        state.live_streams += 1
        live = None
        try:
            live = await state.stream_worker.submit("open", items=[turns], bounded=False)
            prompt = await self._prompt_verdict(turns, live.session.prompt_verdict)
            self.metrics.prompt.observe(time.perf_counter() - t0)
            if not prompt.flagged:
                response = await upstream
                return _EventStream(_Answer(self, body, live, prompt, prefill, response))
        except BaseException:
            self._close(live)
            await _cancel(upstream)
            raise
        self._close(live)
        await _cancel(upstream)
        return self._refusal(body, prompt, True)

    def _close(self, live) -> None:
        """Free a stream's session (its queued feeds land first) and its slot."""
        self.state.live_streams -= 1
        if live is not None:
            try:
                self.state.stream_worker.submit("close", stream=live, bounded=False)
            except QueueFull:
                pass  # shutting down: closing the guard frees the session


class _Answer:
    """One streamed answer: upstream events in, judged chunks out."""

    def __init__(self, proxy: Proxy, body: dict, live, prompt, prefill: str, response: httpx.Response):
        self.proxy, self.body, self.live, self.prompt = proxy, body, live, prompt
        self.response = response
        self.reader: asyncio.Task | None = None
        self.action = "none"
        self.closed = False
        self.config = proxy.config
        vocab = proxy.state.stream.vocab
        self.transcript = Transcript(self.config.holdback, lambda token: len(vocab.piece(token)))
        self.prefill = prefill
        self.head: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                                     "created": int(time.time()), "model": body.get("model") or ""}
        self.finish: str | None = None
        self.usage: dict | None = None
        self.state = None  # the session's debounced state after the last feed
        self.first_flag: int | None = None
        self.retries = 0
        self.arrivals: list[tuple[int, float]] = []  # (end of text in the judged text, arrival time)

    async def close(self) -> None:
        """Stop reading the upstream (closing its connection stops a local LLM generating) and
        free the session; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.proxy.metrics.requests.labels("true", self.action).inc()
        self.proxy._close(self.live)
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        await self.response.aclose()

    async def events(self):
        proxy, worker = self.proxy, self.proxy.state.stream_worker
        queue: asyncio.Queue = asyncio.Queue()
        self.reader = asyncio.create_task(self._read(self.response, queue))
        try:
            yield sse.event(_chunk(self.head, {"role": "assistant", "content": ""}))
            pending = self.transcript.add("", self.prefill)  # the client's own prefill: judged, never sent
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                final, failure = False, None
                for item in items:
                    if item is _END:
                        final = True
                    elif isinstance(item, tuple) and item[0] is _FAIL:
                        failure = item[1]
                    elif failure is None:
                        try:
                            pending += self._take_chunk(item)
                        except sse.SSEError as e:
                            failure = e
                if failure is not None:
                    final = False
                report = None
                if pending or final:
                    try:
                        report = await worker.submit("feed", stream=self.live, text=pending, final=final,
                                                     bounded=False)
                    except Exception as e:
                        failure = e
                    pending = ""
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
                            yield sse.event(_chunk(self.head, delta, "content_filter",
                                                   edgeguard=self._info(self.action)))
                            yield sse.done()
                            return
                        self.action, self.response = "care", response
                        queue = asyncio.Queue()
                        self.reader = asyncio.create_task(self._read(response, queue))
                        continue
                if failure is not None:
                    self.action = "error"
                    yield sse.event({"error": _error(failure, proxy)})
                    return
                if final:
                    yield sse.event(_chunk(self.head, {}, self.finish or "stop", edgeguard=self._info(self.action)))
                    if self.usage is not None:
                        yield sse.event({**self.head, "choices": [], "usage": self.usage})
                    yield sse.done()
                    return
        finally:
            await self.close()

    async def _read(self, response: httpx.Response, queue: asyncio.Queue) -> None:
        """Upstream events into the queue: chunk objects, then _END or (_FAIL, error)."""
        parser = sse.SSEParser(self.config.max_event)
        finished = False
        try:
            async for part in response.aiter_raw():
                for data in parser.feed(part):
                    if data.strip() == sse.DONE:
                        await queue.put(_END)
                        return
                    chunk = sse.parse_chunk(data)
                    finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or ())
                    await queue.put(chunk)
            for data in parser.close():
                if data.strip() == sse.DONE:
                    await queue.put(_END)
                    return
                await queue.put(sse.parse_chunk(data))
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
                if isinstance(delta.get(key), str) and delta[key]:
                    judged += self.transcript.add(key, delta[key])
            for call in delta.get("tool_calls") or ():
                if not isinstance(call, dict):
                    raise sse.SSEError("an upstream tool call is not an object")
                function = call.get("function") or {}
                if not isinstance(function, dict):
                    raise sse.SSEError("an upstream tool call's 'function' is not an object")
                arguments = function.get("arguments")
                arguments = arguments if isinstance(arguments, str) else ""
                tool = None
                if call.get("id") is not None or function.get("name") is not None:
                    tool = {"index": call.get("index", 0), "id": call.get("id"), "type": call.get("type", "function"),
                            "name": function.get("name")}
                judged += self.transcript.add("tool_calls", arguments, tool)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        if judged:
            self.arrivals.append((self.transcript.size, time.perf_counter()))
        return judged

    def _release(self):
        now = time.perf_counter()
        for segment, piece in self.transcript.take():
            while self.arrivals and self.arrivals[0][0] <= segment.start + segment.sent - len(piece):
                self.arrivals.pop(0)
            if piece and self.arrivals:
                self.proxy.metrics.delay.observe(now - self.arrivals[0][1])
            if segment.field == "tool_calls":
                assert segment.tool is not None or piece  # an arguments segment always starts with its head
                tool = segment.tool or {}
                call: dict[str, Any] = {"index": tool.get("index", 0), "function": {"arguments": piece}}
                if not tool.get("announced"):
                    call.update(id=tool.get("id"), type=tool.get("type"))
                    call["function"]["name"] = tool.get("name")
                    tool["announced"] = True
                yield sse.event(_chunk(self.head, {"tool_calls": [call]}))
            else:
                yield sse.event(_chunk(self.head, {segment.field: piece}))

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
        capability = await proxy._upstream().continues()
        if not capability["continues"]:
            return None
        await proxy.state.stream_worker.submit("rollback", stream=self.live, n=kept, bounded=False)
        self.retries += 1
        proxy.metrics.care.inc()
        self.finish = None
        body = care.continuation({**self.body, "stream": True}, self.prefill + content, vllm=capability["vllm"])
        try:
            return await proxy._upstream().open_chat(body)
        except Exception as e:
            log.warning("CARE continuation failed: %s", e)
            return None

    def _info(self, action: str) -> dict[str, Any]:
        answer = None
        if self.state is not None:
            answer = {**self.state.to_dict(), "flagged": bool(self.state.flagged),
                      "tokens": self.transcript.tokens}
        return _info(self.prompt, answer, action, self.first_flag, self.retries)


class _EventStream(StreamingResponse):
    """A streamed response that also watches the client: a disconnect cancels the stream (and so
    the upstream request) at once, not at the next write."""

    def __init__(self, answer: _Answer):
        super().__init__(answer.events(), media_type="text/event-stream")
        self.answer = answer

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            events = self.body_iterator
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for event in events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                await events.aclose()
                await self.answer.close()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass

        writer, watcher = asyncio.create_task(pump()), asyncio.create_task(watch())
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, watcher):
                task.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
        if not writer.cancelled() and writer.exception() is not None:
            raise writer.exception()  # type: ignore[misc]  # a bug: the app's 500 handler logs it


async def _cancel(task: asyncio.Task) -> None:
    """Cancel an upstream request; a response it already opened is closed."""
    task.cancel()
    for result in await asyncio.gather(task, return_exceptions=True):
        if isinstance(result, httpx.Response):
            await result.aclose()


def _chunk(head: dict, delta: dict, finish: str | None = None, **extra) -> dict:
    return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}


def _info(prompt, answer: dict | None, action: str, flagged_at: int | None = None, retries: int = 0) -> dict:
    """The ``edgeguard`` object of a response's last chunk."""
    return {"prompt": prompt.to_dict(), "answer": answer, "flagged_at": flagged_at, "action": action,
            "care_retries": retries}


def _error(error: BaseException, proxy: Proxy) -> dict:
    if isinstance(error, httpx.HTTPError):
        from edgeguard.server.proxy.upstream import unreachable

        error = unreachable(error, proxy.config.base)
    elif isinstance(error, sse.SSEError):
        error = HTTPError(502, str(error), "upstream_invalid", "server_error")
    e = http_error(error, proxy.state.config)
    return {"message": e.message, "type": e.kind, "code": e.code}


def _answer_text(message: dict, prefill: str) -> str:
    """The judged text of a whole answer: reasoning, content (after a client's prefill), tool
    calls' arguments."""
    parts = []
    if isinstance(message.get("reasoning_content"), str) and message["reasoning_content"]:
        parts.append(message["reasoning_content"])
    content = message.get("content")
    content = content if isinstance(content, str) else ""
    if prefill or content:
        parts.append(prefill + content)
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str) and function["arguments"]:
            parts.append(function["arguments"])
    return SEPARATOR.join(parts)
