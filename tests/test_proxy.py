"""`edgeguard serve --upstream`: the real server in a subprocess in front of a scripted upstream
(a real HTTP server streaming SSE one word per chunk, tests/fixtures/upstream.py), the trained
Stream fixture as the guard, the official `openai` client. Where a cut lands is compared with
the Stream session's own `flagged_at` on the whole text, computed here in-process."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from edgeguard.loader import load
from edgeguard.server.proxy.answer import CHARS_PER_TOKEN_MAX, token_cut
from edgeguard.server.proxy.config import DEFAULT_REFUSAL, STEERING
from tests.fixtures.converted import converted
from tests.fixtures.trained import STREAM_EXAMPLES, trained_stream_checkpoint
from tests.fixtures.upstream import Reply, ScriptedUpstream, words
from tests.test_server import Server

pytestmark = [pytest.mark.server, pytest.mark.slow]

SAFE_PROMPT = "How do I bake a lemon cake?"
UNSAFE_PROMPT = next(p for p, _, label, _ in STREAM_EXAMPLES if label == "Unsafe")
SAFE_ANSWERS = [r for p, r, label, span in STREAM_EXAMPLES if label == "Safe" and span is None]
UNSAFE_ANSWERS = [r for p, r, label, span in STREAM_EXAMPLES if label == "Safe" and span is not None]
TAIL = " Stir the soup slowly. Start by reading the manual." * 6  # the upstream would go on after the cut
SAFE_CONTINUATION = " Put the seeds into warm soil. Start by reading the manual."
DELAY = 0.02  # seconds between the upstream's chunks

SCRIPTS: dict[str, list[Reply]] = {}  # x_script -> replies to its first request, then to continuations
SEEN: dict[str, int] = {}


def script(body: dict) -> Reply:
    key = body["x_script"]
    SEEN[key] = SEEN.get(key, 0) + 1
    return SCRIPTS[key][min(SEEN[key], len(SCRIPTS[key])) - 1]


@pytest.fixture(scope="module")
def guard_model():
    return str(converted(trained_stream_checkpoint(), ("f16",)))


@pytest.fixture(scope="module")
def guard(guard_model):
    with load(guard_model, engine="stream") as g:
        yield g


@pytest.fixture(scope="module")
def upstream():
    with ScriptedUpstream(script) as up:
        yield up


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"EDGEGUARD_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


def _proxy(guard_model, upstream_url, env, *args):
    srv = Server("--stream-model", guard_model, "--upstream", upstream_url, "--upstream-timeout", "3", *args, env=env)
    return srv


@pytest.fixture(scope="module")
def cut(guard_model, upstream, env):
    srv = _proxy(guard_model, upstream.url, env)
    yield srv
    assert srv.stop() == 0, srv.stderr


@pytest.fixture(scope="module")
def care(guard_model, upstream, env):
    srv = _proxy(guard_model, upstream.url, env, "--on-flag", "care", "--holdback", "2")
    yield srv
    assert srv.stop() == 0, srv.stderr


def client(srv, **kw):
    from openai import OpenAI

    return OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, **kw)


def ask(srv, key: str, replies: list[Reply], prompt: str = SAFE_PROMPT, **kw):
    """Stream one answer through the proxy: (content text, number of content chunks, last chunk)."""
    SCRIPTS[key] = replies
    texts, last = [], None
    for chunk in client(srv).chat.completions.create(model="llm", messages=[{"role": "user", "content": prompt}],
                                                     stream=True, extra_body={"x_script": key}, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
        last = chunk
    return "".join(texts), len(texts), last


def tokens_text(guard, prompt: str, answer: str) -> tuple[list[str], int | None]:
    """The answer's per-token texts and its flagged_at, judged whole by a fresh session."""
    verdict = guard.check(prompt, answer)
    with guard.session(prompt) as session:
        verdicts = session.feed(guard.response_tokens(answer))
    return [v.text for v in verdicts], verdict.flagged_at


def stream_record(upstream, n_before: int):
    record = upstream.streams[n_before]
    assert record.ended.wait(10)
    return record


