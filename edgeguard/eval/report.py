"""From evaluation runs to figures: report.json (every figure), report.md (tables),
items.jsonl (per item: gold and each variant's prediction) and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from edgeguard.eval import metrics as m
from edgeguard.eval.data import Dataset, Item
from edgeguard.verdict import LABELS

CHANGED_LISTED = 50  # label changes listed per variant in report.md (all are in report.json)
_SNIPPET = 100


def _classification(items: Sequence[Item], records: dict[int, dict]) -> m.Classification:
    preds = [records[i.line] for i in items]
    return m.classification(
        [i.label for i in items], [p["label"] for p in preds],
        gold_categories=[i.category for i in items], pred_categories=[p.get("category") for p in preds],
        gold_refusals=[i.refusal for i in items], pred_refusals=[p.get("refusal") for p in preds])


def _timing(items: Sequence[Item], records: dict[int, dict], policy: str) -> m.Timing:
    spans, flagged = [], []
    for item in items:
        if item.unsafe_start is None or item.label == "Safe":
            continue
        r = records[item.line]
        assert item.unsafe_end is not None  # parse_item sets a span's two ends together
        spans.append(m.response_span(item.unsafe_start, item.unsafe_end, r["n_before"]))
        flagged.append(r["flagged_at"] if m.is_unsafe(r["label"], policy) else None)
    return m.timing(spans, flagged)


def _drift(a: dict, b: dict) -> float:
    if "token_scores" in a and "token_scores" in b:
        as_dicts = [[dict(zip(LABELS, t)) for t in r["token_scores"]] for r in (a, b)]
        if as_dicts[0] and as_dicts[1]:
            return m.score_drift(as_dicts[0], as_dicts[1])
    return m.score_drift(a["scores"], b["scores"])


def compute(dataset: Dataset, kind: str, runs: dict[str, dict[int, dict]], order: list[str],
            policy: str = "strict") -> dict:
    """Every figure of the report, as plain JSON types. An item that failed in any variant
    (its record holds an "error") is left out of every figure, and listed."""
    failed = [{"line": line, "variant": v, "error": r["error"]}
              for v in order for line, r in sorted(runs[v].items()) if "error" in r]
    left_out = {f["line"] for f in failed}
    items = [i for i in dataset.items if i.line not in left_out]
    groups = {"overall": list(items)}
    if len(dataset.subsets) > 1:  # one subset is the overall figure
        for subset in dataset.subsets:
            groups[f"subset:{subset}"] = [i for i in items if i.subset == subset]
    modes = sorted({i.mode for i in dataset.items})
    if len(modes) > 1:  # prompts and responses apart (Stream's response-level F1)
        for mode in modes:
            groups[f"mode:{mode}"] = [i for i in items if i.mode == mode]
    variants = {}
    for v in order:
        figures = {name: _classification(group, runs[v]).to_dict() for name, group in groups.items()}
        entry = {"metrics": figures}
        if kind == "stream":
            entry["timing"] = _timing(items, runs[v], policy).to_dict()
        entry["reliability"] = m.reliability(
            [runs[v][i.line]["scores"]["Unsafe"] for i in items],
            [m.is_unsafe(i.label, "strict") for i in items]).to_dict()
        variants[v] = entry
    base = order[0]
    agreements = {}
    keys = [i.line for i in items]
    for v in order[1:]:
        drifts = [_drift(runs[v][line], runs[base][line]) for line in keys]
        agreements[v] = m.agreement(v, base, keys, [runs[v][line]["label"] for line in keys],
                                    [runs[base][line]["label"] for line in keys], drifts).to_dict()
        agreements[v]["drifts"] = drifts
    return {"data": dataset.summary(), "engine": kind, "policy": policy, "variants": order,
            "baseline": base, "results": variants, "agreement": agreements, "failed": failed}


def item_lines(dataset: Dataset, runs: dict[str, dict[int, dict]], order: list[str]):
    """One JSON object per item: its key, gold fields and every variant's prediction."""
    for item in dataset.items:
        gold: dict[str, object] = {"label": item.label, "category": item.category, "refusal": item.refusal}
        if item.unsafe_start is not None:
            gold.update(unsafe_start_index=item.unsafe_start, unsafe_end_index=item.unsafe_end)
        predictions = {}
        for v in order:
            record = dict(runs[v][item.line])
            record.pop("line", None)
            predictions[v] = record
        yield {"line": item.line, "id": item.id, "subset": item.subset, "mode": item.mode,
               "gold": gold, "predictions": predictions}


# -- markdown ------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)]


def _snippet(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 1] + "…"


