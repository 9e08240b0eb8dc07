"""Evaluation metrics against figures computed by hand (no model): tests/data/eval-hand.jsonl
with handwritten predictions, plus synthetic Stream spans whose timing answers are known."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgeguard.errors import UsageError
from edgeguard.eval import data as eval_data
from edgeguard.eval import metrics as m
from edgeguard.eval import report as eval_report

DATA = Path(__file__).parent / "data" / "eval-hand.jsonl"
# line -> (label, category, refusal) predicted; see the hand computation in each test.
PRED = {1: ("Unsafe", "Violent", None), 2: ("Controversial", "PII", "No"), 3: ("Safe", None, None),
        4: ("Controversial", "Politically Sensitive Topics", "No"), 5: ("Safe", None, None),
        6: ("Controversial", None, None), 7: ("Safe", None, None), 8: ("Safe", None, None),
        9: ("Safe", None, None), 10: ("Unsafe", "PII", "No")}
SCORES = {"Safe": 0.5, "Unsafe": 0.3, "Controversial": 0.2}


def _runs():
    base = {line: {"line": line, "label": lab, "category": cat, "refusal": ref, "scores": dict(SCORES)}
            for line, (lab, cat, ref) in PRED.items()}
    quant = {line: {**r, "scores": dict(r["scores"])} for line, r in base.items()}
    quant[5].update(label="Unsafe", scores={"Safe": 0.4, "Unsafe": 0.4, "Controversial": 0.2})
    quant[1]["scores"]["Controversial"] = 0.22
    return {"f16": base, "q4_k_m": quant}


@pytest.fixture(scope="module")
def dataset():
    return eval_data.load(DATA)


def test_malformed_lines_are_counted_with_reasons(dataset):
    assert [i.line for i in dataset.items] == list(range(1, 11))
    bad = {b.line: b.reason for b in dataset.malformed}
    assert sorted(bad) == [11, 12, 14, 15, 16, 17, 18]  # line 13 is empty: not an item, not an error
    assert "label" in bad[11] and "not JSON" in bad[12] and "Maybe" in bad[14]
    assert "not a JSON object" in bad[15] and "come together" in bad[16]
    assert "prompt" in bad[17] and "start with a user" in bad[18]
    s = dataset.summary()
    assert s["labels"] == {"Controversial": 2, "Safe": 4, "Unsafe": 4}
    assert s["modes"] == {"prompt": 7, "response": 3}
    assert s["subsets"] == {"A": 6, "B": 2, "C": 2}
    assert s["with_refusal"] == 3 and s["malformed"] == 7
    assert dataset.items[3].refusal == "Yes" and dataset.items[4].label == "Safe"


def test_nothing_usable_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnope\n')
    with pytest.raises(UsageError, match="no usable"):
        eval_data.load(bad)


def test_overall_figures_by_hand(dataset):
    report = eval_report.compute(dataset, "gen", _runs(), ["f16", "q4_k_m"])
    f = report["results"]["f16"]["metrics"]["overall"]
    # strict: gold unsafe a1 a2 a3 a6 c1 c2; predicted unsafe a1 a2 a4 a6 c2
    assert (f["strict"]["tp"], f["strict"]["fp"], f["strict"]["fn"], f["strict"]["tn"]) == (4, 1, 2, 3)
    assert f["strict"]["precision"] == pytest.approx(4 / 5)
    assert f["strict"]["recall"] == pytest.approx(4 / 6)
    assert f["strict"]["f1"] == pytest.approx(8 / 11)
    assert f["strict"]["accuracy"] == pytest.approx(7 / 10)
    # loose: gold unsafe a1 a2 c1 c2; predicted unsafe a1 c2
    assert (f["loose"]["tp"], f["loose"]["fp"], f["loose"]["fn"], f["loose"]["tn"]) == (2, 0, 2, 6)
    assert f["loose"]["precision"] == 1.0 and f["loose"]["recall"] == 0.5
    assert f["loose"]["f1"] == pytest.approx(2 / 3) and f["loose"]["accuracy"] == pytest.approx(0.8)
    assert f["label_accuracy"] == pytest.approx(0.6)
    assert f["confusion"] == {"Safe": {"Safe": 3, "Unsafe": 0, "Controversial": 1},
                              "Unsafe": {"Safe": 1, "Unsafe": 2, "Controversial": 1},
                              "Controversial": {"Safe": 1, "Unsafe": 0, "Controversial": 1}}
    # gold categories on a1 a2 a3 c1 c2 (a6 has none): right on a1 a2
    assert f["category_accuracy"] == {"hits": 2, "n": 5, "value": 0.4}
    # gold refusals on a2 (No), a4 (Yes), c2 (No); all predicted No
    assert f["refusal_accuracy"]["hits"] == 2 and f["refusal_accuracy"]["n"] == 3


def test_subsets_by_hand(dataset):
    metrics = eval_report.compute(dataset, "gen", _runs(), ["f16"])["results"]["f16"]["metrics"]
    assert sorted(metrics) == ["mode:prompt", "mode:response", "overall", "subset:A", "subset:B",
                               "subset:C"]
    # responses a2 (Unsafe -> Controversial), a4 (Safe -> Controversial), c2 (Unsafe -> Unsafe)
    r = metrics["mode:response"]
    assert (r["strict"]["tp"], r["strict"]["fp"], r["strict"]["fn"], r["strict"]["tn"]) == (2, 1, 0, 0)
    assert r["strict"]["f1"] == pytest.approx(0.8)
    assert (r["loose"]["tp"], r["loose"]["fp"], r["loose"]["fn"], r["loose"]["tn"]) == (1, 0, 1, 1)
    assert metrics["mode:prompt"]["n"] == 7
    a = metrics["subset:A"]
    assert (a["strict"]["tp"], a["strict"]["fp"], a["strict"]["fn"], a["strict"]["tn"]) == (3, 1, 1, 1)
    assert a["strict"]["f1"] == 0.75 and a["loose"]["f1"] == pytest.approx(2 / 3)
    assert a["loose"]["accuracy"] == pytest.approx(5 / 6) and a["label_accuracy"] == 0.5
    # all-safe subset, all predicted safe: precision, recall and F1 undefined, accuracy 1
    b = metrics["subset:B"]["strict"]
    assert (b["precision"], b["recall"], b["f1"], b["accuracy"]) == (None, None, None, 1.0)
    assert metrics["subset:B"]["category_accuracy"]["value"] is None
    # all-unsafe subset: one caught, one missed
    c = metrics["subset:C"]["strict"]
    assert (c["precision"], c["recall"], c["accuracy"]) == (1.0, 0.5, 0.5)
    assert c["f1"] == pytest.approx(2 / 3)


def test_empty_and_one_class_groups():
    empty = m.classification([], [])
    assert empty.n == 0 and empty.label_accuracy is None
    assert (empty.strict.precision, empty.strict.recall, empty.strict.f1, empty.strict.accuracy) == (None,) * 4
    # an all-safe group with one false alarm: precision 0, recall undefined, F1 0
    fa = m.binary(["Safe", "Safe"], ["Safe", "Unsafe"], "strict")
    assert (fa.precision, fa.recall, fa.f1, fa.accuracy) == (0.0, None, 0.0, 0.5)
    # Controversial alone: flagged under strict, not under loose
    assert m.binary(["Controversial"], ["Controversial"], "strict").tp == 1
    assert m.binary(["Controversial"], ["Controversial"], "loose").tn == 1
    assert m.binary(["Unsafe"], ["Controversial"], "loose").fn == 1


def test_quantization_agreement_by_hand(dataset):
    report = eval_report.compute(dataset, "gen", _runs(), ["f16", "q4_k_m"])
    a = report["agreement"]["q4_k_m"]
    assert a["baseline"] == "f16" and a["changed"] == [5]
    assert a["agreement"] == pytest.approx(0.9)
    assert a["max_drift"] == pytest.approx(0.1)
    assert a["mean_drift"] == pytest.approx((0.1 + 0.02) / 10)
    md = eval_report.markdown(report, dataset, _runs(), [])
    assert "| line 5 |" not in md and "| a5 | Safe | Safe | Unsafe | five |" in md


def test_baseline_is_the_most_precise_and_ties_go_to_the_first_listed():
    assert m.baseline(["q4_k_m", "q8_0", "f16"]) == "f16"
    assert m.baseline(["q4_k_m", "q8_0"]) == "q8_0"
    assert m.baseline(["bf16", "f16"]) == "bf16" and m.baseline(["f16", "bf16"]) == "f16"
    assert m.baseline(["f16", "reference"]) == "reference"
    with pytest.raises(ValueError):
        m.quant_bits("mystery")


def test_reliability_bins_edges_go_up():
    r = m.reliability([0.0, 0.05, 0.5, 0.5, 0.95, 1.0], [False, False, True, False, True, True], bins=10)
    assert r.counts == (2, 0, 0, 0, 0, 2, 0, 0, 0, 2)
    assert r.mean_score[0] == pytest.approx(0.025) and r.positive_rate[0] == 0.0
    assert r.positive_rate[5] == 0.5 and r.mean_score[9] == pytest.approx(0.975)
    assert r.mean_score[1] is None
    # ECE by hand: (2*0.025 + 2*0 + 2*0.025) / 6
    assert r.ece == pytest.approx(0.1 / 6)


def test_median_of_ties_and_even_counts():
    assert m.median([]) is None
    assert m.median([3, 1, 2]) == 2
    assert m.median([4, 1, 2, 3]) == 2.5
    assert m.median([7, 7, 7, 7]) == 7


def test_stream_timing_on_synthetic_spans():
    spans = [(10, 20), (10, 20), (0, 5), (30, 40), (5, 5), (0, 3), (100, 150)]
    flagged = [15, 80, None, 25, 5, 200, 110]
    t = m.timing(spans, flagged)
    assert (t.n, t.detected, t.early, t.in_span) == (7, 6, 1, 3)
    assert t.within == {64: 3, 128: 4}
    assert sorted(t.delays) == [-5, 0, 5, 10, 70, 200]
    assert t.median_delay == 7.5
    d = t.to_dict()
    assert d["in_first_span_share"] == pytest.approx(3 / 7)
    assert d["within"]["128"]["share"] == pytest.approx(4 / 7)
    with pytest.raises(ValueError):
        m.timing([(5, 4)], [None])


def test_template_positions_become_response_indices():
    assert m.response_span(120, 130, 100) == (20, 30)
