"""`edgeguard scan`: resume only onto a scan of the same input, model and policy; one writer at
a time; stdout output; ids on error lines; a BOM; exit status from the whole output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeguard.cli import main
from edgeguard.scan.record import record_path
from edgeguard.scan.writer import ScanStats
from tests.fixtures.converted import converted


@pytest.fixture(scope="module")
def model(gen_ckpt):
    return str(converted(gen_ckpt, ("f16", "q8_0")))


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "cache"))


def scan(model, src, out, *extra):
    return CliRunner().invoke(main, ["scan", str(src), "--out", str(out), "--model", model, "--quant", "f16", *extra])


def write_input(path: Path, tag: str, n: int = 10) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{tag} question number {i}", "id": f"{tag}{i}"}) + "\n"
                            for i in range(n)))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_exit(output_rows: list[dict]) -> int:
    if any(r.get("flagged") for r in output_rows):
        return 1
    return 2 if any("error" in r for r in output_rows) else 0


def cut(out: Path, keep: int) -> None:
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:keep]))


@pytest.fixture()
def scanned(model, tmp_path):
    """A complete scan of 10 lines of input A: (input, output, rows)."""
    src, out = write_input(tmp_path / "in.jsonl", "A"), tmp_path / "out.jsonl"
    result = scan(model, src, out)
    full = rows(out)
    assert result.exit_code == expected_exit(full), result.output
    assert [r["id"] for r in full] == [f"A{i}" for i in range(10)]
    return src, out, full


def test_resume_continues_the_same_scan(model, scanned):
    src, out, full = scanned
    cut(out, 4)
    with out.open("a") as f:
        f.write('{"label": "Sa')  # torn by an interruption
    result = scan(model, src, out)
    assert result.exit_code == expected_exit(full), result.output
    assert rows(out) == full
    assert "4 kept from an earlier run" in result.output


def test_resume_refuses_a_different_input(model, scanned, tmp_path):
    src, out, full = scanned
    cut(out, 4)
    write_input(src, "B")  # same file name, other content
    result = scan(model, src, out)
    assert result.exit_code == 2, result.output
    assert "is not the input" in result.output and "--restart" in result.output
    assert "Traceback" not in result.output
    assert rows(out) == full[:4]  # refused untouched
    result = scan(model, src, out, "--restart")
    assert [r["id"] for r in rows(out)] == [f"B{i}" for i in range(10)]
    assert result.exit_code == expected_exit(rows(out))


def test_resume_refuses_an_input_cut_shorter(model, scanned):
    src, out, _ = scanned
    cut(out, 4)
    cut(src, 6)
    result = scan(model, src, out)
    assert result.exit_code == 2 and "is not the input" in result.output


@pytest.mark.parametrize("extra,what", [
    (["--policy", "loose"], "policy"),
    (["--quant", "q8_0"], "model"),
])
def test_resume_refuses_a_different_model_or_policy(model, scanned, extra, what):
    src, out, full = scanned
    cut(out, 4)
    result = scan(model, src, out, *extra)  # a repeated --quant: the last one wins
    assert result.exit_code == 2, result.output
    assert f"different {what}" in result.output
    assert rows(out) == full[:4]
    record = json.loads(record_path(out).read_text())
    assert record["policy"]["name"] == "strict" and record["model"]["quant"] == "f16"
    assert record["input"]["lines"] == 10 and record["engine"] == "gen"


def test_output_without_a_record_is_not_resumed(model, tmp_path):
    src, out = write_input(tmp_path / "in.jsonl", "A", 3), tmp_path / "out.jsonl"
    out.write_text("my own notes\n")
    result = scan(model, src, out)
    assert result.exit_code == 2 and "no scan record" in result.output
    assert out.read_text() == "my own notes\n"


def test_a_second_writer_is_refused(model, tmp_path, monkeypatch):
    from edgeguard.cli import commands as cli

    fcntl = pytest.importorskip("fcntl")  # POSIX; the Windows lock: tests/test_platform.py
    src, out = write_input(tmp_path / "in.jsonl", "A", 3), tmp_path / "out.jsonl"
    real_load = cli._load
    with open(out, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running scan holds
        monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("refused only after loading the model"))
        result = scan(model, src, out)
        monkeypatch.setattr(cli, "_load", real_load)
    assert result.exit_code == 2, result.output
    assert "another scan is writing" in result.output
    assert out.read_bytes() == b""
    assert scan(model, src, out).exit_code in (0, 1)  # free again once the writer is gone
    assert len(rows(out)) == 3


def test_out_dash_writes_to_stdout(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_input(tmp_path / "in.jsonl", "A", 3)
    result = CliRunner().invoke(main, ["scan", str(src), "--out", "-", "--model", model, "--quant", "f16"])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in lines] == ["A0", "A1", "A2"]
    assert result.exit_code == expected_exit(lines)
    assert not (tmp_path / "-").exists() and not (tmp_path / "-.scan.json").exists()


def test_out_dev_stdout_is_a_stream(model, tmp_path, capfd):
    src = write_input(tmp_path / "in.jsonl", "A", 2)
    result = scan(model, src, "/dev/stdout")
    assert result.exit_code in (0, 1), result.output
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["id"] for r in lines] == ["A0", "A1"]
    assert not Path("/dev/stdout.scan.json").exists()


def test_error_lines_keep_the_id_and_a_bom_is_accepted(model, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        json.dumps({"prompt": "first", "id": "x1"}),
        json.dumps({"prompt": "", "id": 7}),
        json.dumps({"prompt": "third", "response": 5, "id": [1, 2]}),
        "not json at all",
        "   ",
        json.dumps({"prompt": "sixth"}),
    ]
    src.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    result = scan(model, src, out)
    got = rows(out)
    assert got[0]["id"] == "x1" and "label" in got[0]
    assert got[1]["id"] == 7 and got[1]["line"] == 2 and "prompt" in got[1]["error"]
    assert got[2]["id"] == [1, 2] and "response" in got[2]["error"]
    assert got[3] == {"line": 4, "error": got[3]["error"]} and "not JSON" in got[3]["error"]
    assert got[4] == {"line": 5, "skipped": "blank line"}
    assert got[5]["line"] == 6 and "label" in got[5]
    flagged = sum(bool(r.get("flagged")) for r in got)
    assert result.exit_code == (1 if flagged else 2), result.output
    assert f"{flagged} flagged, 3 malformed, 1 blank" in result.output


def test_exit_code_counts_the_lines_kept_from_an_earlier_run(model, tmp_path):
    """A resumed scan's exit status covers the whole output, not just the lines it added."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("not json\n" + json.dumps({"prompt": "second"}) + "\n")
    scan(model, src, out)
    cut(out, 1)
    result = scan(model, src, out)
    got = rows(out)
    assert "error" in got[0] and len(got) == 2
    assert result.exit_code == (1 if got[1]["flagged"] else 2)