def markdown(report: dict, dataset: Dataset, runs: dict[str, dict[int, dict]], plots: Sequence[str | Path]) -> str:
    d = report["data"]
    out = ["# edgeguard eval", "",
           f"Data: `{d['file']}`: {d['items']} items ({d['malformed']} malformed lines skipped), "
           f"labels {d['labels']}, modes {d['modes']}. Engine: {report['engine']}; "
           f"baseline for quantization cost: **{report['baseline']}**.", ""]
    out += ["## Quality", "",
            "P/R/F1 in %; strict counts Controversial as unsafe, loose as safe. "
            "Accuracy is the three-label exact match.", ""]
    rows = []
    for v in report["variants"]:
        for group, f in report["results"][v]["metrics"].items():
            s, lo = f["strict"], f["loose"]
            rows.append([v, group, f["n"], _pct(f["label_accuracy"]), _pct(s["precision"]),
                         _pct(s["recall"]), _pct(s["f1"]), _pct(lo["precision"]), _pct(lo["recall"]),
                         _pct(lo["f1"]), _pct(f["category_accuracy"]["value"]),
                         _pct(f["refusal_accuracy"]["value"])])
    out += _table(["variant", "group", "n", "accuracy", "P strict", "R strict", "F1 strict", "P loose",
                   "R loose", "F1 loose", "category acc.", "refusal acc."], rows)
    base = report["baseline"]
    cm = report["results"][base]["metrics"]["overall"]["confusion"]
    out += ["", f"Confusion matrix ({base}, rows gold, columns predicted):", ""]
    out += _table(["gold \\ predicted", *LABELS], [[g, *(cm[g][p] for p in LABELS)] for g in LABELS])
    if report["engine"] == "stream":
        out += ["", "## Stream detection timing", "",
                "Over gold-unsafe responses with a known first unsafe span (positions converted to "
                "response tokens); delay = trigger index - span start, in tokens.", ""]
        rows = []
        for v in report["variants"]:
            t = report["results"][v]["timing"]
            rows.append([v, t["n"], t["detected"], _pct(t["in_first_span_share"]),
                         _pct(t["within"]["64"]["share"]), _pct(t["within"]["128"]["share"]),
                         "n/a" if t["median_delay_tokens"] is None else t["median_delay_tokens"], t["early"]])
        out += _table(["variant", "spans", "flagged", "in first span %", "within 64 %", "within 128 %",
                       "median delay", "flagged early"], rows)
    if report["agreement"]:
        out += ["", "## Quantization cost", "",
                f"Against {base}: label agreement, and the largest difference of any label's score per "
                "item (for streamed responses, over all tokens), averaged and at its worst.", ""]
        rows = [[v, a["n"], _pct(a["agreement"]), f"{a['mean_drift']:.4f}", f"{a['max_drift']:.4f}",
                 len(a["changed"])] for v, a in report["agreement"].items()]
        out += _table(["variant", "n", "agreement %", "mean drift", "max drift", "labels changed"], rows)
        by_line = {i.line: i for i in dataset.items}
        for v, a in report["agreement"].items():
            if not a["changed"]:
                continue
            out += ["", f"### Labels changed: {v} vs {base}", ""]
            rows = [[by_line[line].key, by_line[line].label, runs[base][line]["label"], runs[v][line]["label"],
                     _snippet(by_line[line].text)] for line in a["changed"][:CHANGED_LISTED]]
            out += _table(["item", "gold", base, v, "text"], rows)
            if len(a["changed"]) > CHANGED_LISTED:
                out += ["", f"... and {len(a['changed']) - CHANGED_LISTED} more in report.json."]
    if report["failed"]:
        out += ["", "## Items left out (failed in a variant)", ""]
        out += [f"- line {x['line']} ({x['variant']}): {x['error']}" for x in report["failed"][:CHANGED_LISTED]]
    if d["malformed"]:
        out += ["", "## Malformed input lines", ""]
        out += [f"- line {x['line']}: {x['reason']}" for x in d["malformed_lines"][:CHANGED_LISTED]]
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


def write(out: Path, report: dict, dataset: Dataset, runs, order: list[str], plots: Sequence[str | Path]) -> None:
    """report.json, report.md and items.jsonl, each written whole then renamed into place."""
    def put(name: str, text: str) -> None:
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)

    put("report.json", json.dumps({**report, "plots": [Path(p).name for p in plots]}, indent=2) + "\n")
    put("report.md", markdown(report, dataset, runs, plots))
    put("items.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n"
                               for x in item_lines(dataset, runs, order)))
