"""What hostile and careless clients do to a real `edgeguard serve` on loopback: frames that
arrive in one TCP write, binary frames, failing `finish` frames, clients that leave mid-upload
or mid-stream, half-sent request bodies and heads, idle streams, and the API key offered as a
WebSocket subprotocol (browsers cannot set headers). Frames are written with websockets' sans-I/O
protocol over a plain socket, so several frames really leave in one write before any answer
is read; /metrics and the access log are read back to check the 499/408 outcomes."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

from tests.test_server import Server, assert_same_verdict, cache_env, cli_cache, gen_model, stream_model  # noqa: F401
from tests.test_server_stream import assert_same_lines, token_lines

pytestmark = [pytest.mark.server, pytest.mark.slow]

KEY = "k3y-Edge_guard.~"  # token characters only: it travels in a Sec-WebSocket-Protocol entry
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "How do I bake bread?"
TIMEOUT = 2  # --request-timeout and --idle-timeout of the server under test, in seconds


@pytest.fixture(scope="module")
def server(gen_model, stream_model, cache_env):
    srv = Server("--model", gen_model, "--stream-model", stream_model, "--api-key", KEY, "--max-batch", "2",
                 "--request-timeout", str(TIMEOUT), "--idle-timeout", str(TIMEOUT), env=cache_env)
    yield srv
    assert srv.stop() == 0, srv.stderr
    assert "Traceback" not in srv.stderr, srv.stderr


class RawStream:
    """A WebSocket client on websockets' sans-I/O protocol: ``send`` puts all its frames in one
    TCP write; ``events`` reads until the server closes."""

    def __init__(self, port: int, subprotocols: list[str] | None = None, headers: dict | None = None):
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/v1/stream"),
                                    subprotocols=subprotocols, max_size=None)
        request = self.proto.connect()
        for name, value in (headers if headers is not None else AUTH).items():
            request.headers[name] = value
        self.proto.send_request(request)
        self._flush()
        self.pending: list = []
        while not self.proto.events_received() and self.proto.handshake_exc is None:
            self._read()
        if self.proto.handshake_exc is not None:
            raise self.proto.handshake_exc
        self.subprotocol = self.proto.subprotocol

    def _flush(self) -> None:
        data = b"".join(self.proto.data_to_send())
        if data:
            self.sock.sendall(data)

    def _read(self) -> bool:
        data = self.sock.recv(1 << 16)
        if data:
            self.proto.receive_data(data)
        else:
            self.proto.receive_eof()
        self._flush()
        return bool(data)

    def send(self, *frames: str | bytes | dict) -> None:
        for frame in frames:
            if isinstance(frame, bytes):
                self.proto.send_binary(frame)
            else:
                self.proto.send_text((frame if isinstance(frame, str) else json.dumps(frame)).encode())
        self._flush()  # every frame in one write

    def events(self) -> tuple[list[dict], int | None]:
        """The server's JSON events until it closes, and its close code."""
        events, self.pending = self.pending, []
        while True:
            events += self._texts()
            if self.proto.close_rcvd is not None or not self._read():
                events += self._texts()
                self.sock.close()
                return events, self.proto.close_rcvd.code if self.proto.close_rcvd else None

    def next_event(self) -> dict:
        while not self.pending:
            self.pending += self._texts()
            if not self.pending:
                assert self._read(), "the server closed the connection"
        return self.pending.pop(0)

    def quiet(self, seconds: float) -> list[dict]:
        """The events that come until the server has sent nothing for ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            while self._read():
                pass
        except TimeoutError:
            pass
        finally:
            self.sock.settimeout(60)
        events, self.pending = self.pending + self._texts(), []
        return events

    def _texts(self) -> list[dict]:
        from websockets.frames import Opcode

        return [json.loads(f.data) for f in self.proto.events_received() if f.opcode == Opcode.TEXT]

    def drop(self) -> None:
        """Leave without a close frame (a crashed or killed client)."""
        self.sock.close()


def one_by_one(server, frames: list, first: dict | None = None) -> tuple[list[dict], int | None]:
    """Each frame in its own write, once the answers to the one before have come (the server
    has been quiet for a while): the reference for frames sent together."""
    ws = RawStream(server.port)
    events = []
    for frame in [first or {"prompt": PROMPT}, *frames[:-1]]:
        ws.send(frame)
        events += ws.quiet(0.5)
    ws.send(frames[-1])
    rest, code = ws.events()
    return events + rest, code


def together(server, frames: list, first: dict | None = None) -> tuple[list[dict], int | None]:
    ws = RawStream(server.port)
    ws.send(first or {"prompt": PROMPT}, *frames)
    return ws.events()


def assert_same_events(got: list[dict], want: list[dict]) -> None:
    assert [e.get("event") for e in got] == [e.get("event") for e in want]
    for g, w in zip(got, want):
        if g.get("event") == "error":
            assert g == w
        elif g.get("event") == "prompt":
            assert_same_verdict({k: v for k, v in g.items() if k != "event"},
                                {k: v for k, v in w.items() if k != "event"})
    assert_same_lines(token_lines(got), token_lines(want))
    if want and want[-1].get("event") == "verdict":
        assert_same_lines(got[-1:], want[-1:])


def metric(server, name: str, **labels) -> float:
    status, _, text = server.request("GET", "/metrics", headers=AUTH)
    assert status == 200
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


def wait_for(condition, seconds: float = 60) -> None:
    """Poll ``condition`` (the server's log lines are read by a thread, its metrics a moment later)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- frames that arrive together ------------------------------------------------------------
@pytest.mark.parametrize("frames, n_errors", [
    # Past the context: only that frame fails (it used to fail the two after it, and the close).
    ([{"tokens": [5] * 9000}, {"tokens": [2]}, {"finish": True}], 1),
    ([{"tokens": [11, 12]}, {"tokens": [10 ** 9]}, {"tokens": [13]}, {"rollback": 1}, {"tokens": [14, 15]},
      {"finish": True, "tokens": [16]}], 1),
    ([{"text": "Bread needs"}, {"tokens": [1]}, {"text": " yeast, salt"}, "{not json", b"\x00\x01",
      {"text": " and time.", "finish": True}], 3),
], ids=["over-context", "tokens", "text"])
def test_frames_sent_together_are_judged_as_if_sent_one_by_one(server, frames, n_errors):
    events, code = together(server, frames)
    want, want_code = one_by_one(server, frames)
    assert code == want_code == 1000
    assert events[-1]["event"] == "verdict"
    assert_same_events(events, want)
    assert len([e for e in events if e.get("event") == "error"]) == n_errors


def test_the_over_context_frame_names_its_tokens(server):
    events, _ = together(server, [{"tokens": [5] * 9000}, {"tokens": [2]}, {"finish": True}])
    error = next(e for e in events if e.get("event") == "error")
    assert error["status"] == 400 and error["error"]["code"] == "context_length_exceeded"
    assert "9000 more tokens" in error["error"]["message"]
    assert len(token_lines(events)) == 1 and events[-1]["event"] == "verdict"  # the [2] frame alone


@pytest.mark.parametrize("last", [{"finish": True, "tokens": [10 ** 9]}, {"finish": True, "text": 5},
                                  {"finish": True, "tokens": [5] * 9000}], ids=["bad-id", "bad-text", "too-long"])
def test_a_failing_finish_ends_with_its_error(server, last):
    events, code = together(server, [{"tokens": [11, 12]}, last])
    assert code == 1008
    assert [e.get("event") for e in events] == ["prompt", None, None, "error"]
    assert events[-1]["status"] == 400


# -- binary frames ------------------------------------------------------------------------
def test_binary_frames_are_errors_and_the_stream_goes_on(server):
    events, code = together(server, [{"text": "Bread needs yeast."}, b"\xff" * 10, {"finish": True}])
    assert code == 1000 and events[-1]["event"] == "verdict"
    error = next(e for e in events if e.get("event") == "error")
    assert error["status"] == 400 and error["error"]["code"] == "invalid_frame"


def test_a_binary_opening_frame_is_a_400(server):
    events, code = together(server, [], first=b'{"prompt": "hi"}')
    assert code == 1008
    assert len(events) == 1 and events[0]["status"] == 400 and events[0]["error"]["code"] == "invalid_frame"


# -- clients that leave ---------------------------------------------------------------------
def test_a_stream_whose_client_leaves_is_499(server):
    before = metric(server, "edgeguard_requests_total", endpoint="/v1/stream", status="499")
    ws = RawStream(server.port)
    ws.send({"prompt": PROMPT}, *[{"text": "Some words that go on and on. " * 20}] * 40)
    ws.next_event()
    ws.drop()
    wait_for(lambda: metric(server, "edgeguard_requests_total", endpoint="/v1/stream", status="499") == before + 1)
    wait_for(lambda: metric(server, "edgeguard_streams_live") == 0)
    events, code = together(server, [{"text": "Fine.", "finish": True}])  # its session was freed
    assert code == 1000 and events[-1]["event"] == "verdict"


def raw_post(server, path: str, body: bytes, declared: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared or len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def test_a_client_leaving_during_upload_is_499_not_500(server):
    before = metric(server, "edgeguard_requests_total", endpoint="/v1/check", status="499")
    sock = raw_post(server, "/v1/check", b'{"prompt": "hel', declared=200)
    time.sleep(0.3)
    sock.close()
    wait_for(lambda: metric(server, "edgeguard_requests_total", endpoint="/v1/check", status="499") == before + 1)
    assert metric(server, "edgeguard_requests_total", endpoint="/v1/check", status="500") == 0
    wait_for(lambda: any(re.search(r"POST /v1/check 499 ", line) for line in server.lines), seconds=10)


def test_work_for_a_client_that_left_is_cancelled(server):
    texts = [f"Question {i}: " + "how long should bread dough rise before baking it " * 12 for i in range(64)]
    cancelled = metric(server, "edgeguard_items_cancelled_total", engine="gen")
    sock = raw_post(server, "/v1/moderations", json.dumps({"input": texts}).encode())
    wait_for(lambda: metric(server, "edgeguard_queue_depth", engine="gen") > 0)
    sock.close()
    wait_for(lambda: metric(server, "edgeguard_queue_depth", engine="gen") == 0)
    dropped = metric(server, "edgeguard_items_cancelled_total", engine="gen") - cancelled
    assert 0 < dropped <= 64
    wait_for(lambda: metric(server, "edgeguard_requests_total", endpoint="/v1/moderations", status="499") >= 1)
    status, _, answer = server.post("/v1/check", {"prompt": "hi"}, headers=AUTH)
    assert status == 200, answer


# -- clients that stall ---------------------------------------------------------------------
def test_a_half_sent_request_times_out_with_408(server):
    sock = raw_post(server, "/v1/check", b'{"prompt": "hel', declared=200)
    t0 = time.monotonic()
    answer = b""
    while chunk := sock.recv(4096):  # the server answers, then closes the connection
        answer += chunk
    assert TIMEOUT - 0.5 < time.monotonic() - t0 < TIMEOUT + 20
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_an_idle_stream_is_closed_with_408(server):
    before = metric(server, "edgeguard_requests_total", endpoint="/v1/stream", status="408")
    ws = RawStream(server.port)
    ws.send({"prompt": PROMPT}, {"text": "Half a sentence"})
    events, code = ws.events()
    assert code == 1008
    assert events[0]["event"] == "prompt" and events[-1]["status"] == 408
    assert events[-1]["error"]["code"] == "idle_timeout"
    wait_for(lambda: metric(server, "edgeguard_requests_total", endpoint="/v1/stream", status="408") == before + 1)


def test_a_stream_owed_answers_is_not_idle(server):
    # More frames than the engine judges in TIMEOUT seconds: the client waits, it is not idle.
    frames = [{"text": "A long answer that keeps going and going. " * 30} for _ in range(30)]
    events, code = together(server, [*frames, {"finish": True}])
    assert code == 1000 and events[-1]["event"] == "verdict"


# -- request heads that never end (slowloris) -----------------------------------------------
HALF_HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"


def until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and the seconds that took."""
    t0 = time.monotonic()
    answer = b""
    while chunk := sock.recv(4096):
        answer += chunk
    return answer, time.monotonic() - t0


def assert_head_408(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "--request-timeout" in error["message"]


def test_a_half_sent_head_times_out_with_408(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(HALF_HEAD)
    answer, seconds = until_closed(sock)
    assert TIMEOUT - 0.2 < seconds < TIMEOUT + 5
    assert_head_408(answer)
    wait_for(lambda: any(re.search(r"- - 408 \d", line) for line in server.lines), seconds=10)


def test_a_connection_that_sends_nothing_is_closed(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    answer, seconds = until_closed(sock)
    assert answer == b""  # nothing asked, nothing answered (browsers preconnect)
    assert TIMEOUT - 0.2 < seconds < TIMEOUT + 5


def test_a_head_sent_byte_by_byte_gets_no_more_time(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.settimeout(0.25)
    head = HALF_HEAD + b"X-Long: " + b"a" * 1000
    t0 = time.monotonic()
    answer = b""
    for i in range(len(head)):
        try:
            sock.sendall(head[i:i + 1])
            chunk = sock.recv(4096)  # waits 0.25 s: one byte each 0.25 s at most
        except TimeoutError:
            continue
        except OSError:  # reset: the server has closed
            break
        answer += chunk
        if not chunk:
            break
    seconds = time.monotonic() - t0
    assert TIMEOUT - 0.2 < seconds < TIMEOUT + 5
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")


def test_keep_alive_connections_and_slow_heads_that_end_still_work(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    for pause in (0, TIMEOUT + 0.5):  # idle between requests: uvicorn's keep-alive (5 s), not the head's clock
        time.sleep(pause)
        conn.request("GET", "/health")
        answer = conn.getresponse()
        assert answer.status == 200 and json.loads(answer.read())
        if pause == 0:
            first = conn.sock
    assert conn.sock is first  # one connection throughout
    conn.close()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(HALF_HEAD)
    time.sleep(TIMEOUT / 2)
    sock.sendall(b"Connection: close\r\n\r\n")
    answer, _ = until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_stream_outlives_the_head_timeout(server):
    ws = RawStream(server.port)
    ws.send({"prompt": PROMPT})
    t0 = time.monotonic()
    while time.monotonic() - t0 < TIMEOUT + 1:
        ws.send({"text": " and more"})
        ws.quiet(0.5)  # frames within --idle-timeout
    ws.send({"finish": True})
    events, code = ws.events()
    assert code == 1000 and events[-1]["event"] == "verdict"


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_both_uvicorn_parsers_time_out_heads(parser):
    """uvicorn's h11 protocol is the one `edgeguard serve` runs where httptools is missing: the
    same cases on a bare uvicorn with a stand-in app."""
    import threading

    import uvicorn

    from edgeguard.server.slow_clients import H11HeadTimeout, httptools_head_timeout

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    base = H11HeadTimeout if parser == "h11" else httptools_head_timeout()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, http=type("Protocol", (base,), {"head_timeout": 1.0}),
                                       lifespan="off", log_level="warning", timeout_keep_alive=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: uv.started, 30)
        half, silent, kept = (socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3))
        half.sendall(HALF_HEAD)
        kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).endswith(b"\r\n\r\nok")
        time.sleep(1.5)  # past the head timeout, within keep-alive
        kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).endswith(b"\r\n\r\nok")
        kept.sendall(b"GET / HTTP/1.1\r\n")  # a head begun after an answer has its own clock
        for sock, want in ((half, True), (silent, False), (kept, True)):
            answer, _ = until_closed(sock)
            if want:
                assert_head_408(answer)
            else:
                assert answer == b""
    finally:
        uv.should_exit = True
        thread.join(30)

# -- the API key from a browser -------------------------------------------------------------
def test_api_key_as_a_websocket_subprotocol(server):
    from websockets.exceptions import InvalidStatus

    ws = RawStream(server.port, subprotocols=["edgeguard", f"bearer.{KEY}"], headers={})
    assert ws.subprotocol == "edgeguard"  # never the key: browsers require one offered protocol back
    ws.send({"prompt": PROMPT}, {"text": "Fine.", "finish": True})
    events, code = ws.events()
    assert code == 1000 and events[-1]["event"] == "verdict"
    for offered in (["edgeguard", "bearer.wrong"], ["edgeguard"]):
        with pytest.raises(InvalidStatus) as e:
            RawStream(server.port, subprotocols=offered, headers={})
        assert e.value.response.status_code == 401
