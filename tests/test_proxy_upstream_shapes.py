"""`edgeguard serve --upstream` against upstreams that send odd but possible shapes: only judged
text reaches the client, whatever the upstream's answer holds; a shape the guard cannot judge is
the upstream's error (502 / an `upstream_invalid` chunk), never a 500, a traceback or a broken
stream; shapes OpenAI's API allows work. The real server in front of the scripted upstream
(tests/fixtures/upstream.py), the trained Stream fixture as the guard."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fixtures.upstream import Reply, words
from tests.test_proxy import (  # noqa: F401  (fixtures)
    SAFE_ANSWERS,
    SAFE_PROMPT,
    SCRIPTS,
    UNSAFE_ANSWERS,
    _content,
    _raw_stream,
    client,
    cut,
    env,
    guard,
    guard_model,
    upstream,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]


def sse(*chunks: dict, done: bool = True) -> list[bytes]:
    out = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    return out + ([b"data: [DONE]\n\n"] if done else [])


def delta(d: dict, finish: str | None = None) -> dict:
    return {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def whole(message: dict, **extra) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop", **extra}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


def post(srv, key: str, reply: Reply, **body):
    SCRIPTS[key] = [reply]
    return httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                      json={"model": "llm", "messages": [{"role": "user", "content": SAFE_PROMPT}],
                            "x_script": key, **body})


def assert_no_traceback(srv):
    assert "Traceback" not in srv.stderr and "unexpected error" not in srv.stderr, srv.stderr[-3000:]


# -- whole answers: only judged fields reach the client ----------------------------------------------
def test_whole_answer_keeps_only_judged_fields(cut):
    answer = whole({"content": SAFE_ANSWERS[0], "annotations": [{"note": "unjudged text"}], "audio": {"x": 1}},
                   logprobs={"content": [{"token": "unjudged", "logprob": -1.0, "top_logprobs": []}]})
    answer["extra_top_level"] = "unjudged text"
    r = post(cut, "whole-fields", Reply(answer=answer))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": SAFE_ANSWERS[0]}
    assert body["choices"][0]["logprobs"] is None and "unjudged" not in r.text
    assert body["usage"]["total_tokens"] == 3 and body["edgeguard"]["action"] == "none"


def test_whole_cut_leaks_nothing_of_the_answer(cut):
    flagged = UNSAFE_ANSWERS[0]
    answer = whole({"content": flagged, "refusal": None},
                   logprobs={"content": [{"token": w, "logprob": -1.0, "top_logprobs": []} for w in words(flagged)]})
    r = post(cut, "whole-cut-logprobs", Reply(answer=answer))
    body = r.json()
    assert body["edgeguard"]["action"] == "cut" and body["choices"][0]["finish_reason"] == "content_filter"
    assert body["choices"][0]["logprobs"] is None
    assert all(w.strip() not in r.text for w in words(flagged) if len(w.strip()) > 4)


@pytest.mark.parametrize("message", [
    {"content": [{"type": "text", "text": UNSAFE_ANSWERS[0]}]},
    {"content": None, "function_call": {"name": "f", "arguments": json.dumps({"t": UNSAFE_ANSWERS[0]})}},
    {"content": None, "tool_calls": [{"id": "c1", "type": "function",
                                      "function": {"name": "f", "arguments": json.dumps({"t": UNSAFE_ANSWERS[0]})}}]},
    {"content": "", "refusal": UNSAFE_ANSWERS[0]},
], ids=["content-parts", "function-call", "tool-call", "refusal"])
def test_whole_answer_text_in_any_field_is_judged(cut, message):
    r = post(cut, f"whole-{sorted(message)}", Reply(answer=whole(message)))
    body = r.json()
    assert body["edgeguard"]["action"] == "cut", body
    assert body["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"].strip()
    assert UNSAFE_ANSWERS[0][:30] not in r.text


@pytest.mark.parametrize("message", [
    {"content": "ok", "tool_calls": 5},
    {"content": "ok", "tool_calls": "abc"},
    {"content": None, "tool_calls": [{"function": {"name": "f", "arguments": {"cmd": "x"}}}]},
    {"content": 42},
    {"content": "x\ud83d y"},
    {"content": "a\x00b"},
    {"content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
], ids=["tool-calls-int", "tool-calls-str", "arguments-object", "content-number", "lone-surrogate", "nul",
        "image-part"])
def test_whole_answer_the_guard_cannot_judge_is_502(cut, message):
    r = post(cut, f"whole-bad-{json.dumps(message)}", Reply(answer=whole(message)))
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_invalid"
    assert_no_traceback(cut)


# -- streamed answers ---------------------------------------------------------------------------
def test_surrogate_pair_split_across_chunks_is_joined(cut):
    raw = sse(delta({"content": "Stir the soup "}), delta({"content": "\ud83d"}), delta({"content": "\ude00 now."}),
              delta({}, "stop"))
    events = _raw_stream(cut, "split-pair", Reply(raw=raw))
    assert events[-1] == "[DONE]", events
    assert _content(events) == "Stir the soup \U0001F600 now."
    assert_no_traceback(cut)


@pytest.mark.parametrize("bad", [
    {"content": "\ud83d"},  # a high surrogate, then a chunk that does not complete it
    {"content": "\ude00"},
    {"content": 42},
    {"content": ["a"]},
    {"tool_calls": 5},
    {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]},
], ids=["half-pair", "low-surrogate", "number", "list", "tool-calls-int", "arguments-object"])
def test_streamed_shapes_the_guard_cannot_judge_end_with_an_error_chunk(cut, bad):
    raw = sse(delta({"content": "Stir the"}), delta(bad), delta({"content": " soup."}), delta({}, "stop"))
    events = _raw_stream(cut, f"bad-{json.dumps(bad)}", Reply(raw=raw))
    assert "error" in events[-1] and events[-1]["error"]["code"] == "upstream_invalid", events
    assert "[DONE]" not in events
    assert _content(events) in ("", "Stir", "Stir the")
    assert_no_traceback(cut)


def test_null_fields_and_a_null_error_are_a_normal_answer(cut):
    raw = sse({**delta({"content": None, "role": "assistant"}), "error": None},
              delta({"content": SAFE_ANSWERS[0], "reasoning_content": None, "tool_calls": None}), delta({}, "stop"))
    events = _raw_stream(cut, "nulls", Reply(raw=raw))
    assert events[-1] == "[DONE]" and _content(events) == SAFE_ANSWERS[0], events


def test_last_event_without_its_blank_line_ends_the_answer(cut):
    raw = sse(delta({"content": SAFE_ANSWERS[0]}), done=False)
    raw.append(b"data: " + json.dumps(delta({"content": " Done."}, "stop")).encode())
    events = _raw_stream(cut, "no-blank-line", Reply(raw=raw))
    assert events[-1] == "[DONE]", events
    assert _content(events) == SAFE_ANSWERS[0] + " Done."


def test_gzip_compressed_stream(cut):
    events = _raw_stream(cut, "gzip", Reply(words(SAFE_ANSWERS[0]), gzip=True))
    assert events[-1] == "[DONE]", events
    assert _content(events) == SAFE_ANSWERS[0]


def test_interleaved_tool_call_arguments_go_to_their_own_call(cut):
    def call(index, arguments, head=False):
        c = {"index": index, "function": {"arguments": arguments}}
        if head:
            c.update(id=f"call{index}", type="function")
            c["function"]["name"] = f"f{index}"
        return delta({"tool_calls": [c]})

    raw = sse(delta({"role": "assistant", "content": None}), call(0, "", True), call(0, '{"a"'), call(1, "", True),
              call(1, '{"b"'), call(0, ": 1}"), call(1, ": 2}"), delta({}, "tool_calls"))
    SCRIPTS["interleaved"] = [Reply(raw=raw)]
    calls: dict[int, dict] = {}
    for chunk in client(cut).chat.completions.create(model="llm", messages=[{"role": "user", "content": SAFE_PROMPT}],
                                                     stream=True, extra_body={"x_script": "interleaved"}):
        for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            got = calls.setdefault(c.index, {"name": None, "arguments": ""})
            got["name"] = got["name"] or (c.function.name if c.function else None)
            got["arguments"] += (c.function.arguments or "") if c.function else ""
    assert calls == {0: {"name": "f0", "arguments": '{"a": 1}'}, 1: {"name": "f1", "arguments": '{"b": 2}'}}


def test_a_redirect_is_not_followed(cut):
    for stream in (True, False):
        r = post(cut, f"redirect-{stream}", Reply(status=302, error={"moved": True}), stream=stream)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_invalid", r.text
        assert "redirect" in r.json()["error"]["message"]


# -- client requests ---------------------------------------------------------------------------
def test_stream_null_is_a_whole_answer(cut):
    r = post(cut, "stream-null", Reply(words(SAFE_ANSWERS[0])), stream=None)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == SAFE_ANSWERS[0]


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": "a", "tool_calls": 5},
    {"role": "assistant", "content": "a", "function_call": "f"},
])
def test_malformed_tool_calls_in_a_request_are_400(cut, message):
    r = httpx.post(f"{cut.url}/v1/chat/completions", timeout=30,
                   json={"model": "llm", "messages": [{"role": "user", "content": SAFE_PROMPT}, message,
                                                      {"role": "user", "content": "go on"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input", r.text
    assert_no_traceback(cut)
