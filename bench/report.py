"""Markdown tables and target checks from the results dict (pure functions of the JSON)."""

from __future__ import annotations

import statistics

# Raspberry Pi 5 estimate: assumptions stated in the output.
PI5_CORE_FACTOR = 0.4  # one Cortex-A76 core at 2.4 GHz ~ 0.4x one core of this machine for llama.cpp
PI5_4T_SCALING = 3.0  # 4 threads ~ 3x one thread on the Pi (memory bandwidth bound)


def _f(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _r(x):
    return "n/a" if x is None else f"{x:.2f}x"


def _med(d, key="median_ms"):
    return (d or {}).get(key)


def _div(a, b):
    return None if a is None or not b else a / b


def gen_vs_transformers(gen_q: dict, tf: dict, kind: str | None = None):
    """Ratio of medians over the inputs both measured (optionally one kind only)."""
    if not tf or "per_input_median_ms" not in tf or "per_input_median_ms" not in gen_q:
        return None
    ours, theirs = [], []
    for k, t in tf["per_input_median_ms"].items():
        g = gen_q["per_input_median_ms"].get(k)
        if g and g["ours"] is not None and (kind is None or g["kind"] == kind):
            ours.append(g["ours"])
            theirs.append(t)
    if not ours:
        return None
    return statistics.median(ours) / statistics.median(theirs)


def targets(res: dict) -> list[dict]:
    out = []
    g = res.get("gen", {})
    q4 = g.get("quants", {}).get("q4_k_m", {})
    tfb = g.get("transformers", {}).get("bf16")
    if q4 and "ours_by_kind" in q4:
        r = _div(_med(q4["ours_by_kind"].get("short")), _med(q4["plain_by_kind"].get("short")))
        out.append(
            {
                "target": "Gen short prompt, Q4_K_M: edgeguard / llama.cpp generation <= 1/3",
                "value": r,
                "met": r is not None and r <= 1 / 3,
            }
        )
        r = gen_vs_transformers(q4, tfb, "short")
        out.append(
            {
                "target": "Gen short prompt, Q4_K_M: edgeguard / transformers bf16 generate <= 1/6",
                "value": r,
                "met": r is not None and r <= 1 / 6,
            }
        )
    s = res.get("stream", {})
    sq = s.get("runs", {}).get("q4_k_m-t2", {})
    if "feed" in sq:
        r = _div(_med(sq["feed"]), _med(sq["bare_decode"]))
        out.append(
            {
                "target": "Stream per token, Q4_K_M: feed / bare llama.cpp decode step <= 0.8",
                "value": r,
                "met": r is not None and r <= 0.8,
            }
        )
        tf = s.get("transformers", {}).get("bf16", {})
        r = _div(_med(tf.get("per_token")), _med(sq["feed"]))
        out.append(
            {
                "target": "Stream per token: transformers bf16 KV-cache step / feed >= 5",
                "value": r,
                "met": r is not None and r >= 5,
            }
        )
        b = sq["backlog"]
        r = _div(_med(b["one_feed"]), _med(b["k_single_feeds"]))
        out.append(
            {
                "target": f"Stream backlog of {b['k']}: one feed costs one forward (< k single feeds)",
                "value": r,
                "met": r is not None and r < 0.5,
            }
        )
    out += _batch_targets(res.get("batch", {}))
    m = res.get("memory", {})
    for key, label in (("gen_q4_k_m", "Gen"), ("stream_q4_k_m", "Stream")):
        if "peak_rss_mb" in m.get(key, {}):
            v = m[key]["peak_rss_mb"]
            out.append(
                {
                    "target": f"Peak RSS, {label} Q4_K_M engine process <= 700 MB",
                    "value": v,
                    "met": v <= 700,
                    "unit": "MB",
                }
            )
    c = res.get("coldstart", {}).get("cli", {})
    if c.get("runs"):
        for run in c["runs"][:2]:
            out.append(
                {
                    "target": f"One-shot `edgeguard check` < 2 s (prefix cache {run['prefix_cache']})",
                    "value": run["wall_s"],
                    "met": run["ok"] and run["wall_s"] < 2,
                    "unit": "s",
                }
            )
    return out


def _batch_targets(b: dict) -> list[dict]:
    out = []
    g, s = b.get("gen", {}), b.get("stream", {})
    if "throughput_ratio" in g:
        out.append(
            {
                "target": f"Gen check_many(batch_size={g['batch_size']}) throughput / one-by-one >= 1.3",
                "value": g["throughput_ratio"],
                "met": g["throughput_ratio"] >= 1.3,
            }
        )
        out.append(
            {
                "target": "Gen check_many(batch_size=1) time / one-by-one loop <= 1.05 (no slower)",
                "value": g["batch1_vs_loop"],
                "met": g["batch1_vs_loop"] <= 1.05,
            }
        )
    if "step_ratio" in s:
        out.append(
            {
                "target": f"Stream: one step of {s['sessions']} sessions / one session's step <= 2",
                "value": s["step_ratio"],
                "met": s["step_ratio"] <= 2,
            }
        )
        out.append(
            {
                "target": f"Peak RSS, Stream Q4_K_M with {s['sessions']} live sessions of {s['fill']} tokens <= 900 MB",
                "value": s["peak_rss_mb"],
                "met": s["peak_rss_mb"] <= 900,
                "unit": "MB",
            }
        )
    return out


def markdown(res: dict) -> str:
    L = []
    m = res.get("machine", {})
    L += [
        f"# edgeguard benchmark ({'quick' if res.get('quick') else 'full'} run)",
        "",
        f"Command: `{res.get('command')}`  ",
        f"Machine: {m.get('cpu')} ({', '.join(m.get('simd', []))}), {m.get('cores_usable')} usable cores, "
        f"{m.get('mem_total_mb')} MB; llama-cpp-python {m.get('llama_cpp_python')}, onnxruntime "
        f"{m.get('onnxruntime')}, torch {m.get('torch')}, transformers {m.get('transformers')}  ",
        f"Models: random weights, exact Qwen3Guard-0.6B shapes, converted by edgeguard's converter. "
        f"Wall time {_f(res.get('wall_s'), 0)} s (model build {_f(res.get('models_s'), 0)} s). "
        f"Load average at start {m.get('loadavg_start')}, at end {res.get('loadavg_end')}: "
        f"the machine is shared, absolute times are noisy; ratios compare runs interleaved in one process.",
        "",
    ]

    L += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in res.get("targets", []):
        v = t["value"]
        val = (
            "n/a"
            if v is None
            else (
                f"{v:.0f} {t['unit']}"
                if t.get("unit") == "MB"
                else f"{v:.2f} {t['unit']}"
                if t.get("unit")
                else f"{v:.3f}"
            )
        )
        L.append(f"| {t['target']} | {val} | {'yes' if t['met'] else 'NO'} |")
    L.append("")

    g = res.get("gen", {})
    if g.get("quants"):
        tf = g.get("transformers", {})
        L += [
            "## Gen: warm check vs plain generation of the verdict "
            f"(threads: {next(iter(g['quants'].values())).get('threads', 2)})",
            "",
            "edgeguard `GenGuard.check` (prefix cache, scored read-outs) vs llama.cpp's C API greedy "
            "generation of 9 tokens on the same GGUF and tokens, fresh KV per check; interleaved input by "
            "input. transformers `generate` (greedy, 9 new tokens) on a subset of the same inputs. "
            "Times in ms (median / p90). A lone check speculates that the label is "
            f"{next(iter(g['quants'].values())).get('guess', 'Safe')} and reads the category in the same decode; "
            "a wrong guess costs one short decode more (`readout` below).",
            "",
            "| quant | edgeguard short | llama.cpp short | ratio short (<= 0.33) | edgeguard all | "
            "llama.cpp all | ratio all | vs tf bf16 short (<= 0.167) | vs tf bf16 subset | vs tf fp32 subset |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for q, r in g["quants"].items():
            if "error" in r:
                L.append(f"| {q} | error: {r['error']} |")
                continue
            os_, ps = r["ours_by_kind"].get("short", {}), r["plain_by_kind"].get("short", {})
            L.append(
                f"| {q} | {_f(_med(os_))} / {_f(_med(os_, 'p90_ms'))} | {_f(_med(ps))} / "
                f"{_f(_med(ps, 'p90_ms'))} | {_r(_div(_med(os_), _med(ps)))} | {_f(_med(r['ours']))} / "
                f"{_f(_med(r['ours'], 'p90_ms'))} | {_f(_med(r['plain']))} / {_f(_med(r['plain'], 'p90_ms'))} | "
                f"{_r(_div(_med(r['ours']), _med(r['plain'])))} | "
                f"{_r(gen_vs_transformers(r, tf.get('bf16'), 'short'))} | "
                f"{_r(gen_vs_transformers(r, tf.get('bf16')))} | {_r(gen_vs_transformers(r, tf.get('fp32')))} |"
            )
        L += [
            "",
            "By input kind (median ms; tokens = rendered template + text):",
            "",
            "| quant | kind | tokens | edgeguard | llama.cpp | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for q, r in g["quants"].items():
            if "error" in r:
                continue
            toks = {}
            for k, d in r["per_input_median_ms"].items():
                toks.setdefault(d["kind"], []).append(r["n_tokens"][k])
            for kind, o in r["ours_by_kind"].items():
                p = r["plain_by_kind"].get(kind, {})
                L.append(
                    f"| {q} | {kind} | {min(toks[kind])}-{max(toks[kind])} | {_f(_med(o))} | {_f(_med(p))} | "
                    f"{_r(_div(_med(o), _med(p)))} |"
                )
        if tf:
            L += ["", "| transformers | inputs | median ms | p90 ms | load s |", "|---|---|---|---|---|"]
            for d, r in tf.items():
                if "error" in r:
                    L.append(f"| {d} | error: {r['error']} | | | |")
                else:
                    L.append(
                        f"| {d} generate | {r['generate']['n']} | {_f(_med(r['generate']))} | "
                        f"{_f(_med(r['generate'], 'p90_ms'))} | {_f(r['load_s'])} |"
                    )
        L += [
            "",
            "Where a check's time goes (edgeguard's own timings, median over short inputs, ms): "
            "prefix = template tokenization + prefix-cache match/restore; label = decode of the user part + "
            "`Safety:` and the label read-out; readout = category (and refusal) continuations.",
            "",
            "| quant | tokenize | prefix | label | readout |",
            "|---|---|---|---|---|",
        ]
        for q, r in g["quants"].items():
            if "error" in r:
                continue
            b = r["breakdown_short_median_ms"]
            L.append(
                f"| {q} | {_f(_med(r['tokenize_ms']), 2)} | {_f(b.get('prefix_ms'), 2)} | "
                f"{_f(b.get('label_ms'))} | {_f(b.get('readout_ms'))} |"
            )
        L.append("")

    s = res.get("stream", {})
    if s.get("runs"):
        L += [
            "## Stream: per-token cost vs a bare llama.cpp decode step",
            "",
            "`session.feed([id])` (backbone GGUF with a dummy vocabulary fed embedding rows + ONNX heads) vs one "
            "bare `llama_decode` of 1 token with its logits on the plain full-vocabulary GGUF of the same "
            "weights and quant (and the same in embeddings mode), interleaved token by token at the same "
            "positions. ms, median / p90.",
            "",
            "| run | feed | bare decode (logits) | ratio (<= 0.8) | bare decode, embeddings mode | "
            "backlog 16: one feed | 16 single feeds | ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k, r in s["runs"].items():
            if "error" in r:
                L.append(f"| {k} | error: {r['error']} |")
                continue
            b = r["backlog"]
            L.append(
                f"| {k} | {_f(_med(r['feed']), 2)} / {_f(_med(r['feed'], 'p90_ms'), 2)} | "
                f"{_f(_med(r['bare_decode']), 2)} / {_f(_med(r['bare_decode'], 'p90_ms'), 2)} | "
                f"{_r(_div(_med(r['feed']), _med(r['bare_decode'])))} | "
                f"{_f(_med(r['bare_decode_embd_mode']), 2)} | {_f(_med(b['one_feed']))} | "
                f"{_f(_med(b['k_single_feeds']))} | {_r(_div(_med(b['one_feed']), _med(b['k_single_feeds'])))} |"
            )
        L += [
            "",
            "Per-token breakdown (median ms): llama.cpp decode (embedding rows in, hidden state out), "
            "ONNX heads, the rest (embedding-row lookup, softmax, TokenVerdict, debounce, text piece).",
            "",
            "| run | feed | llama decode | onnx heads | python/other |",
            "|---|---|---|---|---|",
        ]
        for k, r in s["runs"].items():
            if "error" not in r:
                b = r["breakdown_median_ms"]
                L.append(
                    f"| {k} | {_f(b['feed_total'], 2)} | {_f(b['llama_decode'], 2)} | {_f(b['onnx_heads'], 3)} | "
                    f"{_f(b['python_other'], 3)} |"
                )
        L += [
            "",
            "Prompt `check` (query heads at the user turn's end) vs a bare llama.cpp prefill of the same "
            "number of tokens, fresh KV (median ms):",
            "",
            "| run | kind | tokens | check | bare prefill | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for k, r in s["runs"].items():
            if "error" not in r:
                for kind, d in r["check_by_kind"].items():
                    L.append(
                        f"| {k} | {kind} | {d['n_tokens']} | {_f(_med(d['check']))} | "
                        f"{_f(_med(d['bare_prefill']))} | {_r(_div(_med(d['check']), _med(d['bare_prefill'])))} |"
                    )
        tf = s.get("transformers", {})
        base = s["runs"].get("q4_k_m-t2", {})
        if tf:
            L += [
                "",
                "transformers Qwen3Model + heads, one KV-cache forward per token (2 threads):",
                "",
                "| dtype | per token median ms | p90 | feed Q4_K_M faster by (>= 5x) | feed Q8_0 faster by |",
                "|---|---|---|---|---|",
            ]
            q8 = s["runs"].get("q8_0-t2", {})
            for d, r in tf.items():
                if "error" in r:
                    L.append(f"| {d} | error: {r['error']} | | | |")
                    continue
                L.append(
                    f"| {d} | {_f(_med(r['per_token']))} | {_f(_med(r['per_token'], 'p90_ms'))} | "
                    f"{_r(_div(_med(r['per_token']), _med(base.get('feed'))))} | "
                    f"{_r(_div(_med(r['per_token']), _med(q8.get('feed'))))} |"
                )
        L.append("")

    th = res.get("threads", {})
    if th:
        L += ["## Threads (Q4_K_M)", "", "| measurement | 1 thread | 2 threads | speed-up |", "|---|---|---|---|"]
        for name, (a, b) in th.get("rows", {}).items():
            L.append(f"| {name} | {_f(a, 2)} ms | {_f(b, 2)} ms | {_r(_div(a, b))} |")
        if th.get("pi5_estimate"):
            L += ["", th["pi5_estimate"]]
        L.append("")

    c = res.get("coldstart", {})
    if c.get("cli", {}).get("runs"):
        L += [
            "## Cold start: one-shot `edgeguard check --json` process (Q4_K_M)",
            "",
            f"`{c['cli']['command']}` (model on local disk, in the page cache after run 1)",
            "",
            "| run | prefix cache | wall s | exit |",
            "|---|---|---|---|",
        ]
        for r in c["cli"]["runs"]:
            L.append(f"| {r['run']} | {r['prefix_cache']} | {_f(r['wall_s'], 2)} | {r['exit']} |")
        for name in ("phases_empty", "phases_persisted"):
            p = c.get(name, {})
            if "import_s" in p:
                L.append(
                    f"\nPhases ({name.split('_')[1]} prefix cache), in-process: imports {_f(p['import_s'], 2)} s, "
                    f"load {_f(p['load_s'], 2)} s, first check {_f(p['first_check_s'], 2)} s "
                    f"({', '.join(f'{k} {v:.0f} ms' for k, v in p['first_check_timings_ms'].items())})."
                )
        L.append("")

    mem = res.get("memory", {})
    if mem:
        L += [
            "## Peak memory (VmHWM, each in its own process)",
            "",
            "| process | peak RSS MB | target |",
            "|---|---|---|",
        ]
        for k, r in mem.items():
            if k.startswith("bd_"):
                continue
            tgt = "<= 700" if k in ("gen_q4_k_m", "stream_q4_k_m") else ""
            L.append(
                f"| {r.get('what', k)} | {_f(r.get('peak_rss_mb'), 0) if 'error' not in r else r['error']} | {tgt} |"
            )
        bds = {k: r for k, r in mem.items() if k.startswith("bd_") and "steps_rss_mb" in r}
        if bds:
            L += [
                "",
                "Memory profile: RSS (MB) of the bare llama.cpp engine step by step, each variant in its own "
                "process (quantized weights are memory-mapped and, by default, also repacked into a second copy for the CPU kernels):",
                "",
                "| variant | start | model loaded | context created | after 300-token decode | peak |",
                "|---|---|---|---|---|---|",
            ]
            for k, r in bds.items():
                st = r["steps_rss_mb"]
                L.append(
                    f"| {r['what']} | {st['start']:.0f} | {st['model_loaded']:.0f} | {st['context_created']:.0f} | "
                    f"{st['after_300_token_decode']:.0f} | {r['peak_rss_mb']:.0f} |"
                )
        L.append("")

    fa = res.get("faithfulness", {})
    if fa:
        L += ["## Quantization faithfulness (trained tiny fixtures, hidden 256; vs the F16 GGUF)", ""]
        gq = fa.get("gen", {})
        if "quants" in gq:
            L += [
                f"Gen, {gq['n_examples']} held-out conversations:",
                "",
                "| quant | label agreement | category agreement | accuracy vs expected | max score drift | "
                "mean score drift |",
                "|---|---|---|---|---|---|",
            ]
            for q, r in gq["quants"].items():
                L.append(
                    f"| {q} | {r['label_agreement_vs_f16']:.0%} | {r['category_agreement_vs_f16']:.0%} | "
                    f"{r['label_accuracy_vs_expected']:.0%} | {r['max_score_drift']:.4f} | {r['mean_score_drift']:.4f} |"
                )
        elif gq:
            L.append(f"Gen: {gq.get('skipped') or gq.get('error')}")
        sq = fa.get("stream", {})
        if "quants" in sq:
            L += [
                "",
                f"Stream, {sq['n_examples']} held-out prompt/response pairs:",
                "",
                "| quant | prompt label agreement | token label agreement | tokens | prompt max drift | "
                "token max drift | token mean drift |",
                "|---|---|---|---|---|---|---|",
            ]
            for q, r in sq["quants"].items():
                L.append(
                    f"| {q} | {r['prompt_label_agreement_vs_f16']:.0%} | {r['token_label_agreement_vs_f16']:.1%} | "
                    f"{r['n_tokens']} | {r['prompt_max_score_drift']:.4f} | {r['token_max_score_drift']:.4f} | "
                    f"{r['token_mean_score_drift']:.4f} |"
                )
        elif sq:
            L.append(f"\nStream: {sq.get('skipped') or sq.get('error')}")
        L.append("")
    noise = []
    for sec in ("gen", "stream", "threads", "memory"):
        d = res.get(sec, {})
        for group in ("quants", "runs", "transformers", None):
            items = (d.get(group, {}) if group else d) if isinstance(d, dict) else {}
            for k, r in items.items():
                if isinstance(r, dict) and "loadavg_1min" in r:
                    noise.append(f"{sec}/{k}: {r['loadavg_1min'][0]:.1f} -> {r['loadavg_1min'][1]:.1f}")
    if noise:
        L += [
            "## Noise",
            "",
            "1-minute load average before -> after each worker (2 cores; the worker itself accounts for "
            "about 2, anything above means other processes were competing for the CPUs, and llama.cpp's OpenMP threads spin-wait, so a 2-thread engine "
            "slows down far more than proportionally): " + "; ".join(dict.fromkeys(noise)) + ".",
            "",
        ]
    errs = res.get("errors", [])
    if errs:
        L += ["## Errors", ""] + [f"- {e}" for e in errs] + [""]
    return "\n".join(L)


def pi5_estimate(t1_ms: dict) -> str:
    factor = 1 / (PI5_CORE_FACTOR * PI5_4T_SCALING)
    parts = ", ".join(f"{k} ~{v * factor:.0f} ms" for k, v in t1_ms.items() if v)
    return (
        f"**ESTIMATE (not measured)** for a 4-core Raspberry Pi 5: {parts}. Derived from the 1-thread "
        f"numbers above x {factor:.2f}, assuming one Cortex-A76 core is {PI5_CORE_FACTOR}x one core of this "
        f"machine for llama.cpp's quantized kernels and 4 threads give {PI5_4T_SCALING}x one thread "
        f"(decode steps are memory-bandwidth bound there, so treat this as optimistic)."
    )


if __name__ == "__main__":  # re-render: python -m bench.report results.json [results.md]
    import json
    import sys
    from pathlib import Path

    data = json.loads(Path(sys.argv[1]).read_text())
    data["targets"] = targets(data)
    text = markdown(data)
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(text + "\n")
    print(text)
