"""Ray Data integration: moderate a dataset on a Ray cluster, one loaded guard per actor.

``moderate(dataset, ...)`` adds the verdict columns of the ``check --json`` contract to a Ray
Dataset; ``scan_with_ray`` is ``edgeguard scan --ray``: the same output rows as a local scan.
Each actor of a fixed pool loads the guard once (``threads_per_actor`` llama.cpp threads and as
many reserved CPUs, so actors never oversubscribe a node; a GPU each with ``device="gpu"``). An
actor that dies is restarted and its batches run again: Ray Data keeps only the output of
batches that finished, so every input row comes back exactly once, in input order.

This module is named like the Ray package it wraps; ``import ray`` below is an absolute import
(Python 3) and always means Ray itself. Ray is the optional ``ray`` extra.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from edgeguard import progress as progress_ui
from edgeguard.errors import EdgeguardError, RuntimeFailure, UsageError
from edgeguard.scan.writer import ScanStats, check_line, json_line, parse_item

INSTALL_HINT = "pip install 'edgeguard[ray]'"
VERDICT_COLUMNS = ("label", "scores", "categories", "category_scores", "refusal", "flagged", "policy", "engine",
                   "model")
STREAM_COLUMNS = ("flagged_at", "response_tokens")
log = logging.getLogger("edgeguard")


def require_ray():
    """The ray module, or a UsageError (exit 2) that says how to install the extra."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data
    except ImportError as e:
        raise UsageError(f"Ray Data is not installed ({e.name} is missing): {INSTALL_HINT}") from None
    return ray


class Moderator:
    """The callable class Ray Data runs in each actor: the guard is loaded once, in ``__init__``.

    ``mode="columns"`` adds verdict columns (and ``error``) to each batch; ``mode="lines"``
    turns ``(line, raw)`` rows into ``(line, record)``, ``record`` being the JSON line that
    ``edgeguard scan`` writes for that input line.
    """

    def __init__(self, folder: str, model, quant: str, engine: str, policy, threads: int, device: str,
                 mode: str, decode_batch: int) -> None:
        from edgeguard.loader import load

        # The path resolved on the driver when this node has it; else this node's own cache.
        source = folder if Path(folder, "manifest.json").is_file() else model
        self.guard = load(source, quant, engine=engine, policy=policy, n_threads=threads, device=device)
        self.mode = mode
        self.decode_batch = decode_batch

    def __call__(self, batch):
        return self._lines(batch) if self.mode == "lines" else self._columns(batch)

    def _lines(self, batch):
        import pyarrow as pa

        lines = batch.column("line").to_pylist()
        records = [json_line(check_line(self.guard, raw, n)[0]).decode("utf-8")
                   for n, raw in zip(lines, batch.column("raw").to_pylist())]
        return pa.table({"line": pa.array(lines, pa.int64()), "record": pa.array(records, pa.string())})

    def _columns(self, batch):
        import pyarrow as pa

        from edgeguard.scan.formats import record_types

        names = [c for c in ("prompt", "response") if c in batch.column_names]
        results = self._judge_all(batch.select(names).to_pylist())
        dicts = [None if isinstance(r, str) else r.to_dict() for r in results]
        types = record_types()
        columns = VERDICT_COLUMNS + (STREAM_COLUMNS if self.guard.engine == "stream" else ())
        for name in columns:
            batch = batch.append_column(name, pa.array([d and d.get(name) for d in dicts], types[name]))
        errors = [r if isinstance(r, str) else None for r in results]
        return batch.append_column("error", pa.array(errors, pa.string()))

    def _judge_all(self, rows: list[dict]) -> list:
        """A Verdict or an error message per row, in order; valid rows are judged
        ``decode_batch`` at a time, and one at a time where a batch holds a row that fails."""
        results: list = [None] * len(rows)
        valid = []
        for i, row in enumerate(rows):
            # The same checks as a scan line; ensure_ascii keeps lone surrogates as escapes it rejects.
            item, error = parse_item(json.dumps({k: v for k, v in row.items() if v is not None}).encode())
            if error:
                results[i] = error
            else:
                assert item is not None  # parse_item returns the object whenever it finds no error
                valid.append((i, (item["prompt"], item.get("response"))))
        for start in range(0, len(valid), self.decode_batch):
            chunk = valid[start:start + self.decode_batch]
            try:
                verdicts = list(self.guard.check_many([pair for _, pair in chunk], batch_size=len(chunk)))
            except UsageError:
                verdicts = [self._judge_one(pair) for _, pair in chunk]
            for (i, _), verdict in zip(chunk, verdicts):
                results[i] = verdict
        return results

    def _judge_one(self, pair: tuple):
        try:
            return self.guard.check(*pair)
        except UsageError as e:
            return str(e)


