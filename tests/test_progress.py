"""Progress on stderr: a tqdm bar (rate, ETA) on a terminal, plain periodic lines elsewhere;
wired into scan (with the flagged count), convert (tensors written, tensors quantized) and pull
(download and conversion)."""

from __future__ import annotations

import io
import json
import re

from click.testing import CliRunner

from edgeguard import progress
from edgeguard.cli import main
from tests.fixtures.converted import converted
from tests.test_pull import fixture_files, hub_server, registry  # noqa: F401 (fixtures)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal(monkeypatch):
    clock = iter(range(0, 1000, 4))  # each call to the clock: 4 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    with progress.Bar(total=10, desc="scan", unit="line", file=stream, mininterval=0) as bar:
        for _ in range(10):
            bar.update(1)
        bar.set_postfix_str("2 flagged", refresh=False)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    # 40 s of fake time, a line every 10 s at most, plus the final one
    assert 2 <= len(lines) <= 5, lines
    assert re.fullmatch(r"edgeguard: scan: 10/10 \(100%\) \[.*line/s\], 2 flagged", lines[-1]), lines[-1]
    assert all(line.startswith("edgeguard: scan: ") for line in lines)


def test_a_bar_with_rate_and_eta_on_a_terminal():
    stream = Terminal()
    with progress.Bar(total=4, desc="scan", unit="line", file=stream, mininterval=0) as bar:
        bar.update(2)
        text = stream.getvalue()
        assert "\r" in text and "2/4" in text and "<" in text and "line/s" in text  # ETA, rate


def test_scan_shows_lines_and_flagged(gen_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(3)))
    result = CliRunner().invoke(main, ["scan", str(src), "--out", str(tmp_path / "o.jsonl"),
                                       "--model", str(converted(gen_ckpt, ("f16",)))])
    assert re.search(r"^edgeguard: scan: 3/3 \(100%\) .* \d+ flagged$", result.stderr, re.M), result.stderr


def test_convert_shows_tensors_written_and_quantized(gen_ckpt, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(gen_ckpt), "--out", str(tmp_path / "m"), "--quant", "q8_0"])
    assert result.exit_code == 0, result.output
    written = re.search(r"^edgeguard: writing \.\S+-master\.gguf: (\d+)/(\d+) \(100%\)", result.stderr, re.M)
    quantized = re.search(r"^edgeguard: quantizing to q8_0: (\d+)/(\d+) \(100%\)", result.stderr, re.M)
    assert written and quantized, result.stderr
    assert written.group(1) == written.group(2) == quantized.group(2)  # every tensor, once each


def test_pull_shows_download_and_conversion(hub_server):
    result = CliRunner().invoke(main, ["pull", "gen-0.6b"])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr
    assert re.search(r"^edgeguard: Fetching \d+ files: (\d+)/\1 \(100%\)", result.stderr, re.M), result.stderr
    assert re.search(r"^edgeguard: quantizing to q8_0: (\d+)/\1 \(100%\)", result.stderr, re.M), result.stderr
