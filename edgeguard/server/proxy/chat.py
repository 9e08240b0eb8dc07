"""``POST /v1/chat/completions`` and ``GET /v1/models`` in front of an upstream LLM server.

The prompt is judged while the upstream request starts (Gen when loaded, else Stream's query
heads); nothing of the answer reaches the client before the prompt's verdict. A streamed answer
goes to ``answer.StreamedAnswer`` (judged token by token on the Stream worker); one that is not
streamed, or any answer when only Gen is loaded, to ``whole`` (judged whole). The last chunk,
or the response, carries an ``edgeguard`` object with the verdicts and the action taken.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeguard.server.errors import HTTPError, http_error
from edgeguard.server.proxy import shapes
from edgeguard.server.proxy.answer import StreamedAnswer
from edgeguard.server.proxy.config import ProxyConfig
from edgeguard.server.proxy.conversation import check_request, guard_conversation
from edgeguard.server.proxy.metrics import ProxyMetrics
from edgeguard.server.proxy.response import EventStream, cancel
from edgeguard.server.proxy.upstream import Upstream, UpstreamStatus
from edgeguard.server.proxy.whole import judge_whole
from edgeguard.server.workers import QueueFull


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

    def client(self) -> Upstream:
        assert self.upstream is not None  # set by the app's lifespan before any request
        return self.upstream

    async def models(self, request: Request) -> Response:
        status, body, kind = await self.client().models()
        return Response(body, status_code=status, media_type=kind)

    async def chat(self, request: Request) -> Response:
        body = await self.read_json(request, self.state.config.max_body)
        check_request(body)
        turns, prefill = guard_conversation(body["messages"])
        streamed = bool(body.get("stream"))
        if streamed and self.state.stream is not None:
            return await self._streamed(body, turns, prefill)
        return await judge_whole(self, body, turns, prefill, streamed)

    async def prompt_verdict(self, turns: list[dict], session_verdict=None):
        """Gen's verdict when Gen is loaded, else the Stream session's (or a Stream check's)."""
        if self.state.gen is not None:
            return (await self.state.checks(self.state.gen, [(turns,)]))[0]
        if session_verdict is not None:
            return session_verdict
        return (await self.state.checks(self.state.stream, [(turns,)]))[0]

    def refusal(self, body: dict, prompt, streamed: bool) -> Response:
        self.metrics.blocks.inc()
        self.metrics.requests.labels(str(streamed).lower(), "block").inc()
        return shapes.refusal(body, prompt, self.config.refusal_text, streamed)

    async def _streamed(self, body: dict, turns: list[dict], prefill: str) -> Response:
        state = self.state
        t0 = time.perf_counter()
        upstream = asyncio.create_task(self.client().open_chat({**body, "stream": True}))
        if state.live_streams >= state.max_streams:
            await cancel(upstream)
            raise HTTPError(503, f"all {state.max_streams} streams are busy; retry later", "too_many_streams",
                            "server_error", {"Retry-After": str(state.config.retry_after)})
        state.live_streams += 1
        live = None
        try:
            live = await state.stream_worker.submit("open", items=[turns], bounded=False)
            prompt = await self.prompt_verdict(turns, live.session.prompt_verdict)
            self.metrics.prompt.observe(time.perf_counter() - t0)
            if not prompt.flagged:
                response = await upstream
                return EventStream(StreamedAnswer(self, body, live, prompt, prefill, response))
        except BaseException:
            self.close_stream(live)
            await cancel(upstream)
            raise
        self.close_stream(live)
        await cancel(upstream)
        return self.refusal(body, prompt, True)

    def close_stream(self, live) -> None:
        """Free a stream's session (its queued feeds land first) and its slot."""
        self.state.live_streams -= 1
        if live is not None:
            try:
                self.state.stream_worker.submit("close", stream=live, bounded=False)
            except QueueFull:
                pass  # shutting down: closing the guard frees the session
