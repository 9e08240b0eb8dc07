"""`WebSocket /v1/stream` on the real server with the `websockets` client, compared token by
token with `edgeguard stream --json`."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

from edgeguard.cli import main
from tests.test_server import TOL, Server, assert_same_verdict, cache_env, cli_cache, stream_model  # noqa: F401

PROMPT = "How do I bake bread?"
RESPONSES = [
    "Sure, here is how to do it. First, mix flour and water.",
    "I cannot help with that request, sorry!",
    "Step 1: find the door. Step 2: use the key 🔑 and open it.",
    "Bread needs yeast, salt, water and time.",
]


@pytest.fixture(scope="module")
def server(stream_model, cache_env):
    srv = Server("--stream-model", stream_model, "--max-streams", "8", env=cache_env)
    yield srv
    assert srv.stop() == 0, srv.stderr


def cli_stream(model: str, prompt: str, response: str) -> list[dict]:
    result = CliRunner().invoke(main, ["stream", "--model", model, "--prompt", prompt, "--response", response,
                                       "--json"])
    assert result.exit_code in (0, 1), result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def connect(server, **kw):
    from websockets.sync.client import connect as ws_connect

    return ws_connect(f"ws://127.0.0.1:{server.port}/v1/stream", proxy=None, open_timeout=30, **kw)


def run(server, frames: list[dict], first: dict | None = None) -> tuple[list[dict], int | None]:
    """Send the frames (then read everything until the server closes): the events, the close code."""
    from websockets.exceptions import ConnectionClosed

    events = []
    with connect(server) as ws:
        ws.send(json.dumps(first or {"prompt": PROMPT}))
        for frame in frames:
            ws.send(json.dumps(frame))
        try:
            while True:
                events.append(json.loads(ws.recv(timeout=60)))
        except ConnectionClosed:
            pass
        return events, ws.close_code


def token_lines(events):
    return [e for e in events if "event" not in e]


def assert_same_lines(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key, value in w.items():
            if key in ("scores", "category_scores"):  # numbers: within TOL (a crowded guard
                # runs flash attention, which rounds differently from a lone session's)
                for name, p in value.items():
                    assert g[key][name] == pytest.approx(p, abs=TOL)
            elif key == "prompt":
                assert_same_verdict(g[key], value)
            else:
                assert g[key] == value, (key, g, w)


def chunks(text: str, size: int) -> list[dict]:
    return [{"text": text[i: i + size]} for i in range(0, len(text), size)]


@pytest.mark.parametrize("response", RESPONSES[:2])
def test_text_stream_matches_stream_json(server, stream_model, response):
    want = cli_stream(stream_model, PROMPT, response)
    events, code = run(server, chunks(response, 7) + [{"finish": True}])
    assert code == 1000
    assert events[0]["event"] == "prompt"
    assert_same_verdict({k: v for k, v in events[0].items() if k != "event"}, want[-1]["prompt"])
    assert_same_lines(token_lines(events), want[:-1])
    assert events[-1]["event"] == "verdict"
    assert_same_lines([events[-1]], [want[-1]])
    flagged = [i for i, e in enumerate(events) if e.get("event") == "flagged"]
    if want[-1]["flagged"]:
        assert len(flagged) == 1  # once, and only after the token that triggered it was sent
        before = token_lines(events[: flagged[0]])
        assert before[-1]["index"] >= want[-1]["flagged_at"]
        assert events[flagged[0]]["flagged_at"] == want[-1]["flagged_at"]
    else:
        assert flagged == []


def test_some_response_flags(server, stream_model):
    # The random fixture flags this one (the test above checks the event then); keep it so.
    assert cli_stream(stream_model, PROMPT, RESPONSES[0])[-1]["flagged"]


def test_token_frames_and_rollback(server, stream_model):
    want = cli_stream(stream_model, PROMPT, RESPONSES[2])
    ids = [line["token"] for line in want[:-1]]
    frames = [{"tokens": ids[:3]}, {"tokens": ids[3:8]}, {"rollback": 2}, {"tokens": ids[6:]}, {"finish": True}]
    events, code = run(server, frames)
    assert code == 1000
    rollback = [e for e in events if e.get("event") == "rollback"]
    assert len(rollback) == 1 and rollback[0]["tokens"] == 6
    lines = token_lines(events)
    assert_same_lines(lines[:8], want[:8])
    assert_same_lines(lines[8:], want[6:-1])  # after the rollback, as if never sent
    assert_same_lines([events[-1]], [want[-1]])


def test_messages_prompt(server):
    events, code = run(server, [{"text": "Hello.", "finish": True}],
                       first={"messages": [{"role": "user", "content": PROMPT}]})
    by_prompt, _ = run(server, [{"text": "Hello.", "finish": True}])
    assert code == 1000
    assert_same_lines(token_lines(events), token_lines(by_prompt))
    assert_same_lines([events[-1]], [by_prompt[-1]])


def test_eight_concurrent_streams_equal_sequential(server):
    responses = (RESPONSES * 2)[:8]
    sequential = [run(server, chunks(r, 5) + [{"finish": True}])[0] for r in responses]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda r: run(server, chunks(r, 5) + [{"finish": True}])[0], responses))
    for got, want in zip(concurrent, sequential):
        assert_same_lines(token_lines(got), token_lines(want))
        # Frames that wait together are judged together, in either run (it depends on timing),
        # and a "flagged" event carries the session's state after the frames judged with it: it
        # may come a few token lines later, with the state of then (e.g. Controversial at token 4
        # in one run, Unsafe at token 9 in the other). So the prompt and final verdict events are
        # compared, and each run's flagged event with its own stream: once, after its token.
        events = {name: [e for e in run_events if "event" in e] for name, run_events in
                  (("got", got), ("want", want))}
        assert [e["event"] for e in events["got"]] == [e["event"] for e in events["want"]]
        assert_same_lines([e for e in events["got"] if e["event"] != "flagged"],
                          [e for e in events["want"] if e["event"] != "flagged"])
        for run_events in (got, want):
            for i, e in enumerate(run_events):
                if e.get("event") == "flagged":
                    assert e["flagged"] and token_lines(run_events[:i])[-1]["index"] >= e["flagged_at"]


def test_bad_frames_get_errors_and_change_nothing(server, stream_model):
    want = cli_stream(stream_model, PROMPT, RESPONSES[3])
    bad = ["{not json", json.dumps([1]), json.dumps({"tokens": [10 ** 9]}), json.dumps({"tokens": "abc"}),
           json.dumps({"rollback": -1}), json.dumps({"hello": 1}), json.dumps({"text": 5}),
           json.dumps({"text": "lone \ud800"}), "[" * 50_000 + "]" * 50_000, json.dumps({"rollback": 10 ** 6})]
    from websockets.exceptions import ConnectionClosed

    events = []
    with connect(server) as ws:
        ws.send(json.dumps({"prompt": PROMPT}))
        ws.send(json.dumps({"text": RESPONSES[3][:10]}))  # leaves text pending: bad frames keep it
        for raw in bad:
            ws.send(raw)
        ws.send(json.dumps({"tokens": [1, 2]}))  # this stream takes text
        ws.send(json.dumps({"text": RESPONSES[3][10:], "finish": True}))
        try:
            while True:
                events.append(json.loads(ws.recv(timeout=60)))
        except ConnectionClosed:
            pass
        assert ws.close_code == 1000
    errors = [e for e in events if e.get("event") == "error"]
    assert len(errors) == len(bad) + 1
    for e in errors:
        assert e["status"] == 400 and set(e["error"]) == {"message", "type", "code"}
    assert_same_lines(token_lines(events), want[:-1])
    assert_same_lines([events[-1]], [want[-1]])


@pytest.mark.parametrize("first", [{"response": "x"}, {"prompt": 5}, {"prompt": "   "}, "nope"])
def test_bad_opening_frame_closes(server, first):
    from websockets.exceptions import ConnectionClosed

    with connect(server) as ws:
        ws.send(first if isinstance(first, str) else json.dumps(first))
        event = json.loads(ws.recv(timeout=60))
        assert event["event"] == "error" and event["status"] == 400
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=60)
        assert ws.close_code == 1008
    assert server.get("/health")[0] == 200


def test_client_vanishing_mid_stream_frees_its_session(server):
    for _ in range(10):  # more than --max-streams: each must have been freed
        with connect(server) as ws:
            ws.send(json.dumps({"prompt": PROMPT}))
            ws.send(json.dumps({"text": "Some text that never finishes"}))
            json.loads(ws.recv(timeout=60))
    events, code = run(server, [{"text": "Fine.", "finish": True}])
    assert code == 1000 and events[-1]["event"] == "verdict"


def test_frame_over_max_body_closes_1009(server):
    """A WebSocket frame over --max-body (1 MiB by default) closes the stream with 1009 (message
    too big), as docs/cli.md says; the server goes on serving."""
    from websockets.exceptions import ConnectionClosed

    with connect(server, max_size=None) as ws:
        ws.send(json.dumps({"prompt": PROMPT}))
        assert json.loads(ws.recv(timeout=60))["event"] == "prompt"
        ws.send(json.dumps({"text": "a" * (1 << 20)}))
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=60)
        assert ws.close_code == 1009
    events, code = run(server, [{"text": "Bread needs time.", "finish": True}])
    assert code == 1000 and events[-1]["event"] == "verdict"


def test_too_many_streams_is_503(stream_model, cache_env):
    from websockets.exceptions import ConnectionClosed

    srv = Server("--stream-model", stream_model, "--max-streams", "1", env=cache_env)
    try:
        with connect(srv) as first:
            first.send(json.dumps({"prompt": PROMPT}))
            assert json.loads(first.recv(timeout=60))["event"] == "prompt"
            with connect(srv) as second:
                second.send(json.dumps({"prompt": PROMPT}))
                event = json.loads(second.recv(timeout=60))
                assert event["status"] == 503 and event["error"]["code"] == "too_many_streams"
                with pytest.raises(ConnectionClosed):
                    second.recv(timeout=60)
                assert second.close_code == 1013
            first.send(json.dumps({"text": "ok", "finish": True}))
            while json.loads(first.recv(timeout=60)).get("event") != "verdict":
                pass
    finally:
        assert srv.stop() == 0, srv.stderr


def test_stream_auth(stream_model, cache_env):
    from websockets.exceptions import InvalidStatus

    srv = Server("--stream-model", stream_model, "--api-key", "k3y", env=cache_env)
    try:
        with pytest.raises(InvalidStatus) as e, connect(srv):
            pass
        assert e.value.response.status_code == 401
        with connect(srv, additional_headers={"Authorization": "Bearer k3y"}) as ws:
            ws.send(json.dumps({"prompt": PROMPT}))
            assert json.loads(ws.recv(timeout=60))["event"] == "prompt"
    finally:
        assert srv.stop() == 0, srv.stderr



def test_check_with_response_on_the_stream_model(server, stream_model):
    want = cli_stream(stream_model, PROMPT, RESPONSES[0])[-1]
    status, _, got = server.post("/v1/check", {"prompt": PROMPT, "response": RESPONSES[0]})
    assert status == 200 and got["engine"] == "stream"
    assert got["flagged_at"] == want["flagged_at"] and got["label"] == want["label"]
    assert got["categories"] == ([want["category"]] if want["category"] else [])
    assert got["flagged"] == want["flagged"]
    assert got["response_tokens"] == len(cli_stream(stream_model, PROMPT, RESPONSES[0])) - 1


def test_models_list_and_no_gen(server):
    assert server.get("/v1/models")[1]["data"] == [
        {"id": "stream", "object": "model", "owned_by": "edgeguard", "engine": "stream"}]
    status, _, body = server.post("/v1/moderations", {"input": "hi", "model": "gen"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
