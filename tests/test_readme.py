"""The README's Python examples run as written (against a converted fixture model)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.fixtures.converted import converted

README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {name} .*?-->\n```python\n(.*?)```", text, re.S)
    assert match, f"README has no example {name!r}"
    return match.group(1)


def test_guard_stream_example_runs(stream_ckpt, monkeypatch, capsys):
    monkeypatch.setenv("EDGEGUARD_STREAM_MODEL", str(converted(stream_ckpt, ("f16",))))
    exec(compile(example("guard_stream"), "README.md", "exec"), {})
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
