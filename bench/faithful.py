"""Quantization faithfulness on the trained tiny fixtures (tests/fixtures/trained.py):
label agreement between the F16 GGUF and each quant, and score drift, for Gen
(GEN_EXAMPLES) and Stream (STREAM_EXAMPLES: prompt labels and every response token's label).
The fixtures are tiny (hidden 256): this measures the runtime's quantized path end to end,
not the accuracy cost of quantizing the real 0.6B weights."""

from __future__ import annotations

from pathlib import Path

from bench.common import worker_main

GEN_QUANTS = ("f16", "bf16", "q8_0", "q4_k_m", "q4_0")
STREAM_QUANTS = ("f16", "bf16", "q8_0", "q4_k_m", "q4_0")


def _convert(ckpt: Path, quants) -> Path:
    from bench.models import _cached, cache_root
    from edgeguard_convert import ConvertOptions, convert

    def build(tmp: Path) -> None:
        out = tmp / "m"
        convert(ckpt, out, ConvertOptions(quants=tuple(quants), name=f"trained-{ckpt.name}"))
        for p in out.iterdir():
            p.rename(tmp / p.name)
        out.rmdir()

    return _cached(cache_root() / f"converted-{ckpt.name}-{'-'.join(quants)}", build)


def _trained(kind: str, allow_train: bool) -> Path | None:
    """The trained fixture's folder; None when it is not built for the current trained.py and
    training is not allowed (training takes minutes on 2 cores: run its tests first)."""
    from tests.fixtures import trained

    if not allow_train:
        try:
            from tests.fixtures.checkpoints import _key, cache_root

            base = trained._load_base(kind)[0]
            final = cache_root() / f"trained-{kind}-{_key({'src': trained._source_hash(), 'base': base.name})}"
        except (AttributeError, ImportError):
            return None
        if not final.is_dir():
            return None
    return getattr(trained, f"trained_{kind}_checkpoint")()


_SKIP = (
    "skipped: the trained {} fixture is not built for the current tests/fixtures/trained.py "
    "(run pytest tests/test_trained.py first, or pass --train-fixtures)"
)


def _drift(ref: list[dict], other: list[dict]) -> tuple[float, float]:
    diffs = [abs(a[k] - b[k]) for ra, rb in zip(ref, other) for a, b in [(ra, rb)] for k in a]
    return (max(diffs) if diffs else 0.0), (sum(diffs) / len(diffs) if diffs else 0.0)


def gen(args: dict) -> dict:
    import edgeguard
    from tests.fixtures import trained

    ckpt = _trained("gen", bool(args.get("train")))
    if ckpt is None:
        return {"skipped": _SKIP.format("gen")}
    folder = _convert(ckpt, GEN_QUANTS)
    res = {}
    for q in GEN_QUANTS:
        with edgeguard.load(folder, q, prefix_cache=None) as guard:
            vs = [guard.check(msgs) for msgs, *_ in trained.GEN_EXAMPLES]
        res[q] = {
            "labels": [v.label for v in vs],
            "scores": [dict(v.scores) for v in vs],
            "categories": [v.categories[0] if v.categories else "None" for v in vs],
            "refusal": [v.refusal for v in vs],
        }
    expected = [(lab, cat, ref) for _, lab, cat, ref in trained.GEN_EXAMPLES]
    ref = res["f16"]
    out = {"n_examples": len(expected), "quants": {}}
    for q, r in res.items():
        mx, mean = _drift(ref["scores"], r["scores"])
        n = len(expected)
        out["quants"][q] = {
            "label_agreement_vs_f16": sum(a == b for a, b in zip(ref["labels"], r["labels"])) / n,
            "category_agreement_vs_f16": sum(a == b for a, b in zip(ref["categories"], r["categories"])) / n,
            "label_accuracy_vs_expected": sum(a == e[0] for a, e in zip(r["labels"], expected)) / n,
            "max_score_drift": mx,
            "mean_score_drift": mean,
        }
    return out


def stream(args: dict) -> dict:
    import edgeguard
    from tests.fixtures import trained

    ckpt = _trained("stream", bool(args.get("train")))
    if ckpt is None:
        return {"skipped": _SKIP.format("stream")}
    folder = _convert(ckpt, STREAM_QUANTS)
    res = {}
    for q in STREAM_QUANTS:
        prompt_labels, prompt_scores, tok_labels, tok_scores = [], [], [], []
        with edgeguard.load(folder, q) as guard:
            for prompt, response, *_ in trained.STREAM_EXAMPLES:
                with guard.session(prompt) as s:
                    prompt_labels.append(s.prompt_verdict.label)
                    prompt_scores.append(dict(s.prompt_verdict.scores))
                    vs = s.feed_text(response) + s.finish()
                    tok_labels.append([v.label for v in vs])
                    tok_scores.append([dict(v.scores) for v in vs])
        res[q] = (prompt_labels, prompt_scores, tok_labels, tok_scores)
    ref = res["f16"]
    out = {"n_examples": len(trained.STREAM_EXAMPLES), "quants": {}}
    for q, (pl, ps, tl, ts) in res.items():
        flat_ref = [x for seq in ref[2] for x in seq]
        flat = [x for seq in tl for x in seq]
        mx_p, mean_p = _drift(ref[1], ps)
        mx_t, mean_t = _drift([x for seq in ref[3] for x in seq], [x for seq in ts for x in seq])
        out["quants"][q] = {
            "prompt_label_agreement_vs_f16": sum(a == b for a, b in zip(ref[0], pl)) / len(pl),
            "token_label_agreement_vs_f16": sum(a == b for a, b in zip(flat_ref, flat)) / max(1, len(flat)),
            "n_tokens": len(flat),
            "prompt_max_score_drift": mx_p,
            "prompt_mean_score_drift": mean_p,
            "token_max_score_drift": mx_t,
            "token_mean_score_drift": mean_t,
        }
    return out


if __name__ == "__main__":
    worker_main({"gen": gen, "stream": stream})
