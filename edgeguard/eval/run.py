"""`edgeguard eval`: a labelled JSONL set through one model in several quants (and optionally
the original checkpoint through transformers), resumable, then metrics and a report.

Predictions go to ``OUT/runs/<quant>.jsonl``, one line per item, appended and flushed as they
are made; the first line records the input's sha256 and the model, so a rerun into the same
folder continues after the last complete line of a run of the same data, and refuses another.
``edgeguard.eval.report`` turns the runs into report.md, report.json, items.jsonl and plots.

Stream items with a response are fed token by token as the model would stream them; their
label is the official debounce's. A ``_loc`` span (Qwen3GuardTest ``unsafe_start_index`` /
``unsafe_end_index``) counts positions in the whole chat-template tokenization of the
conversation; it becomes response-token indices by subtracting the number of template tokens
before the response's first token (``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>
assistant\\n<think>\\n\\n</think>\\n\\n`` for the Qwen3 template), which is recorded per item.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeguard.errors import ModelError, UsageError
from edgeguard.eval.data import Dataset, Item

REFERENCE = "reference"
RUNS = "runs"
_DIGITS = 6


@dataclass(frozen=True)
class EvalOptions:
    model: str | None = None
    quants: tuple[str, ...] = ("q4_k_m",)
    engine: str | None = None
    reference: Path | None = None
    policy: str = "strict"
    offline: bool | None = None
    n_threads: int | None = None
    guard_options: tuple[tuple[str, object], ...] = ()  # extra engine options for load()

    def __post_init__(self) -> None:
        if not self.quants and self.reference is None:
            raise UsageError("nothing to evaluate: give --quant or --reference")
        if len(set(self.quants)) != len(self.quants):
            raise UsageError(f"a quant is listed twice: {','.join(self.quants)}")
        if self.engine not in (None, "gen", "stream"):
            raise UsageError(f"--engine must be gen or stream, got {self.engine!r}")

    @property
    def variants(self) -> tuple[str, ...]:
        return self.quants + ((REFERENCE,) if self.reference is not None else ())


def _round(scores) -> dict[str, float]:
    return {k: round(float(v), _DIGITS) for k, v in scores.items()}


# -- one item through one engine ---------------------------------------------------------
def gen_record(guard, item: Item) -> dict:
    verdict = guard.check([{"role": r, "content": c} for r, c in item.messages])
    return {"label": verdict.label, "scores": _round(verdict.scores),
            "category": verdict.categories[0] if verdict.categories else None,
            "refusal": verdict.refusal}


def stream_record(guard, item: Item, n_before: Callable[[list[dict]], int] | None) -> dict:
    prompt = item.prompt_messages
    if item.response is None:
        verdict = guard.check(prompt)
        return {"label": verdict.label, "scores": _round(verdict.scores),
                "category": verdict.categories[0] if verdict.categories else None, "refusal": None}
    with guard.session(prompt) as session:
        session.feed_text(item.response)
        session.finish()
        state = session.state
        tokens = [_round(v.scores) for v in session.verdicts]
    riskiest = max(tokens, key=lambda s: s["Unsafe"]) if tokens else {"Safe": 1.0, "Unsafe": 0.0,
                                                                         "Controversial": 0.0}
    assert n_before is not None  # run_all passes a counter whenever an item has a response
    return {"label": state.label, "scores": riskiest, "category": state.category, "refusal": None,
            "flagged_at": state.flagged_at, "n_before": n_before(prompt),
            "token_scores": [[s["Safe"], s["Unsafe"], s["Controversial"]] for s in tokens]}


class TemplateCounter:
    """Counts the chat-template tokens before a response, with the model's own vocabulary and
    template (as the Qwen3GuardTest positions count them)."""

    _PROBE = "\ue000edgeguard-eval-response\ue001"

    def __init__(self, folder: Path, manifest) -> None:
        from edgeguard.engines.template import ChatTemplate
        from edgeguard.runtime.backend import Vocab

        self._vocab = Vocab(folder / manifest.file_for("vocab"))
        source = self._vocab.meta("tokenizer.chat_template")
        if not source:
            self._vocab.close()
            raise ModelError(f"{manifest.name}: the vocabulary carries no chat template")
        self._template = ChatTemplate(source)

    def __call__(self, prompt: list[dict]) -> int:
        from edgeguard.engines.template import Message, as_messages, tokenize_pieces

        messages = as_messages(prompt) + [Message("assistant", self._PROBE)]
        pieces = self._template.pieces(messages)
        where = max(i for i, (control, text) in enumerate(pieces) if not control and self._PROBE in text)
        head = pieces[where][1]
        pieces = pieces[:where] + [(False, head[: head.index(self._PROBE)])]
        return len(tokenize_pieces(pieces, self._vocab.tokenize, self._vocab.token_id))

    def close(self) -> None:
        self._vocab.close()


# -- resumable runs ----------------------------------------------------------------------
def _header(dataset: Dataset, options: EvalOptions, variant: str, kind: str) -> dict:
    model = str(options.reference) if variant == REFERENCE else str(options.model)
    return {"input_sha256": dataset.sha256, "model": model, "variant": variant, "engine": kind}


def _done_lines(path: Path, header: dict) -> dict[int, dict]:
    """Records already in a run file (a torn last line is cut off)."""
    if not path.exists():
        return {}
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    lines = data[:end].splitlines()
    if not lines:
        return {}
    try:
        found = json.loads(lines[0])
        records = [json.loads(x) for x in lines[1:]]
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is damaged ({e.msg}); delete it to start this run again") from e
    if found != header:
        raise UsageError(f"{path} holds a run of other data or another model ({found.get('model')}); "
                         "use another --out folder or delete it")
    return {r["line"]: r for r in records}


def _progress_bar(total: int, desc: str):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)


def run_variant(dataset: Dataset, options: EvalOptions, variant: str, out: Path, guard, kind: str,
                n_before: Callable[[list[dict]], int] | None = None,
                progress: Callable[[str], None] = lambda m: None,
                stop_after: int | None = None) -> dict[int, dict]:
    """Predictions for every item through ``guard``, resuming ``out/runs/<variant>.jsonl``.
    ``stop_after`` ends the run early after that many new items (to test resuming)."""
    path = out / RUNS / f"{variant}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _header(dataset, options, variant, kind)
    done = _done_lines(path, header)
    todo = [item for item in dataset.items if item.line not in done]
    if done:
        progress(f"{variant}: resuming, {len(done)} of {len(dataset.items)} items already done")
    bar = _progress_bar(len(dataset.items), variant)
    if bar is not None:
        bar.update(len(done))
    with open(path, "ab") as f:
        if not done:
            f.write(json.dumps(header).encode() + b"\n")
        for count, item in enumerate(todo):
            if stop_after is not None and count >= stop_after:
                break
            try:
                record = (gen_record(guard, item) if kind == "gen"
                          else stream_record(guard, item, n_before))
            except UsageError as e:  # e.g. a conversation longer than the model's context
                record = {"error": str(e)}
                progress(f"{variant}: {item.key}: left out: {e}")
            record["line"] = item.line
            f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            f.flush()
            done[item.line] = record
            if bar is not None:
                bar.update(1)
        os.fsync(f.fileno())
    if bar is not None:
        bar.close()
    return done


def _load_guard(options: EvalOptions, quant: str, progress):
    from edgeguard.loader import load

    extra: dict[str, Any] = dict(options.guard_options)
    return load(options.model, quant, policy=options.policy, engine=options.engine,
                offline=options.offline, progress=progress, n_threads=options.n_threads, **extra)


def run_all(dataset: Dataset, options: EvalOptions, out: Path,
            progress: Callable[[str], None] = lambda m: None,
            stop_after: int | None = None) -> tuple[str, dict[str, dict[int, dict]]]:
    """(engine kind, {variant: {line: record}}) for every quant and the reference."""
    from edgeguard.loader import resolve

    runs: dict[str, dict[int, dict]] = {}
    kind: str | None = None
    for quant in options.quants:
        with ExitStack() as stack:
            guard = stack.enter_context(_load_guard(options, quant, progress))
            kind = guard.engine
            counter = None
            if kind == "stream" and any(i.response is not None for i in dataset.items):
                folder, manifest, _ = resolve(options.model, quant, kind="stream", offline=options.offline)
                counter = TemplateCounter(folder, manifest)
                stack.callback(counter.close)
            runs[quant] = run_variant(dataset, options, quant, out, guard, kind, counter, progress,
                                      stop_after)
    if options.reference is not None:
        from edgeguard.eval.reference import load_reference

        with load_reference(options.reference) as ref:
            if kind is not None and ref.engine != kind:
                raise UsageError(f"--reference is a {ref.engine} checkpoint, the model a {kind} one")
            kind = ref.engine
            runs[REFERENCE] = run_variant(dataset, options, REFERENCE, out, ref, kind, ref.count_before,
                                          progress, stop_after)
    assert kind is not None  # EvalOptions holds a quant or a reference, so a variant ran
    return kind, runs


def check_complete(dataset: Dataset, runs: dict[str, dict[int, dict]]) -> None:
    for variant, records in runs.items():
        missing = [i.line for i in dataset.items if i.line not in records]
        if missing:
            raise UsageError(f"{variant}: {len(missing)} items not evaluated yet; run again to resume")


def variants_in_order(variants: Sequence[str]) -> list[str]:
    """Most precise first (the baseline), then the others in the order given."""
    from edgeguard.eval.metrics import baseline

    base = baseline(list(variants))
    return [base] + [v for v in variants if v != base]


@dataclass(frozen=True)
class EvalResult:
    out: Path
    report: dict
    plots: tuple[Path, ...]


def run_eval(data: str | Path, options: EvalOptions, out: str | Path,
             progress: Callable[[str], None] = lambda m: None, stop_after: int | None = None) -> EvalResult:
    """Validate ``data``, run every variant (resuming), then write the report into ``out``."""
    from edgeguard.eval import data as eval_data
    from edgeguard.eval import plots as eval_plots
    from edgeguard.eval import report as eval_report

    dataset = eval_data.load(data)
    s = dataset.summary()
    progress(f"{s['items']} items ({s['malformed']} malformed lines skipped), labels {s['labels']}, "
             f"modes {s['modes']}, subsets {s['subsets']}")
    for bad in dataset.malformed[:10]:
        progress(f"{dataset.path.name}:{bad.line}: skipped: {bad.reason}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind, runs = run_all(dataset, options, out, progress, stop_after)
    check_complete(dataset, runs)
    order = variants_in_order(options.variants)
    report = eval_report.compute(dataset, kind, runs, order, options.policy)
    plots = eval_plots.plot(report, out, progress)
    eval_report.write(out, report, dataset, runs, order, plots)
    return EvalResult(out, report, tuple(plots))