def _resolve(model, quant, engine, offline):
    """Pull and verify the model once, here on the driver: (folder, quant)."""
    from edgeguard.loader import resolve

    folder, manifest, quant = resolve(model, quant, kind=engine or "gen", offline=offline,
                                      progress=lambda m: print(f"edgeguard: {m}", file=sys.stderr))
    if engine is not None and engine != manifest.kind:
        raise UsageError(f"{manifest.name} is a {manifest.kind} model; it cannot run the {engine} engine")
    return str(Path(folder).absolute()), quant


def _policy(policy):
    """A policy file is read here, so nodes without the file get its rules."""
    if isinstance(policy, (str, os.PathLike)) and Path(policy).is_file():
        from edgeguard.policy import load_policy

        return load_policy(policy)
    return policy


def _counts(ray, actors: int | None, threads: int, batch_size: int, decode_batch: int) -> int:
    for name, value in (("threads_per_actor", threads), ("batch_size", batch_size), ("decode_batch", decode_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a whole number >= 1, got {value!r}")
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if actors is None:
        actors = max(1, cpus // threads)
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise UsageError(f"actors must be a whole number >= 1, got {actors!r}")
    if actors * threads > cpus:
        raise UsageError(f"{actors} actors of {threads} threads need {actors * threads} CPUs; "
                         f"the Ray cluster has {cpus}")
    return actors


def _checked(ray, device: str, actors: int | None, threads: int, batch_size: int, decode_batch: int) -> int:
    """The device and counts checked; the number of actors (``_counts``)."""
    if device not in ("auto", "cpu", "gpu"):
        raise UsageError(f"device must be auto, cpu or gpu, got {device!r}")
    return _counts(ray, actors, threads, batch_size, decode_batch)


def _map(dataset, *, mode: str, model, quant, engine, policy, actors: int, threads_per_actor, batch_size,
         decode_batch, device, offline, max_restarts):
    """``dataset`` through ``Moderator`` actors; ``actors``: as ``_checked`` returned it."""
    ray = require_ray()
    folder, quant = _resolve(model, quant, engine, offline)
    dataset.context.execution_options.preserve_order = True
    with warnings.catch_warnings():
        # Ray 2.60 deprecates actor options given this way, with no other way to bound restarts yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return _map_batches(dataset, ray, folder=folder, model=model, quant=quant, engine=engine, policy=policy,
                            mode=mode, actors=actors, threads_per_actor=threads_per_actor, batch_size=batch_size,
                            decode_batch=decode_batch, device=device, max_restarts=max_restarts)


def _map_batches(dataset, ray, *, folder, model, quant, engine, policy, mode, actors, threads_per_actor, batch_size,
                 decode_batch, device, max_restarts):
    return dataset.map_batches(
        Moderator,
        fn_constructor_kwargs={"folder": folder, "model": model, "quant": quant, "engine": engine,
                               "policy": _policy(policy), "threads": threads_per_actor, "device": device,
                               "mode": mode, "decode_batch": decode_batch},
        batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=False,
        # One block at a time per actor: with Ray's default (4 in flight) the first actor to
        # start took every block of a short job before the second had loaded its model
        # (2 actors ran a 40-row scan at 1.05x one actor's rate).
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=threads_per_actor, num_gpus=1 if device == "gpu" else 0,
        # Bounded, unlike Ray Data's default (forever): a row that kills llama.cpp every time must end the job.
        max_restarts=max_restarts, max_task_retries=max_restarts)


def moderate(dataset, model: str | Path | None = None, quant: str | None = None, *, engine: str | None = None,
             policy="strict", actors: int | None = None, threads_per_actor: int = 1, batch_size: int = 16,
             decode_batch: int = 1, device: str = "cpu", offline: bool | None = None, max_restarts: int = 3):
    """``dataset`` (columns ``prompt``, optional ``response``, any others) with the verdict
    columns added: label, scores, categories, category_scores, refusal, flagged, policy,
    engine, model (Stream: also flagged_at and response_tokens, set for response checks) and
    ``error`` (the reason a row could not be judged; its verdict columns are then null).

    ``actors`` (default: the cluster's CPUs // ``threads_per_actor``) each hold one guard.
    ``decode_batch`` > 1 lets llama.cpp decode that many rows together (``check_many``;
    scores then equal ``check``'s within 1e-3). Rows keep their order (this sets
    ``preserve_order`` on the dataset's context). Lazy, like every Ray Dataset.
    """
    columns = dataset.columns()
    if "prompt" not in columns:
        raise UsageError(f"the dataset has no \"prompt\" column (columns: {', '.join(columns)})")
    taken = [c for c in VERDICT_COLUMNS + STREAM_COLUMNS + ("error",) if c in columns]
    if taken:
        raise UsageError(f"the dataset already has verdict column(s) {', '.join(taken)}; rename them first")
    actors = _checked(require_ray(), device, actors, threads_per_actor, batch_size, decode_batch)
    return _map(dataset, mode="columns", model=model, quant=quant, engine=engine, policy=policy, actors=actors,
                threads_per_actor=threads_per_actor, batch_size=batch_size, decode_batch=decode_batch,
                device=device, offline=offline, max_restarts=max_restarts)


def quiet_ray_logs(verbose: bool = False) -> None:
    """Ray's INFO lines (start-up, per-dataset progress reports) only with ``-v``."""
    if not verbose:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (None: the running one, else a new local one);
    True when this call started Ray (the caller then shuts it down)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RuntimeFailure(f"cannot connect to Ray at {address or 'a new local cluster'}: {e}") from None
    return True


def scan_records(infile: Path, *, actors=None, threads_per_actor: int = 1, batch_size: int = 16,
                 max_restarts: int = 3, **model) -> Iterator[str]:
    """The records of ``edgeguard scan`` (JSON lines) for every input row, in order, judged by Ray actors.
    Checks that the rows come back exactly once (lines 1..N in order)."""
    ray = require_ray()
    from edgeguard.scan.formats import read_rows

    tables = list(read_rows(infile))
    total = sum(t.num_rows for t in tables)
    if not total:
        return
    actors = _checked(ray, model["device"], actors, threads_per_actor, batch_size, 1)
    size = _block_rows(total, actors, batch_size)
    dataset = ray.data.from_arrow(_blocks(tables, total, size))
    results = _map(dataset, mode="lines", actors=actors, threads_per_actor=threads_per_actor,
                   batch_size=min(batch_size, size), decode_batch=1, max_restarts=max_restarts, **model)
    expected = 1
    try:
        for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
            for line, text in zip(batch.column("line").to_pylist(), batch.column("record").to_pylist()):
                if line != expected:
                    raise RuntimeFailure(f"Ray returned input row {line} where row {expected} was due")
                expected += 1
                yield text
    except EdgeguardError:
        raise
    except Exception as e:  # Ray's own errors (an actor that kept dying, a lost node): one line
        raise RuntimeFailure(f"the Ray job failed: {type(e).__name__}: {_first_line(e)}") from e
    if expected - 1 != total:
        raise RuntimeFailure(f"Ray returned {expected - 1} of {total} input rows")


def _block_rows(total: int, actors: int, batch_size: int, tasks_per_actor: int = 32, most: int = 4096) -> int:
    """Rows per Ray block, which is one actor task: about ``tasks_per_actor`` tasks per actor, so
    the job's last task (one actor busy, the others done) is a small part of it, and a retried
    task is cheap; a whole number of batches once a block holds a batch, at most ``most`` rows.
    (Blocks of 16 rows left a 200-row scan on 2 actors with 13 tasks, 7 on one actor and 6 on
    the other: one actor idle for a 16-row task at the end, 8% of the job.)"""
    size = min(most, -(-total // (actors * tasks_per_actor)))
    return size if size < batch_size else -(-size // batch_size) * batch_size


def _blocks(tables: list, total: int, size: int) -> list:
    """The input as one table cut into blocks of ``size`` rows."""
    import pyarrow as pa

    table = pa.concat_tables(tables).combine_chunks()
    return [table.slice(start, size) for start in range(0, total, size)]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else ""


def scan_with_ray(infile: Path, output, *, address: str | None = None, restart: bool = False, **options) -> ScanStats:
    """``edgeguard scan --ray``: ``infile`` (JSONL, Parquet or CSV) into ``output`` (an opened
    ``scan.Output``: JSONL, or Parquet by its name). Never resumes: a non-empty file output
    needs ``restart``."""
    from edgeguard.scan.formats import input_format, output_format, write_parquet
    from edgeguard.scan.record import record_path

    require_ray()
    input_format(infile)
    out_format = output_format(output.path)
    if output.path is not None:
        if os.fstat(output.stream.fileno()).st_size and not restart:
            raise UsageError(f"{output.path} is not empty and a --ray scan does not resume; "
                             "rerun with --restart to overwrite it, or choose another --out")
        output.stream.truncate(0)
        output.stream.seek(0)
        record_path(output.path).unlink(missing_ok=True)  # a local scan's record would not describe this output
    started = connect(address)
    try:
        stats, parquet_rows = ScanStats(), []
        for text in scan_records(Path(infile), **options):
            record = json.loads(text)
            stats.done += 1
            stats.count(record)
            if "error" in record:
                progress_ui.message(f"{Path(infile).name}: line {record['line']}: skipped: {record['error']}")
            if out_format == "parquet":
                parquet_rows.append(record)
            else:
                output.stream.write(text.encode("utf-8"))
        if out_format == "parquet":
            write_parquet(parquet_rows, output.stream)
        output.stream.flush()
    finally:
        if started:
            require_ray().shutdown()
    return stats
