"""Clients that never finish a request's head: uvicorn times out neither a connection that sends
nothing nor a request line and headers that never end (slowloris; its keep-alive timer stops at
the first byte of the next request), so each such client would hold a connection forever.

``http_protocol(seconds)`` is uvicorn's HTTP/1.1 protocol with a deadline for the head: a new
connection, or the first byte of a request after a complete answer, starts a clock that the end
of the headers stops. When it runs out, a client that has sent part of a request gets a 408
(``request_timeout``, ``Connection: close``) and the connection closes; one that has sent nothing
is closed without an answer (browsers open connections ahead of use, as preconnects). A body is
then ``ClientWatch``'s (``clients``), a WebSocket stream the idle timeout's, an idle keep-alive
connection uvicorn's own ``timeout_keep_alive``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

access_log = logging.getLogger("edgeguard.access")


def http_protocol(head_timeout: float) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``: httptools' parser when it is installed
    (what uvicorn's "auto" picks: the faster one), else h11's; ``head_timeout`` in seconds."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        base: type[asyncio.Protocol] = H11HeadTimeout
    else:
        base = httptools_head_timeout()
    return type(base.__name__, (base,), {"head_timeout": head_timeout})


class HeadTimeout:
    """The clock, for a uvicorn HTTP protocol class (``transport`` and ``loop`` are theirs)."""

    head_timeout = 30.0
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    _head_timer: asyncio.TimerHandle | None = None
    _head_started = False  # bytes of a request head arrived while the clock ran
    _head_since = 0.0

    def _start_head_clock(self, started: bool) -> None:
        if self._head_timer is None:  # a running clock goes on: sending byte by byte does not extend it
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)
            self._head_since = time.perf_counter()
        self._head_started = self._head_started or started

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer, self._head_started = None, False

    def _request_in_flight(self) -> bool:
        raise NotImplementedError

    def _head_timed_out(self) -> None:
        started = self._head_started
        self._head_timer, self._head_started = None, False
        transport = self.transport
        if transport.is_closing() or transport.get_protocol() is not self or self._request_in_flight():
            return  # closed, upgraded to a WebSocket, or a request whose head is complete
        if started:
            body = json.dumps({"error": {
                "message": f"the request headers did not arrive within {self.head_timeout:g} s (--request-timeout)",
                "type": "invalid_request_error", "code": "request_timeout"}}).encode()
            transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            access_log.info("- - 408 %.1f ms (request head incomplete)", (time.perf_counter() - self._head_since) * 1e3)
        transport.close()


class H11HeadTimeout(HeadTimeout, H11Protocol):
    """h11's protocol with the head clock: h11's ``their_state`` is IDLE until a request's
    headers are complete."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._start_head_clock(False)

    def data_received(self, data: bytes) -> None:
        waiting = self.conn.their_state is h11.IDLE
        super().data_received(data)
        if self.transport.get_protocol() is self and self.conn.their_state is h11.IDLE:
            # Bytes of a head, or the end of a body answered early, after which h11 waits again.
            self._start_head_clock(waiting or bool(self.conn.trailing_data[0]))
        else:
            self._stop_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_clock()
        super().connection_lost(exc)

    def _request_in_flight(self) -> bool:
        return self.conn.their_state is not h11.IDLE


@functools.cache
def httptools_head_timeout() -> type[asyncio.Protocol]:
    """httptools' protocol with the head clock (httptools is optional in uvicorn: built on
    first use). Its parser reports the end of the headers (``on_headers_complete``); between
    requests its ``cycle`` is None or answered."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpToolsHeadTimeout(HeadTimeout, HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._start_head_clock(False)

        def data_received(self, data: bytes) -> None:
            if not self._request_in_flight():
                self._start_head_clock(True)
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._stop_head_clock()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_clock()
            super().connection_lost(exc)

        def _request_in_flight(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

    return HttpToolsHeadTimeout
