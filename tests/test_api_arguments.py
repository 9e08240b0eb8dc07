"""The Python API refuses bad arguments with a UsageError whose message is the one the server
answers for the same input (edgeguard.engines.inputs is the one place both check), and both
accept the same texts: NUL and lone surrogates are refused by both, ordinary text by neither."""

from __future__ import annotations

import json

import pytest

import edgeguard
from edgeguard.errors import UsageError
from tests.test_server import Server, cache_env, cli_cache, gen_model, stream_model  # noqa: F401

pytestmark = pytest.mark.server

# Values a JSON body can carry, each refused as a prompt (the API's check(prompt) and the
# server's {"prompt": ...} take a text or a list of {"role", "content"} messages).
BAD_PROMPTS = [
    None,
    123,
    True,
    {"role": "user", "content": "hi"},
    "a\ud800b",
    "a\x00b",
    [],
    ["just text"],
    [{"role": "system", "content": "hi"}],
    [{"role": "user"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": "a\x00"}],
    [{"role": "user", "content": "x\udfff"}],
]
BAD_RESPONSES = [5, ["a"], "b\x00", "\ud83d"]


@pytest.fixture(scope="module")
def server(gen_model, stream_model, cache_env):
    srv = Server("--model", gen_model, "--stream-model", stream_model, env=cache_env)
    yield srv
    assert srv.stop() == 0, srv.stderr


@pytest.fixture(scope="module")
def gen(gen_model):
    with edgeguard.load(gen_model, engine="gen", n_threads=1) as guard:
        yield guard


@pytest.fixture(scope="module")
def stream(stream_model):
    with edgeguard.load(stream_model, engine="stream", n_threads=1) as guard:
        yield guard


def body(value) -> bytes:
    # ensure_ascii keeps lone surrogates as \ud800 escapes, as a hostile client would send them.
    return json.dumps(value, ensure_ascii=True).encode()


def server_error(server, payload: dict, model: str) -> str:
    status, _, answer = server.post("/v1/check", raw=body({**payload, "model": model}))
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_input", answer
    return answer["error"]["message"]


def api_error(call, *args) -> str:
    with pytest.raises(UsageError) as e:
        call(*args)
    return str(e.value)


@pytest.mark.parametrize("prompt", BAD_PROMPTS, ids=repr)
def test_check_prompt_messages_equal_the_servers(server, gen, stream, prompt):
    for guard in (gen, stream):
        assert api_error(guard.check, prompt) == server_error(server, {"prompt": prompt}, guard.engine)
    if isinstance(prompt, list):  # the server's own field for a list of messages
        assert api_error(gen.check, prompt) == server_error(server, {"messages": prompt}, "gen")


@pytest.mark.parametrize("response", BAD_RESPONSES, ids=repr)
def test_check_response_messages_equal_the_servers(server, gen, response):
    assert api_error(gen.check, "hi", response) == server_error(server, {"prompt": "hi", "response": response},
                                                                "gen")


def test_messages_with_a_response_equal_the_servers(server, gen):
    messages = [{"role": "user", "content": "hi"}]
    want = "give either a list of messages or a prompt and a response, not both"
    assert api_error(gen.check, messages, "there") == want
    assert server_error(server, {"prompt": messages, "response": "there"}, "gen") == want


@pytest.mark.parametrize("value", [b"bytes", bytearray(b"x"), 3.5, object()], ids=repr)
def test_values_json_cannot_carry_are_usage_errors(gen, stream, value):
    for call in (gen.check, gen.tokens, stream.check, stream.session, lambda v: next(gen.check_many([v]))):
        message = api_error(call, value)
        assert message.startswith("prompt must be a string or a list of"), message
    assert "decode them to str first" in api_error(gen.check, b"bytes")


def test_check_many_items_are_checked_alike(gen, server):
    assert api_error(lambda: list(gen.check_many(["fine", None]))) == server_error(server, {"prompt": None}, "gen")


def ws_error(server, first: dict, frame: dict | None = None) -> str:
    """The message of the error event the stream answers (to its opening frame, or to ``frame``)."""
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{server.port}/v1/stream", proxy=None, open_timeout=30) as ws:
        ws.send(body(first).decode())
        if frame is not None:
            assert json.loads(ws.recv(timeout=60))["event"] == "prompt"
            ws.send(body(frame).decode())
        event = json.loads(ws.recv(timeout=60))
        assert event["event"] == "error" and event["status"] == 400, event
        return event["error"]["message"]


@pytest.mark.parametrize("prompt", [None, 5, "a\x00", "\ud800", [], [{"role": "tool", "content": "x"}]], ids=repr)
def test_session_prompt_messages_equal_the_streams(server, stream, prompt):
    assert api_error(stream.session, prompt) == ws_error(server, {"prompt": prompt})
    if isinstance(prompt, list):
        assert api_error(stream.session, prompt) == ws_error(server, {"messages": prompt})


@pytest.mark.parametrize("chunk", [5, True, ["a"], "x\x00y", "\udc80"], ids=repr)
def test_feed_text_messages_equal_the_streams(server, stream, chunk):
    with stream.session("hi") as session:
        want = api_error(session.feed_text, chunk)
        assert session.tokens == ()
    assert want == ws_error(server, {"prompt": "hi"}, {"text": chunk})


@pytest.mark.parametrize("ids", ["abc", 7, [1.5], [True], [-1], [10 ** 9], [{"id": 1}]], ids=repr)
def test_feed_messages_equal_the_streams(server, stream, ids):
    with stream.session("hi") as session:
        want = api_error(session.feed, ids)
        assert session.tokens == ()
    assert want == ws_error(server, {"prompt": "hi"}, {"tokens": ids})


def test_bytes_chunks_are_checked_for_nul(stream):
    with stream.session("hi") as session:
        assert api_error(session.feed_text, b"ab\x00c") == "text contains a NUL character (at byte 2)"
        session.feed_text(b"fine \xc3")  # a cut UTF-8 character waits for its end
        session.feed_text(b"\xa9")
        session.finish()
        assert session.tokens


@pytest.mark.parametrize("text", ["Hello there", "tabs\tand\nnewlines", "emoji 🍞 and ünïcödé", "\u2028\ufeff"])
def test_the_same_texts_are_accepted(server, gen, text):
    gen.check(text)
    status, _, answer = server.post("/v1/check", raw=body({"prompt": text, "model": "gen"}))
    assert status == 200, answer