@pytest.mark.parametrize("flagged,malformed,code", [(0, 0, 0), (3, 0, 1), (0, 2, 2), (1, 1, 1)])
def test_exit_code_rule(flagged, malformed, code):
    assert ScanStats(flagged=flagged, malformed=malformed).exit_code == code


def test_lone_surrogates_from_json_escapes_are_errors_not_crashes(model, tmp_path):
    """Found by tests/test_fuzz_cli.py: JSON may spell a lone surrogate ("\\udcff"), which is
    not text; the line is an error line and the id comes back as valid JSON."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "a \\ud800 b", "id": 1}\n{"prompt": "fine", "id": "\\udcff"}\n')
    result = scan(model, src, out)
    assert result.exit_code in (1, 2), result.output
    first, second = [json.loads(line) for line in out.read_bytes().split(b"\n")[:-1]]
    assert first["id"] == 1 and "surrogate" in first["error"]
    assert second["id"] == "\udcff" and "label" in second


def test_two_concurrent_scans_into_one_output(model, tmp_path):
    """The issue's measurement: two processes scanning into the same --out. Now the second is
    refused while the first runs, and the output holds each input line exactly once."""
    import os
    import subprocess
    import sys
    import time

    src, out = write_input(tmp_path / "in.jsonl", "A", 150), tmp_path / "out.jsonl"
    env = {**os.environ, "EDGEGUARD_CACHE_DIR": str(tmp_path / "cache"), "EDGEGUARD_THREADS": "1"}
    command = [sys.executable, "-m", "edgeguard", "scan", str(src), "--out", str(out), "--model", model,
               "--quant", "f16"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.stat().st_size == 0) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    first_stderr = first.communicate(timeout=300)[1].decode()
    if second.returncode != 2:
        pytest.skip("the first scan finished before the second started; nothing concurrent to see")
    assert "another scan is writing" in second.stderr, second.stderr
    assert first.returncode in (0, 1), first_stderr
    assert [r["id"] for r in rows(out)] == [f"A{i}" for i in range(150)]


def test_an_emptied_output_starts_over_whatever_its_stale_record_says(model, scanned):
    src, out, full = scanned
    out.write_bytes(b"")
    result = scan(model, src, out, "--policy", "loose")  # would be refused with lines to protect
    assert result.exit_code in (0, 1), result.output
    assert len(rows(out)) == 10 and all(r["policy"] == "loose" for r in rows(out))
    assert json.loads(record_path(out).read_text())["policy"]["name"] == "loose"
