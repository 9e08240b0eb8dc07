"""The proxy's pure pieces against hand-computed expectations: the SSE parser, the release rule
(``releasable`` and ``Transcript``), the CARE continuation request, a streamed tool call's delta.
No model, no server: milliseconds."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest

from edgeguard.server.proxy import sse
from edgeguard.server.proxy.care import continuation
from edgeguard.server.proxy.config import STEERING
from edgeguard.server.proxy.release import SEPARATOR, Transcript, releasable
from edgeguard.server.proxy.shapes import tool_call_delta


# -- SSE ----------------------------------------------------------------------------------------
def test_an_event_split_anywhere_arrives_once_at_its_blank_line():
    raw = b'data: {"a": 1}\n\ndata: {"b": 2}\n\n'
    for cut in range(1, len(raw)):
        p = sse.SSEParser(1 << 10)
        assert p.feed(raw[:cut]) + p.feed(raw[cut:]) == ['{"a": 1}', '{"b": 2}'], cut
    p = sse.SSEParser(1 << 10)
    assert p.feed(b'data: {"a"') == []
    assert p.feed(b": 1}\n") == []  # the line is whole, the event is not
    assert p.feed(b"\n") == ['{"a": 1}']


def test_data_lines_join_with_newlines_and_other_lines_are_ignored():
    p = sse.SSEParser(1 << 10)
    assert p.feed(b": keep-alive\nevent: message\nid: 7\nretry: 10\ndata: x\ndata: y\n\n") == ["x\ny"]
    assert p.feed(b"data:q\n\ndata:  two\n\n") == ["q", " two"]  # only one space after the colon goes
    assert p.feed(b"\n\n\n") == []  # blank lines with no data are no event


def test_crlf_and_cr_end_lines_even_split_across_reads():
    p = sse.SSEParser(1 << 10)
    assert p.feed(b"data: a\r\n\r\ndata: b\r\r") == ["a"]  # the last \r may be half of \r\n
    assert p.feed(b"\n") == ["b"]  # it was: \r\n is one blank line
    assert p.feed(b"data: c\r\rdata: d\n\n") == ["c", "d"]


def test_a_last_event_without_its_blank_line_counts_at_the_close():
    p = sse.SSEParser(1 << 10)
    assert p.feed(b"data: one\n\ndata: last") == ["one"]
    assert p.close() == ["last"]
    assert sse.SSEParser(1 << 10).close() == []


def test_an_event_over_max_event_bytes_is_an_error_whether_or_not_its_line_ended():
    with pytest.raises(sse.SSEError, match="larger than 10 bytes"):
        sse.SSEParser(10).feed(b"data: " + b"x" * 11 + b"\n")
    with pytest.raises(sse.SSEError, match="larger than 10 bytes"):
        sse.SSEParser(10).feed(b"data: " + b"x" * 20)  # no newline yet: the buffer counts
    with pytest.raises(sse.SSEError, match="larger than 10 bytes"):  # two lines of one event add up
        sse.SSEParser(10).feed(b"data: 12345\ndata: 67890\n")
    assert sse.SSEParser(10).feed(b"data: 123456789\n\n") == ["123456789"]  # 9 bytes + the joining newline


def test_invalid_utf8_is_an_error():
    with pytest.raises(sse.SSEError, match="not valid UTF-8"):
        sse.SSEParser(1 << 10).feed(b"data: \xff\xfe\n\n")


def test_parse_chunk_accepts_a_chunk_and_refuses_what_is_not_one():
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    assert sse.parse_chunk('{"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]}') == chunk
    for data, message in [("{not json", "not JSON"), ("[1, 2]", "not a JSON object"),
                          ('{"choices": {"a": 1}}', "not a list of objects"),
                          ('{"choices": [1]}', "not a list of objects"),
                          ('{"error": {"message": "model overloaded"}}', "model overloaded"),
                          ('{"error": "plain text"}', "plain text")]:
        with pytest.raises(sse.SSEError, match=message):
            sse.parse_chunk(data)


def test_events_written_for_the_client():
    assert sse.event({"a": "é"}) == b'data: {"a": "\xc3\xa9"}\n\n'  # UTF-8, not \\u escapes
    assert sse.done() == b"data: [DONE]\n\n"


# -- the release rule --------------------------------------------------------------------------
S, U, C = "Safe", "Unsafe", "Controversial"


@pytest.mark.parametrize("labels, released, flagged_at, holdback, final, expected", [
    ([], 0, None, 0, False, 0),
    ([S, S, S], 0, None, 0, False, 3),
    ([S, S, U], 0, None, 0, False, 2),  # an Unsafe last token may start a flagged pair: held
    ([S, C], 0, None, 0, False, 1),  # so may a Controversial one (strict policies)
    ([S, U, S], 0, None, 0, False, 3),  # its successor is judged Safe: no pair, it goes
    ([S, S, S, S], 0, None, 1, False, 3),  # holdback keeps one more
    ([S, S, S, S], 3, None, 2, False, 3),  # never moves back
    ([S, U], 0, None, 2, True, 2),  # the end of the answer releases everything
    ([S, S, U, U, S], 0, 3, 0, False, 2),  # flagged pair = tokens 2 and 3: release stops before it
    ([S, S, U, U, S], 0, 3, 1, False, 1),
    ([S, S, U, U, S], 2, 3, 1, False, 2),  # what was sent stays sent
    ([U, U], 0, 1, 0, False, 0),
])
def test_releasable(labels, released, flagged_at, holdback, final, expected):
    assert releasable(labels, released, flagged_at, holdback=holdback, final=final) == expected


@pytest.mark.parametrize("holds, expected", [
    (frozenset((U, C)), [2, 1, 2]),  # strict: Unsafe and Controversial last tokens wait
    (frozenset((U,)), [2, 2, 3]),  # loose: a Controversial pair is never flagged, so C goes at once
    (frozenset(), [3, 2, 3]),  # a policy that allows every category: nothing waits
])
def test_only_labels_the_policy_can_flag_a_pair_of_wait(holds, expected):
    cases = [[S, S, U], [S, C], [S, U, C]]
    assert [releasable(labels, 0, None, holdback=0, final=False, holds=holds) for labels in cases] == expected
    t = Transcript(0, lambda token: 1, holds=holds)
    t.add("content", "abc")
    t.judged([V(1, "a"), V(2, "b", C), V(3, "c", U)], flagged_at=None, final=False)
    assert t.released == (3 if not holds else 2)


@dataclass
class V:  # a token verdict: the fields Transcript reads
    token: int
    text: str
    label: str = S


def _transcript(holdback: int = 0, sizes: dict[int, int] | None = None) -> Transcript:
    """``sizes``: each token's length in bytes."""
    sizes = sizes or {}
    return Transcript(holdback, lambda token: sizes[token])


