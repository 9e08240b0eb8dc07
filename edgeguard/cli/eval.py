"""The `edgeguard eval` command: parses options and calls ``edgeguard.eval.run.run_eval``."""

from __future__ import annotations

from pathlib import Path

import click

from edgeguard.cli.exit_codes import handle_errors, say
from edgeguard.errors import UsageError
from edgeguard.kinds import ENGINES


def _quants(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ("q4_k_m",)
    quants = tuple(q.strip().lower() for q in value.split(",") if q.strip())
    if not quants:
        raise UsageError("--quant lists no quant")
    return quants


@click.command("eval")
@click.argument("data", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--model", default=None, help="Registry name, converted folder or HF checkpoint folder.")
@click.option("--quant", default=None, help="Comma-separated quants to compare (default q4_k_m), e.g. q4_k_m,q8_0,f16.")
@click.option("--engine", type=click.Choice(ENGINES), default=None, help="Engine (default: the model's).")
@click.option("--reference", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Original Hugging Face checkpoint folder, run with transformers as the baseline.")
@click.option("--policy", type=click.Choice(["strict", "loose"]), default="strict", show_default=True,
              help="Policy for Stream detection timing (F1 is reported under both).")
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), default=Path("report"),
              show_default=True, help="Report folder; a rerun into it resumes.")
@click.option("--offline", is_flag=True, default=None, help="Never use the network.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all).")
@handle_errors
def eval_command(data, model, quant, engine, reference, policy, out, offline, threads):
    """Accuracy and quantization cost on a labelled JSONL set.

    Writes OUT/report.md, report.json, items.jsonl and PNG plots (with the eval extra).
    """
    from edgeguard.eval.run import EvalOptions, run_eval

    if not data.is_file():
        raise UsageError(f"{data}: no such file")
    options = EvalOptions(model=model, quants=_quants(quant), engine=engine, reference=reference,
                          policy=policy, offline=offline, n_threads=threads)
    result = run_eval(data, options, out, progress=say)
    click.echo(result.out / "report.md")