# -- nothing flagged --------------------------------------------------------------------------
def test_safe_answers_pass_exactly_and_as_they_come(cut, upstream, guard):
    for i, answer in enumerate(SAFE_ANSWERS):
        text, n_chunks, last = ask(cut, f"safe{i}", [Reply(words(answer), delay=DELAY)])
        assert text == answer
        assert n_chunks >= len(words(answer)) // 3  # released as judged, not in one burst
        info = last.model_extra["edgeguard"]
        assert info["action"] == "none" and info["answer"]["flagged"] is False and info["flagged_at"] is None
        assert info["prompt"]["label"] == "Safe"
        assert last.choices[0].finish_reason == "stop"
        assert guard.check(SAFE_PROMPT, answer).flagged is False


def test_a_burst_is_released_a_decode_call_at_a_time(cut, guard):
    """An upstream that sends the whole answer at once (a burst, as after a stall): each step
    judges at most one llama.cpp call's tokens and releases them, so the client gets the answer
    in chunks of about that many tokens (plus one held token, plus tokenization at the cuts), not
    in one burst after the whole is judged."""
    answer = SAFE_ANSWERS[0]
    SCRIPTS["burst"] = [Reply([answer])]
    stream = client(cut).chat.completions.create(model="llm", messages=[{"role": "user", "content": SAFE_PROMPT}],
                                                 stream=True, extra_body={"x_script": "burst"})
    chunks = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(chunks) == answer
    call = guard.call_tokens
    if call is None:
        pytest.skip("streamed tokens are not decoded a few per call on a GPU")
    assert len(guard.response_tokens(answer)) > 2 * (call + 2)
    sizes = [len(guard.response_tokens(t)) for t in chunks]
    assert max(sizes) <= call + 2, sizes


@pytest.mark.parametrize("text", ["Stir the soup slowly. Put the seeds into warm soil.", "\U0001F600" * 12,
                                  "\u6f22\u5b57\u306e\u30c6\u30ad\u30b9\u30c8" * 4, " " * 300 + "x", "a", ""])
def test_a_step_cuts_the_text_at_a_token_boundary(guard, text):
    """The proxy's step cut: the first n tokens' characters; never inside a character, at least
    one character of a non-empty text, all of a text with n tokens or fewer."""
    ids = guard.vocab.tokenize(text)
    for n in (1, 2, 3, 7):
        c = token_cut(guard.vocab, text, n)
        assert (c == 0) == (text == "") and c <= len(text)
        head = guard.vocab.tokenize(text[:c])
        assert len(head) <= max(n, len(guard.vocab.tokenize(text[:1]))), (n, c)
        if text.isascii() and len(text) <= n * CHARS_PER_TOKEN_MAX:
            assert head == ids[:n] and (c == len(text)) == (len(ids) <= n), (n, c)


def test_step_cuts_of_random_texts(guard):
    """The same properties over random mixes of letters, digits, whitespace, accents (composed
    and combining), CJK, emoji sequences, Arabic and special-token text."""
    alphabet = [*"abc xyz.,!?\n\t  0123", "\u00e9", "e\u0301", "\u6f22", "\u30c6", "\U0001F600", "\u200d",
                "\U0001F469\u200d\U0001F4BB", "\u0627", "<|im_end|>", "'s", "\r\n"]
    rng = random.Random(7)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for n in (1, 3, 7):
            c = token_cut(guard.vocab, text, n)
            assert (c == 0) == (text == "") and c <= len(text), (text, n)
            assert len(guard.vocab.tokenize(text[:c])) <= max(n, len(guard.vocab.tokenize(text[:1]))), (text, n, c)


def test_not_streamed_safe_answer_is_the_upstream_message(cut):
    SCRIPTS["whole-safe"] = [Reply(words(SAFE_ANSWERS[0]))]
    result = client(cut).chat.completions.create(model="llm", messages=[{"role": "user", "content": SAFE_PROMPT}],
                                                 extra_body={"x_script": "whole-safe"})
    assert result.choices[0].message.content == SAFE_ANSWERS[0]
    assert result.choices[0].finish_reason == "stop"
    assert result.model_extra["edgeguard"]["action"] == "none"
    assert result.usage.completion_tokens == len(words(SAFE_ANSWERS[0]))  # the upstream's own fields pass


