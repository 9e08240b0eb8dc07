"""`edgeguard eval` end to end on the trained fixtures: real llama.cpp and onnxruntime through
every quant, the report files, resuming, and the Stream span conversion checked against the
Hugging Face tokenizer."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeguard.cli import main
from edgeguard.eval.data import load as load_data
from edgeguard.eval.run import EvalOptions, run_eval
from tests.fixtures.converted import converted
from tests.fixtures.eval_sets import GEN_FILE, STREAM_FILE, gen_eval_lines, stream_eval_lines
from tests.fixtures.trained import trained_gen_checkpoint, trained_stream_checkpoint

QUANTS = ("q4_k_m", "q8_0", "f16")
# Measured on the deterministic fixtures (README "How much does quantization cost?"); the
# floors leave room for another CPU's rounding.
GEN_MIN_ACCURACY = 0.8      # three-label exact match on the held-out set, every quant
GEN_MIN_AGREEMENT = 0.9     # labels equal to f16's
STREAM_MIN_F1 = 0.99        # response-level strict F1, every quant (all 10 are right in f16)


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def gen_model():
    return str(converted(trained_gen_checkpoint(), QUANTS))


@pytest.fixture(scope="module")
def stream_model():
    return str(converted(trained_stream_checkpoint(), QUANTS))


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_labelled_sets_equal_the_fixture_examples():
    from transformers import AutoTokenizer

    assert _lines(GEN_FILE) == gen_eval_lines()
    tok = AutoTokenizer.from_pretrained(trained_stream_checkpoint())
    assert _lines(STREAM_FILE) == stream_eval_lines(tok)


def test_gen_eval_through_every_quant_via_the_cli(gen_model, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["eval", str(GEN_FILE), "--model", gen_model,
                                       "--quant", ",".join(QUANTS), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("report.md", "report.json", "items.jsonl", "score-drift.png", "reliability.png"):
        assert (out / name).is_file(), name
    assert (out / "score-drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] == "f16" and report["variants"] == ["f16", "q4_k_m", "q8_0"]
    for q in QUANTS:
        overall = report["results"][q]["metrics"]["overall"]
        assert overall["n"] == len(gen_eval_lines())
        assert overall["label_accuracy"] >= GEN_MIN_ACCURACY, (q, overall)
    for q in ("q4_k_m", "q8_0"):
        a = report["agreement"][q]
        assert a["agreement"] >= GEN_MIN_AGREEMENT and 0 <= a["mean_drift"] <= a["max_drift"] < 0.5
    items = _lines(out / "items.jsonl")
    assert len(items) == len(gen_eval_lines())
    assert set(items[0]["predictions"]) == set(QUANTS)
    md = (out / "report.md").read_text()
    assert "## Quantization cost" in md and "| f16 | overall |" in md


def test_gen_eval_matches_the_check_command(gen_model, tmp_path):
    """The items' predictions are exactly what `edgeguard check` answers."""
    run_eval(GEN_FILE, EvalOptions(model=gen_model, quants=("q8_0",)), tmp_path / "r")
    items = _lines(tmp_path / "r" / "items.jsonl")
    dataset = load_data(GEN_FILE)
    for item, data in list(zip(items, dataset.items))[::5]:
        messages = data.messages
        args = ["check", messages[0][1]] + (["--response", messages[1][1]] if len(messages) > 1 else [])
        result = CliRunner().invoke(main, [*args, "--model", gen_model, "--quant", "q8_0", "--json"])
        verdict = json.loads(result.output)
        got = item["predictions"]["q8_0"]
        assert got["label"] == verdict["label"] and got["refusal"] == verdict["refusal"]
        assert got["scores"] == pytest.approx(verdict["scores"], abs=1e-6)


@pytest.fixture(scope="module")
def whole_run(gen_model, tmp_path_factory):
    """An uninterrupted run of the Gen set through q4_k_m and f16."""
    out = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEGUARD_CACHE_DIR", str(out / "cache"))
        result = run_eval(GEN_FILE, EvalOptions(model=gen_model, quants=RESUME_QUANTS), out / "report")
    return result.report, (out / "report" / "items.jsonl").read_text()