def test_text_is_released_as_judged_and_an_unsafe_last_token_waits_for_the_next():
    t = _transcript(sizes={1: 5, 2: 6, 3: 1})
    assert t.add("content", "Hello") == "Hello"
    assert t.add("content", " world!") == " world!"  # same field: no separator
    t.judged([V(1, "Hello"), V(2, " world", U)], flagged_at=None, final=False)
    assert (t.tokens, t.released) == (2, 1)
    assert [(s.field, piece) for s, piece in t.take()] == [("content", "Hello")]
    assert t.take() == []  # nothing new
    t.judged([V(3, "!")], flagged_at=None, final=False)
    assert [piece for _, piece in t.take()] == [" world!"]
    assert t.text == "Hello world!" and t.content_sent() == "Hello world!"


def test_release_stops_inside_a_character_until_its_last_byte_is_judged():
    t = _transcript(sizes={1: 1, 2: 1, 3: 1})  # "é" is two byte tokens: the first decodes to nothing
    t.add("content", "aé")
    t.judged([V(1, "a"), V(2, "")], flagged_at=None, final=False)
    assert t.released == 1 and [p for _, p in t.take()] == ["a"]
    t.judged([V(3, "é")], flagged_at=None, final=False)
    assert t.released == 3 and [p for _, p in t.take()] == ["é"]