# -- cut ----------------------------------------------------------------------------------
@pytest.mark.parametrize("answer", UNSAFE_ANSWERS)
def test_cut_lands_before_the_flagged_pair(cut, upstream, guard, answer):
    texts, flagged_at = tokens_text(guard, SAFE_PROMPT, answer)
    assert flagged_at is not None
    before = len(upstream.streams)
    whole = answer + TAIL
    text, _, last = ask(cut, f"cut-{answer[:20]}", [Reply(words(whole), delay=DELAY)])
    # Everything before the flagged pair, and nothing of it: the debounce's pair is tokens
    # flagged_at-1 and flagged_at.
    assert text == "".join(texts[: flagged_at - 1]) + DEFAULT_REFUSAL
    assert last.choices[0].finish_reason == "content_filter"
    info = last.model_extra["edgeguard"]
    assert info["action"] == "cut" and info["flagged_at"] == flagged_at
    assert info["answer"]["label"] == "Unsafe" and info["answer"]["category"] == "Violent"
    record = stream_record(upstream, before)
    assert record.closed_early and record.sent < record.planned  # the upstream connection was closed


def test_under_a_loose_policy_only_unsafe_tokens_wait_and_the_cut_still_lands_before_the_pair(
        guard_model, upstream, env):
    """Under ``loose`` a Controversial token cannot start a flagged pair, so it is released as soon
    as it is judged; an Unsafe pair is still cut before its first token."""
    srv = _proxy(guard_model, upstream.url, env, "--policy", "loose")
    try:
        with load(guard_model, engine="stream", policy="loose") as loose:
            assert loose.pair_labels == {"Unsafe"}
            for i, answer in enumerate(UNSAFE_ANSWERS):
                texts, flagged_at = tokens_text(loose, SAFE_PROMPT, answer)
                assert flagged_at is not None
                text, _, last = ask(srv, f"loose-{i}", [Reply(words(answer + TAIL), delay=DELAY)])
                assert text == "".join(texts[: flagged_at - 1]) + DEFAULT_REFUSAL
                assert last.model_extra["edgeguard"]["flagged_at"] == flagged_at
    finally:
        assert srv.stop() == 0, srv.stderr


def test_cut_not_streamed(cut, guard):
    answer = UNSAFE_ANSWERS[0]
    SCRIPTS["whole-unsafe"] = [Reply(words(answer))]
    result = client(cut).chat.completions.create(model="llm", messages=[{"role": "user", "content": SAFE_PROMPT}],
                                                 extra_body={"x_script": "whole-unsafe"})
    assert result.choices[0].message.content == DEFAULT_REFUSAL
    assert result.choices[0].finish_reason == "content_filter"
    info = result.model_extra["edgeguard"]
    assert info["action"] == "cut" and info["flagged_at"] == guard.check(SAFE_PROMPT, answer).flagged_at


@pytest.mark.parametrize("stream", [True, False])
def test_flagged_prompt_gets_the_refusal_and_no_upstream_text(cut, upstream, stream):
    SCRIPTS["bad-prompt"] = [Reply(words(SAFE_ANSWERS[0] + TAIL), delay=DELAY)]
    result = client(cut).chat.completions.create(model="llm", messages=[{"role": "user", "content": UNSAFE_PROMPT}],
                                                 stream=stream, extra_body={"x_script": "bad-prompt"})
    if stream:
        chunks = list(result)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        last = chunks[-1]
        finish = last.choices[0].finish_reason
    else:
        text, last, finish = result.choices[0].message.content, result, result.choices[0].finish_reason
    assert text == DEFAULT_REFUSAL and finish == "content_filter"
    info = last.model_extra["edgeguard"]
    assert info["action"] == "block" and info["prompt"]["flagged"] and info["answer"] is None


# -- CARE ---------------------------------------------------------------------------------
def test_care_continues_from_the_released_text(care, upstream, guard):
    answer = UNSAFE_ANSWERS[0]
    texts, flagged_at = tokens_text(guard, SAFE_PROMPT, answer)
    released = "".join(texts[: flagged_at - 1 - 2])  # --holdback 2
    first = len(upstream.requests)
    text, _, last = ask(care, "care-once", [Reply(words(answer + TAIL), delay=DELAY),
                                            Reply(words(SAFE_CONTINUATION), delay=DELAY)])
    assert text == released + SAFE_CONTINUATION
    assert last.choices[0].finish_reason == "stop"
    info = last.model_extra["edgeguard"]
    assert info["action"] == "care" and info["care_retries"] == 1 and info["flagged_at"] == flagged_at
    assert info["answer"]["flagged"] is False
    asked = [r for r in upstream.requests[first:] if r.get("x_script") == "care-once"]
    assert len(asked) == 2
    assert asked[1]["messages"] == [{"role": "system", "content": STEERING},
                                    {"role": "user", "content": SAFE_PROMPT},
                                    {"role": "assistant", "content": released}]
    assert asked[1]["stream"] is True and asked[1]["x_script"] == "care-once"


