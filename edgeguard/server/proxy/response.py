"""The streamed response: it writes the answer's events and watches the client at once, so a
disconnect cancels the answer (and so the upstream request) without waiting for the next write."""

from __future__ import annotations

import asyncio

import httpx
from starlette.responses import StreamingResponse


class EventStream(StreamingResponse):
    """``answer``: an object with ``events()`` (an async iterator of SSE bytes) and ``close()``."""

    def __init__(self, answer):
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


async def cancel(task: asyncio.Task) -> None:
    """Cancel an upstream request; a response it already opened is closed."""
    task.cancel()
    for result in await asyncio.gather(task, return_exceptions=True):
        if isinstance(result, httpx.Response):
            await result.aclose()
