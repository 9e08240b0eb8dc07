"""The files of `edgeguard scan --ray`: JSONL, Parquet or CSV in, JSONL or Parquet out.

Every input row becomes one ``(line, raw)`` pair: ``raw`` is the JSON line a local scan would
read (a JSONL line as it is; a Parquet or CSV row written as a JSON object), so every row goes
through the very same parsing and checks as ``edgeguard scan`` and gives the same record.
``line`` counts input rows from 1 (a JSONL file's line numbers). Needs pyarrow (the ray extra).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from edgeguard.errors import UsageError
from edgeguard.scan.writer import json_line

INPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                 ".pq": "parquet", ".csv": "csv"}
OUTPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
# Column order of a Parquet output: the verdict's keys as in `check --json`, then the row's.
RECORD_KEYS = ("label", "scores", "categories", "category_scores", "refusal", "flagged", "policy", "engine",
               "model", "flagged_at", "response_tokens", "id", "line", "error", "skipped")


def input_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in INPUT_FORMATS:
        raise UsageError(f"cannot tell the format of {path}: name it *.jsonl, *.parquet or *.csv")
    return INPUT_FORMATS[suffix]


def output_format(path: str | Path | None) -> str:
    """JSONL for stdout (None) and *.jsonl; Parquet for *.parquet."""
    if path is None:
        return "jsonl"
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UsageError(f"cannot tell the format of --out {path}: name it *.jsonl or *.parquet")
    return OUTPUT_FORMATS[suffix]


def read_rows(path: str | Path, rows_per_chunk: int = 1024) -> Iterator:
    """The input as pyarrow tables of ``line`` (int64) and ``raw`` (binary), in order."""
    import pyarrow as pa

    kind = input_format(path)
    chunks = _jsonl_chunks(path, rows_per_chunk) if kind == "jsonl" else _table_chunks(path, kind, rows_per_chunk)
    first = 1
    for raws in chunks:
        yield pa.table({"line": pa.array(range(first, first + len(raws)), pa.int64()),
                        "raw": pa.array(raws, pa.binary())})
        first += len(raws)


def _jsonl_chunks(path, size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    with open(path, "rb") as f:
        for raw in f:
            chunk.append(raw)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _table_chunks(path, kind: str, size: int) -> Iterator[list[bytes]]:
    import pyarrow as pa

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            batches = pq.ParquetFile(path).iter_batches(batch_size=size)
        else:
            import pyarrow.csv as pcsv

            # Text columns stay text ("123" is a prompt, not a number); an empty cell is a missing value.
            options = pcsv.ConvertOptions(column_types={"prompt": pa.string(), "response": pa.string()},
                                          strings_can_be_null=True)
            batches = pcsv.open_csv(path, convert_options=options)
        for batch in batches:
            yield [_row_json(row) for row in batch.to_pylist()]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise UsageError(f"cannot read {path} as {kind}: {e}") from None


def _row_json(row: dict) -> bytes:
    """One table row as the JSON line a local scan would read; a missing value (null) is left
    out, as a JSONL line would leave it out; values JSON lacks (dates, bytes) become text."""
    return json.dumps({k: v for k, v in row.items() if v is not None}, default=str).encode("utf-8")


def write_jsonl(records: Iterable[dict], out: BinaryIO) -> None:
    for record in records:
        out.write(json_line(record))


def write_parquet(records: list[dict], out: BinaryIO) -> None:
    """One column per key any record has (in ``RECORD_KEYS`` order), null where a record lacks
    it. An ``id`` column whose values do not share one type holds each id as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    present = {k for r in records for k in r}
    keys = [k for k in RECORD_KEYS if k in present] + sorted(present - set(RECORD_KEYS))
    types = record_types()
    columns = {}
    for key in keys:
        values = [r.get(key) for r in records]
        try:
            columns[key] = pa.array(values, type=types.get(key))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[key] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    pq.write_table(pa.table(columns) if columns else pa.table({}), out)


def record_types() -> dict:
    """The Arrow type of each record key (``id`` and unknown keys: inferred)."""
    import pyarrow as pa

    return {"label": pa.string(), "scores": pa.struct([(k, pa.float64()) for k in ("Safe", "Unsafe", "Controversial")]),
            "categories": pa.list_(pa.string()), "category_scores": pa.map_(pa.string(), pa.float64()),
            "refusal": pa.string(), "flagged": pa.bool_(), "policy": pa.string(), "engine": pa.string(),
            "model": pa.string(), "flagged_at": pa.int64(), "response_tokens": pa.int64(), "line": pa.int64(),
            "error": pa.string(), "skipped": pa.string()}

