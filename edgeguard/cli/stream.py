"""The body of ``edgeguard stream``: score a response as it arrives and print it."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from edgeguard.platform import console
from edgeguard.verdict import StreamState, TokenVerdict


def _line(obj: dict, out: TextIO) -> str:
    return console.json_text(obj, out)  # UTF-8, or ASCII escapes where ``out`` is not UTF-8


def run_stream(guard, prompt: str, response_chunks: Iterable[str], *, as_json: bool, follow: bool,
               out: TextIO | None = None) -> StreamState:
    """Score a response as it arrives and print it; returns the final debounced state.

    JSON mode: one ``TokenVerdict.to_dict()`` line per response token, then the summary line
    ``{"event": "verdict", "label", "category", "flagged_at", "flagged", "prompt"}``
    (``flagged`` applies the guard's policy; ``prompt`` is the prompt's ``Verdict.to_dict()``).
    Text mode: the response text as it is scored, then one verdict line. ``follow`` flushes
    after every line (JSON) or piece of text, for a reader on the other end of a pipe.
    """

    out = out or sys.stdout  # looked up per call: the caller may have redirected it

    def emit(verdicts: list[TokenVerdict]) -> None:
        if as_json:
            for v in verdicts:
                out.write(_line(v.to_dict(), out) + "\n")
                if follow:
                    out.flush()
        elif verdicts:
            out.write("".join(v.text for v in verdicts))
            if follow:
                out.flush()

    with guard.session(prompt) as session:
        for chunk in response_chunks:
            emit(session.feed_text(chunk))
        emit(session.finish())
        state = session.state
        flagged = session.flagged
        prompt_verdict = session.prompt_verdict
    if as_json:
        summary = {"event": "verdict", **state.to_dict(), "flagged": flagged,
                   "prompt": prompt_verdict.to_dict()}
        out.write(_line(summary, out) + "\n")
    else:
        where = "" if state.flagged_at is None else f" at token {state.flagged_at}"
        category = f" ({state.category})" if state.category else ""
        flag = "flagged" if flagged else "not flagged"
        prompt_category = "".join(f" ({c})" for c in prompt_verdict.categories)
        out.write(f"\n-- response: {state.label}{category}{where}, {flag} under {guard.policy.name}; "
                  f"prompt: {prompt_verdict.label}{prompt_category}\n")
    out.flush()
    return state