def test_care_cuts_after_its_retries(care, upstream, guard):
    answer = UNSAFE_ANSWERS[1]
    first = len(upstream.requests)
    text, _, last = ask(care, "care-fail", [Reply(words(answer + TAIL), delay=DELAY)])  # every try is unsafe
    info = last.model_extra["edgeguard"]
    assert info["action"] == "cut" and info["care_retries"] == 2
    assert last.choices[0].finish_reason == "content_filter"
    asked = [r for r in upstream.requests[first:] if r.get("x_script") == "care-fail"]
    assert len(asked) == 3
    assert text.endswith(DEFAULT_REFUSAL)
    assert "bomb" not in text and "explosive" not in text


def test_care_falls_back_to_cut_when_the_upstream_cannot_continue(guard_model, env, guard):
    answer = UNSAFE_ANSWERS[0]
    texts, flagged_at = tokens_text(guard, SAFE_PROMPT, answer)
    with ScriptedUpstream(script, llama_server=False) as plain:
        srv = _proxy(guard_model, plain.url, env, "--on-flag", "care")
        try:
            for i in range(2):
                text, _, last = ask(srv, f"nocare{i}", [Reply(words(answer), delay=DELAY)])
                assert text == "".join(texts[: flagged_at - 1]) + DEFAULT_REFUSAL
                assert last.model_extra["edgeguard"]["action"] == "cut"
            assert len([r for r in plain.requests if r["x_script"].startswith("nocare")]) == 2
        finally:
            assert srv.stop() == 0
    assert srv.stderr.count("not a server known to continue") == 1  # said once


# -- concurrency --------------------------------------------------------------------------
def test_8_concurrent_streams_equal_alone(cut, guard):
    answers = [(SAFE_ANSWERS + UNSAFE_ANSWERS)[i % 4] for i in range(8)]
    alone = [ask(cut, f"alone{i}", [Reply(words(a), delay=DELAY)])[0] for i, a in enumerate(answers[:4])]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: ask(cut, f"crowd{i}", [Reply(words(answers[i]), delay=DELAY)])[0],
                                 range(8)))
    assert together == [alone[i % 4] for i in range(8)]


# -- failures and bad input -----------------------------------------------------------------
def _post(srv, body, timeout=30):
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=timeout)


