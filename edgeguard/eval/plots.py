"""PNG plots of an evaluation report, with matplotlib (the ``eval`` extra) on the Agg backend."""

from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "plots skipped: matplotlib is not installed (pip install 'edgeguard[eval]')"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot(report: dict, out: Path, progress=lambda m: None) -> list[Path]:
    """The plots that apply to this report; none (and one line said) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        progress(INSTALL_HINT)
        return []
    written = []
    for name, draw in (("score-drift", _drift), ("reliability", _reliability), ("detection-delay", _delay)):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        try:
            if draw(report, ax):
                path = out / f"{name}.png"
                fig.tight_layout()
                fig.savefig(path)
                written.append(path)
        finally:
            plt.close(fig)
    return written


def _drift(report: dict, ax) -> bool:
    agreement = report["agreement"]
    if not agreement:
        return False
    top = max((max(a["drifts"]) for a in agreement.values() if a["drifts"]), default=0.0) or 1e-6
    bins = [top * k / 30 for k in range(30)] + [top]  # top itself: k/30*30 may round below it
    for variant, a in agreement.items():
        ax.hist(a["drifts"], bins=bins, histtype="step", linewidth=2, label=variant)
    ax.set_xlabel(f"score drift against {report['baseline']} (largest |difference| of a label's score)")
    ax.set_ylabel("items")
    ax.set_yscale("symlog")
    ax.set_title("Quantization: score drift per item")
    ax.legend()
    return True


def _reliability(report: dict, ax) -> bool:
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for variant in report["variants"]:
        r = report["results"][variant]["reliability"]
        points = [(s, p) for s, p, c in zip(r["mean_score"], r["positive_rate"], r["counts"]) if c]
        if points:
            ece = r["ece"]
            ax.plot(*zip(*points), marker="o", label=f"{variant} (ECE {ece:.3f})")
    ax.set_xlabel("predicted Unsafe score (bin mean)")
    ax.set_ylabel("share gold unsafe (strict)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability of the Unsafe score")
    ax.legend()
    return True


def _delay(report: dict, ax) -> bool:
    if report["engine"] != "stream":
        return False
    delays = {v: report["results"][v]["timing"]["delays"] for v in report["variants"]}
    every = [d for ds in delays.values() for d in ds]
    if not every:
        return False
    lo, hi = min(every), max(every)
    step = max(1, -(-(hi - lo + 1) // 60))  # whole tokens per bin, at most ~60 bins
    bins = [lo - 0.5 + step * k for k in range((hi - lo) // step + 2)]
    for variant, ds in delays.items():
        if ds:
            ax.hist(ds, bins=bins, histtype="step", linewidth=2, label=variant)
    ax.axvline(0, color="grey", linestyle=":")
    ax.set_xlabel("detection delay (tokens after the first unsafe span starts)")
    ax.set_ylabel("responses")
    ax.set_title("Stream: detection delay")
    ax.legend()
    return True
