"""Clients that stall or leave: an HTTP request's body must arrive within ``request_timeout``
seconds (else 408); a client that closes its connection before its answer is logged and
counted as 499 (nginx's "client closed request"), never as a 500, and its handler is
cancelled, which cancels the engine work it waits for (the workers skip cancelled jobs and stop
long ones between decodes). WebSocket streams keep their own time (``websocket``).
"""

from __future__ import annotations

import asyncio
import contextlib

from edgeguard.server.errors import CLIENT_GONE, OUTCOME, RequestTimeout, ServerConfig


class ClientWatch:
    """ASGI middleware for HTTP requests (anything else passes through)."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        seconds = self.config.request_timeout
        deadline = loop.time() + seconds
        body_done = asyncio.Event()
        answered = False

        async def timed_receive():
            if body_done.is_set():
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise RequestTimeout(f"the request body did not arrive within {seconds:g} s "
                                     "(--request-timeout)") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done.set()
            return message

        async def watched_send(message):
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        async def gone() -> bool:
            """Whether the client leaves before its answer (only after its body: reading the
            body is the handler's; a disconnect then reaches it as ClientDisconnect)."""
            await body_done.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            return not answered

        handler = asyncio.ensure_future(self.app(scope, timed_receive, watched_send))
        watcher = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done() and watcher.result():
                scope[OUTCOME] = CLIENT_GONE
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
                return
            await handler
        finally:
            for task in (handler, watcher):
                task.cancel()
            await asyncio.gather(handler, watcher, return_exceptions=True)