def test_fields_are_separated_in_the_judged_text_and_released_into_their_own():
    t = _transcript(sizes={1: 5, 2: 2, 3: 6})
    assert t.add("reasoning_content", "think") == "think"
    assert t.add("content", "Answer") == SEPARATOR + "Answer"
    assert t.text == "think\n\nAnswer"
    t.judged([V(1, "think"), V(2, "\n\n"), V(3, "Answer")], flagged_at=None, final=True)
    assert [(s.field, p) for s, p in t.take()] == [("reasoning_content", "think"), ("content", "Answer")]
    assert t.content_sent() == "Answer"


def test_a_flag_drops_the_held_tokens_and_rollback_keeps_exactly_the_sent_text():
    t = _transcript(holdback=1, sizes={1: 1, 2: 2, 3: 2, 4: 2, 5: 2})
    t.add("content", "A B C D E")
    t.judged([V(1, "A"), V(2, " B"), V(3, " C"), V(4, " D", U)], flagged_at=None, final=False)
    assert t.released == 2  # " D" held for its successor, " C" for the holdback
    t.take()
    t.judged([V(5, " E", U)], flagged_at=4, final=False)  # the pair is " D E"
    assert t.released == 2  # min(5, 4 - 1) - 1 = 2: " C" stays held
    assert t.take() == []
    assert t.rollback() == 3  # " C", " D", " E" leave the session
    assert (t.text, t.tokens, t.released, t.labels) == ("A B", 2, 2, [S, S])
    assert t.content_sent() == "A B"
    assert t.add("content", " F") == " F"  # the continuation appends to the kept segment
    assert t.text == "A B F"


def test_a_tool_call_head_goes_out_before_its_arguments():
    t = _transcript(sizes={1: 8})
    tool = {"index": 0, "id": "call_1", "type": "function", "name": "search"}
    assert t.add("tool_calls", "", tool) == ""
    assert [(s.field, p) for s, p in t.take()] == [("tool_calls", "")]
    assert t.add("tool_calls", '{"q": 1}') == '{"q": 1}'
    t.judged([V(1, '{"q": 1}')], flagged_at=None, final=True)
    assert [p for _, p in t.take()] == ['{"q": 1}']


def test_tool_call_delta_announces_the_call_once():
    tool = {"index": 2, "id": "call_9", "type": "function", "name": "lookup"}
    assert tool_call_delta(tool, '{"a"') == {"index": 2, "id": "call_9", "type": "function",
                                             "function": {"arguments": '{"a"', "name": "lookup"}}
    assert tool_call_delta(tool, ": 1}") == {"index": 2, "function": {"arguments": ": 1}"}}


# -- the CARE continuation request ---------------------------------------------------------------
def test_continuation_adds_the_steering_to_the_system_prompt_and_the_sent_text_as_prefill():
    body = {"model": "m", "temperature": 0.5, "x_unknown": [1],
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    before = copy.deepcopy(body)
    out = continuation(body, "Hello the")
    assert body == before  # the client's request is not changed
    assert out == {"model": "m", "temperature": 0.5, "x_unknown": [1],
                   "messages": [{"role": "system", "content": "Be brief.\n\n" + STEERING},
                                {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello the"}]}


def test_continuation_without_a_text_system_prompt_puts_one_first():
    parts = [{"type": "text", "text": "Be brief."}]
    out = continuation({"messages": [{"role": "system", "content": parts}, {"role": "user", "content": "Hi"}]}, "Ok")
    assert out["messages"] == [{"role": "system", "content": STEERING}, {"role": "system", "content": parts},
                               {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok"}]
    out = continuation({"messages": [{"role": "user", "content": "Hi"}]}, "Ok")
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant"]


def test_continuation_replaces_the_clients_own_prefill_and_tells_vllm_to_continue():
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure"}]}
    out = continuation(body, "Sure, here", vllm=True)
    assert out["messages"][1:] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, here"}]
    assert out["continue_final_message"] is True and out["add_generation_prompt"] is False
    assert "continue_final_message" not in continuation(body, "Sure, here")


def test_continuation_with_nothing_sent_starts_again_under_the_steering():
    out = continuation({"messages": [{"role": "user", "content": "Hi"}]}, "", vllm=True)
    assert out == {"messages": [{"role": "system", "content": STEERING}, {"role": "user", "content": "Hi"}]}
