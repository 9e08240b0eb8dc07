"""The Python examples of README.md and docs/ run as written (against converted fixture models)."""

from __future__ import annotations

import ast
import re

from tests.fixtures.converted import converted
from tests.test_docs import example


def run(name: str) -> None:
    exec(compile(example(name), f"example {name}", "exec"), {})


def test_guard_stream_example_runs(stream_ckpt, monkeypatch, capsys):
    monkeypatch.setenv("EDGEGUARD_STREAM_MODEL", str(converted(stream_ckpt, ("f16",))))
    run("guard_stream")
    out = capsys.readouterr().out
    full = "Sure! Mix 500 g of flour with water, salt and yeast, then bake it."
    printed, _, state = out.partition("\n")
    flagged_at = re.search(r"StreamState\(.*flagged_at=(\d+|None)", state)
    assert flagged_at, out
    # independently: the same response fed in one piece says whether and where it flags
    import edgeguard

    with edgeguard.load(str(converted(stream_ckpt, ("f16",)))) as guard, \
            guard.session("How do I bake bread?") as session:
        session.feed_text(full)
        session.finish()
        expected = session.state.flagged_at
    assert flagged_at.group(1) == str(expected)
    if expected is None:
        assert printed == full  # nothing flagged: the whole text, judged
    else:
        assert full.startswith(printed) and len(printed) < len(full)  # stopped at the flag


def test_python_check_example_runs(gen_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path))
    model = str(converted(gen_ckpt, ("f16",)))
    code = example("python-check")
    assert '"gen-0.6b"' in code
    exec(compile(code.replace('"gen-0.6b"', repr(model)), "example python-check", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4, lines
    assert lines[0].split()[0] in ("Safe", "Unsafe", "Controversial")
    assert lines[1] in ("Yes", "No")  # a response was judged: Gen reads the refusal
    printed = [ast.literal_eval(line) for line in lines[2:]]
    # independently: one check per item on a fresh guard gives the same verdicts
    import edgeguard

    with edgeguard.load(model) as guard:
        expected = [guard.check("first").to_dict(), guard.check("second", "a reply").to_dict()]
    assert all(close(got, want) for got, want in zip(printed, expected)), (printed, expected)


def close(a, b, tol: float = 1e-4) -> bool:
    """Equal, floats within ``tol`` (a persisted template head restores the same scores within
    float rounding)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def test_stream_rollback_example_runs(stream_ckpt, monkeypatch, capsys):
    model = str(converted(stream_ckpt, ("f16",)))
    monkeypatch.setenv("EDGEGUARD_STREAM_MODEL", model)
    run("stream-rollback")
    *token_lines, state = capsys.readouterr().out.splitlines()
    # independently: a fresh session fed what is left after the rollback ends in the same state
    import edgeguard

    with edgeguard.load(model) as guard, guard.session("How do I bake bread?") as session:
        ids = guard.response_tokens("Mix flour, water and salt, then bake it.")
        assert [int(line.split()[0]) for line in token_lines] == list(range(len(ids)))
        session.feed(ids[:-3])
        session.feed_text(" then let it rise.")
        session.finish()
        assert state == str(session.state)