RESUME_QUANTS = ("q4_k_m", "f16")


def _without_data(report):
    return {k: v for k, v in report.items() if k != "data"}


def test_resume_after_interruption_gives_the_same_report(gen_model, whole_run, tmp_path):
    from edgeguard.errors import UsageError

    options = EvalOptions(model=gen_model, quants=RESUME_QUANTS)
    with pytest.raises(UsageError, match="not evaluated yet"):
        run_eval(GEN_FILE, options, tmp_path / "cut", stop_after=7)
    with open(tmp_path / "cut" / "runs" / "f16.jsonl", "ab") as f:  # a line torn by the interruption
        f.write(b'{"label": "Saf')
    said = []
    resumed = run_eval(GEN_FILE, options, tmp_path / "cut", progress=said.append)
    assert any("resuming, 7 of" in s for s in said)
    assert _without_data(resumed.report) == _without_data(whole_run[0])
    assert (tmp_path / "cut" / "items.jsonl").read_text() == whole_run[1]


def test_a_killed_cli_run_resumes_to_the_same_report(gen_model, whole_run, tmp_path):
    """SIGKILL in the middle of a real `edgeguard eval` process, then the same command again."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "report"
    cmd = [sys.executable, "-c", "from edgeguard.cli import main; main()", "eval", str(GEN_FILE),
           "--model", gen_model, "--quant", ",".join(RESUME_QUANTS), "--out", str(out)]
    env = {**__import__("os").environ, "EDGEGUARD_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_file = out / "runs" / "q4_k_m.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if run_file.exists() and run_file.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = run_file.read_bytes().count(b"\n") - 1
    assert 5 <= done < len(gen_eval_lines()) and not (out / "report.json").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"q4_k_m: resuming, {done} of" in again.stderr
    report = json.loads((out / "report.json").read_text())
    report.pop("plots")
    assert _without_data(report) == json.loads(json.dumps(_without_data(whole_run[0])))
    assert (out / "items.jsonl").read_text() == whole_run[1]


def test_an_item_that_fails_is_left_out_and_listed(gen_model, tmp_path):
    """A conversation longer than the context: listed with its error, out of every figure."""
    data = tmp_path / "data.jsonl"
    long_prompt = " ".join(["word"] * 1500)
    data.write_text(GEN_FILE.read_text() + json.dumps({"prompt": long_prompt, "label": "Safe"}) + "\n")
    options = EvalOptions(model=gen_model, quants=("q8_0",), guard_options=(("n_ctx", 1024),))
    report = run_eval(data, options, tmp_path / "r").report
    assert [f["line"] for f in report["failed"]] == [len(gen_eval_lines()) + 1]
    assert "1024" in report["failed"][0]["error"]
    assert report["results"]["q8_0"]["metrics"]["overall"]["n"] == len(gen_eval_lines())
    assert "Items left out" in (tmp_path / "r" / "report.md").read_text()


def test_a_run_of_other_data_is_not_resumed(gen_model, tmp_path):
    from edgeguard.errors import UsageError

    run_eval(GEN_FILE, EvalOptions(model=gen_model, quants=("q8_0",)), tmp_path / "r")
    other = tmp_path / "other.jsonl"
    other.write_text(GEN_FILE.read_text().replace("gen-0", "gen-x"))
    with pytest.raises(UsageError, match="other data"):
        run_eval(other, EvalOptions(model=gen_model, quants=("q8_0",)), tmp_path / "r")


def test_stream_eval_timing_through_every_quant(stream_model, tmp_path):
    from transformers import AutoTokenizer

    from tests.fixtures.trained import stream_encode

    result = run_eval(STREAM_FILE, EvalOptions(model=stream_model, quants=QUANTS), tmp_path / "s")
    report = result.report
    assert report["engine"] == "stream"
    assert {p.name for p in result.plots} == {"score-drift.png", "reliability.png", "detection-delay.png"}
    tok = AutoTokenizer.from_pretrained(trained_stream_checkpoint())
    dataset = load_data(STREAM_FILE)
    items = _lines(tmp_path / "s" / "items.jsonl")
    for item, line in zip(dataset.items, items):
        if item.response is None:
            continue
        _, _, r0, offsets = stream_encode(tok, item.messages[0][1], item.response)
        for q in QUANTS:  # the template tokens before the response, as HF counts them
            pred = line["predictions"][q]
            assert pred["n_before"] == r0 and len(pred["token_scores"]) == len(offsets)
    for q in QUANTS:
        r = report["results"][q]
        response = r["metrics"]["mode:response"]["strict"]
        assert response["f1"] >= STREAM_MIN_F1, (q, response)
        t = r["timing"]
        assert t["n"] == 5 and t["detected"] == 5 and t["early"] == 0
        # the fixture flags a planted sentence from its first trigger word, inside the span
        # (measured: 5 of 5, median delay 3 tokens; one miss allowed for another CPU's rounding)
        assert t["in_first_span"] >= 4 and t["within"]["64"]["hits"] >= 4
        assert 0 <= t["median_delay_tokens"] <= 20


def test_without_matplotlib_plots_are_skipped_with_a_hint(gen_model, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    said = []
    result = run_eval(GEN_FILE, EvalOptions(model=gen_model, quants=("q8_0",)), tmp_path / "r",
                      progress=said.append)
    assert result.plots == () and not list((tmp_path / "r").glob("*.png"))
    assert [s for s in said if "pip install 'edgeguard[eval]'" in s]


def test_cli_usage_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "no such file" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    result = runner.invoke(main, ["eval", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no usable" in result.output
    result = runner.invoke(main, ["eval", str(GEN_FILE), "--quant", "q8_0,q8_0"])
    assert result.exit_code == 2 and "twice" in result.output


def test_gen_reference_checkpoint_is_the_baseline(gen_model, tmp_path):
    """--reference: the checkpoint through transformers; the f16 GGUF must agree with it on
    every label, its scores within 0.01 (measured 1e-4)."""
    options = EvalOptions(model=gen_model, quants=("f16",), reference=trained_gen_checkpoint())
    report = run_eval(GEN_FILE, options, tmp_path / "r").report
    assert report["baseline"] == "reference" and report["variants"] == ["reference", "f16"]
    a = report["agreement"]["f16"]
    assert a["agreement"] == 1.0 and a["max_drift"] < 0.01
    assert report["results"]["reference"]["metrics"]["overall"]["label_accuracy"] >= GEN_MIN_ACCURACY


def test_stream_reference_checkpoint_is_the_baseline(stream_model, tmp_path):
    """The Stream checkpoint through transformers: same labels and trigger indices as the f16
    GGUF + ONNX heads, per-token scores within 0.01 (measured 4e-4), the same template count."""
    options = EvalOptions(model=stream_model, quants=("f16",), reference=trained_stream_checkpoint())
    result = run_eval(STREAM_FILE, options, tmp_path / "r")
    a = result.report["agreement"]["f16"]
    assert result.report["baseline"] == "reference" and a["agreement"] == 1.0 and a["max_drift"] < 0.01
    for line in _lines(tmp_path / "r" / "items.jsonl"):
        ref, f16 = line["predictions"]["reference"], line["predictions"]["f16"]
        assert (ref.get("flagged_at"), ref.get("n_before")) == (f16.get("flagged_at"), f16.get("n_before"))


def test_progress_bar_on_a_terminal_shows_rate_and_eta(monkeypatch):
    import io
    import sys

    from edgeguard.eval.run import _progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    bar = _progress_bar(10, "q4_k_m")
    bar.update(4)
    bar.refresh()
    bar.close()
    text = err.getvalue()
    assert "q4_k_m" in text and "4/10" in text and "item/s" in text and "<" in text  # elapsed<ETA
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar
    assert _progress_bar(10, "q4_k_m") is None