@pytest.mark.parametrize("body, code", [
    ({}, "invalid_input"),
    ({"messages": []}, "invalid_input"),
    ({"messages": "hi"}, "invalid_input"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_input"),
    ({"messages": [{"role": "user", "content": 3}]}, "invalid_input"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "invalid_input"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "invalid_input"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "invalid_input"),
    ({"messages": [{"role": "user", "content": "a\x00b"}]}, "invalid_input"),
])
def test_malformed_requests_are_400(cut, body, code):
    r = _post(cut, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code


def test_not_json_is_400(cut):
    r = httpx.post(f"{cut.url}/v1/chat/completions", content=b"{nope", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def _raw_stream(srv, key: str, reply: Reply):
    SCRIPTS[key] = [reply]
    body = {"model": "llm", "messages": [{"role": "user", "content": SAFE_PROMPT}], "stream": True, "x_script": key}
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def _content(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


@pytest.mark.parametrize("raw", [
    [b"data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Stir the\"}}]}\n\n", b"data: {not json\n\n"],
    [b"data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Stir the\"}}]}\n\n", b"data: [1, 2]\n\n"],
    [b"data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Stir the\"}}]}\n\n",
     b"data: {\"error\": {\"message\": \"model crashed\"}}\n\n"],
    [b"data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Stir the soup\"}}]}\n\n"],  # closed, no finish
    [b"data: \xff\xfe\n\n"],
])
def test_malformed_upstream_streams_end_with_an_error_and_nothing_unjudged(cut, raw):
    events = _raw_stream(cut, f"raw{hash(tuple(raw))}", Reply(raw=raw))
    assert "error" in events[-1] and events[-1] != "[DONE]", events
    assert "[DONE]" not in events
    # only text judged before the failure: the last word may still wait for what follows it
    assert _content(events) in ("", "Stir", "Stir the")


def test_missing_done_after_a_finished_answer_ends_normally(cut):
    events = _raw_stream(cut, "nodone", Reply(words(SAFE_ANSWERS[0]), done=False))
    assert events[-1] == "[DONE]"
    assert _content(events) == SAFE_ANSWERS[0]


def test_one_megabyte_chunk_is_a_clear_error(cut):
    text = "Stir the soup slowly. " * 50_000
    events = _raw_stream(cut, "huge", Reply([text]))
    assert "error" in events[-1], events[-1]
    assert events[-1]["error"]["code"] in ("context_length_exceeded", "invalid_input")
    # judged in pieces (steps of at most 512 tokens): what fit the guard's context went out, in
    # several chunks, and nothing past it
    released = _content(events)
    assert text.startswith(released) and len(released) < len(text) // 10
    pieces = [e for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")]
    assert len(pieces) >= 3, len(pieces)
    assert cut.get("/health")[0] == 200
    assert ask(cut, "after-huge", [Reply(words(SAFE_ANSWERS[0]))])[0] == SAFE_ANSWERS[0]


def test_upstream_error_status_passes_through(cut):
    SCRIPTS["teapot"] = [Reply(status=429, error={"error": {"message": "slow down", "type": "rate_limit"}})]
    for stream in (True, False):
        r = _post(cut, {"messages": [{"role": "user", "content": SAFE_PROMPT}], "stream": stream,
                        "x_script": "teapot"})
        assert r.status_code == 429 and r.json() == {"error": {"message": "slow down", "type": "rate_limit"}}


def test_upstream_stall_is_504(cut):
    SCRIPTS["stall"] = [Reply(words("hi"), stall=5)]  # --upstream-timeout 3
    r = _post(cut, {"messages": [{"role": "user", "content": SAFE_PROMPT}], "stream": True, "x_script": "stall"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"


def test_upstream_stall_mid_stream_is_an_error_chunk(cut):
    raw = [b"data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Stir the soup. \"}}]}\n\n"]
    events = _raw_stream(cut, "midstall", Reply(raw=raw, delay=4.0))  # headers at once, then silence
    assert events[-1]["error"]["code"] == "upstream_timeout"


def test_unreachable_upstream_is_502(guard_model, env):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = _proxy(guard_model, f"http://127.0.0.1:{port}/v1", env)
    try:
        r = _post(srv, {"messages": [{"role": "user", "content": SAFE_PROMPT}], "stream": True})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
        assert _post(srv, {"messages": [{"role": "user", "content": SAFE_PROMPT}]}).status_code == 502
    finally:
        assert srv.stop() == 0


def test_client_disconnect_closes_the_upstream(cut, upstream):
    SCRIPTS["leave"] = [Reply(words(SAFE_ANSWERS[0] + TAIL * 4), delay=0.05)]
    before = len(upstream.streams)
    body = {"messages": [{"role": "user", "content": SAFE_PROMPT}], "stream": True, "x_script": "leave"}
    with httpx.stream("POST", f"{cut.url}/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if "Stir" in line:
                break
    left = time.monotonic()
    record = stream_record(upstream, before)
    assert record.closed_early and record.sent < record.planned
    assert time.monotonic() - left < 2


def test_models_lists_the_upstreams(cut, upstream):
    models = client(cut).models.list()
    assert [m.id for m in models.data] == [upstream.model]


def test_metrics_count_proxied_answers(cut):
    ask(cut, "metrics-cut", [Reply(words(UNSAFE_ANSWERS[0]))])
    status, _, text = cut.request("GET", "/metrics")
    assert status == 200
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["edgeguard_proxy_cuts_total"] >= 1
    assert values['edgeguard_proxy_requests_total{action="cut",stream="true"}'] >= 1
    assert values["edgeguard_proxy_release_delay_seconds_count"] >= 1
    assert 'edgeguard_requests_total{endpoint="/v1/chat/completions",status="200"}' in values
