"""`edgeguard scan`: a JSONL dataset through a guard, resumable, one output line per input line.

Each input line gives exactly one output line: the verdict (plus the input's ``id``, or its
``line`` number), ``{"line", "id"?, "error"}`` for a line that cannot be checked, or
``{"line", "skipped": "blank line"}`` for a blank one. That one-to-one order is what makes a
resume exact: the output's line count is the number of input lines done. ``scan_record`` holds
what the output is a scan of and the lock against a second writer.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgeguard import progress as progress_ui
from edgeguard.errors import UsageError
from edgeguard.platform.files import open_binary
from edgeguard.scan.record import (
    Record,
    differences,
    input_digest,
    lock_exclusively,
    record_path,
    write_atomically,
)


@dataclass
class ScanStats:
    """Counts over the whole output (lines kept from an earlier run included)."""

    done: int = 0  # lines checked by this run
    kept: int = 0  # lines already in the output from an earlier run
    malformed: int = 0  # lines that could not be checked (an "error" line)
    flagged: int = 0
    blank: int = 0

    @property
    def exit_code(self) -> int:
        """1 when any line is flagged (the safety signal wins), else 2 when any line is
        malformed (some input was never judged), else 0."""
        if self.flagged:
            return 1
        return 2 if self.malformed else 0

    def count(self, record: dict) -> None:
        if "error" in record:
            self.malformed += 1
        elif "skipped" in record:
            self.blank += 1
        elif record.get("flagged") is True:
            self.flagged += 1


def identity(guard, quant: str) -> dict:
    """What a scan's results depend on: model (name, quant, GGUF sha256), policy and engine."""
    manifest = guard.manifest
    gguf = manifest.file_for("model", quant)
    policy = guard.policy
    rules = {"flag_controversial": policy.flag_controversial, "categories": dict(policy.categories)}
    return {
        "model": {"name": manifest.name, "quant": quant, "sha256": manifest.files[gguf]["sha256"]},
        "policy": {"name": policy.name,
                   "sha256": hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()},
        "engine": guard.engine,
    }


def parse_item(raw: bytes) -> tuple[dict | None, str | None]:
    """The input object, or None and why it cannot be checked (``id`` kept when readable)."""
    try:
        item = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg})"
    if not isinstance(item, dict):
        return None, "not a JSON object"
    prompt, response = item.get("prompt"), item.get("response")
    if not isinstance(prompt, str) or not prompt.strip():
        return item, "missing or empty \"prompt\""
    if response is not None and (not isinstance(response, str) or not response.strip()):
        return item, "\"response\" must be non-empty text"
    for text in (prompt, response or ""):
        if "\x00" in text:
            return item, "contains NUL characters"
        if any("\ud800" <= c <= "\udfff" for c in text):  # JSON "\ud800" escapes: not text
            return item, "contains a lone surrogate (not valid Unicode text)"
    return item, None


def check_line(guard, raw: bytes, number: int) -> tuple[dict, str | None]:
    """The output record of one input line, and the warning to show when it is not a verdict."""
    if not raw.strip():
        return {"line": number, "skipped": "blank line"}, None
    if number == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]  # editors on Windows write one; it is not content
    item, error = parse_item(raw.rstrip(b"\r\n"))
    if error is None:
        assert item is not None  # parse_item returns the object whenever it finds no error
        try:
            if guard.engine == "stream" and item.get("response") is not None:
                raise UsageError("the stream engine's scan checks prompts only")
            response = item.get("response")
            verdict = guard.check(item["prompt"], response) if response else guard.check(item["prompt"])
        except UsageError as e:
            error = str(e)
        else:
            record = verdict.to_dict()
            if "id" in item:
                record["id"] = item["id"]
            else:
                record["line"] = number
            return record, None
    record = {"line": number, "error": error}
    if isinstance(item, dict) and "id" in item:
        record["id"] = item["id"]
    return record, f"line {number}: skipped: {error}"


def json_line(record: dict) -> bytes:
    """One output line: readable UTF-8, or \\u escapes where the input's ``id`` holds text
    that UTF-8 cannot encode (a lone surrogate written as a JSON escape)."""
    try:
        return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(record).encode("ascii") + b"\n"


def _count_lines(infile: Path) -> int:
    with open(infile, "rb") as f:
        return sum(1 for _ in f)


def _keep_complete_lines(out: BinaryIO, keep: int, stats: ScanStats) -> int:
    """Cut ``out`` after its first ``keep`` complete lines (a torn last line is always cut),
    count what is kept into ``stats``; the number kept."""
    out.seek(0)
    lines = out.read().split(b"\n")[:-1][:keep]  # the last piece has no newline: torn or empty
    for line in lines:
        try:
            stats.count(json.loads(line))
        except (ValueError, TypeError):
            raise UsageError(f"{out.name} has a line that is not JSON; it was not written by a scan "
                             "(rerun with --restart to overwrite it)") from None
    size = sum(len(line) + 1 for line in lines)
    out.truncate(size)
    out.seek(size)
    return len(lines)


def _resume_point(out: BinaryIO, infile: Path, outfile: Path, current: dict, stats: ScanStats) -> int:
    """How many input lines the output already holds, after checking it is a scan of this
    input with this model and policy; the output is cut to exactly those lines."""
    record_file = record_path(outfile)
    if os.fstat(out.fileno()).st_size == 0:
        return 0  # nothing to resume or protect: a stale record is simply rewritten
    if not record_file.exists():  # refused untouched: it may be someone else's file
        raise UsageError(f"{outfile} exists but has no scan record ({record_file.name}), so it cannot be "
                         "resumed safely; rerun with --restart to overwrite it, or choose another --out")
    record = Record.read(record_file)
    changed = differences(record.identity, current)
    if changed:
        raise UsageError(f"{outfile} is a scan with a different {'; '.join(changed)}; "
                         "rerun with --restart to scan again from the start, or choose another --out")
    digest, n = input_digest(infile, record.lines)
    if n < record.lines or digest != record.input_sha256:
        raise UsageError(f"{infile} is not the input {outfile} was scanned from (its first {record.lines} "
                         "lines differ); rerun with --restart to scan it from the start, or choose another --out")
    # Lines past the record (a crash between writing a line and the record) are redone.
    return _keep_complete_lines(out, record.lines, stats)


def _is_stream(outfile: Path) -> bool:
    """Whether ``outfile`` is a device, pipe or terminal rather than a file that can be locked,
    cut and resumed (and have a record written beside it)."""
    if str(outfile.absolute()).startswith(("/dev/", "/proc/")):
        return True
    try:
        return not stat.S_ISREG(outfile.stat().st_mode)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise UsageError(f"cannot use --out {outfile}: {e.strerror or e}") from None


def _open_or_fail(outfile: Path, flags: int) -> BinaryIO:
    """Binary mode on every platform: a Windows text-mode file would turn each "\n" into "\r\n"
    and a resume would cut the output by the wrong length."""
    try:
        return open_binary(outfile, flags)
    except OSError as e:
        raise UsageError(f"cannot open --out {outfile}: {e.strerror or e}") from None


@dataclass(frozen=True)
class Output:
    """An opened ``--out``: a locked regular file that can resume (``path``), or a stream
    (stdout, a device, a pipe: ``path`` None) that cannot."""

    stream: BinaryIO
    path: Path | None


@contextmanager
def open_output(infile: Path, outfile: Path | None, stdout: BinaryIO | None = None) -> Iterator[Output]:
    """Open and lock ``outfile`` (None: ``stdout``). Done before the model loads, so a second
    writer is refused at once; the lock lasts until the block ends."""
    if outfile is None:
        assert stdout is not None  # every caller passes stdout along with outfile None
        yield Output(stdout, None)
        return
    outfile = Path(outfile)
    if outfile.exists() and Path(infile).resolve() == outfile.resolve():
        raise UsageError("--out must differ from the input file")
    if _is_stream(outfile):
        with _open_or_fail(outfile, os.O_WRONLY) as out:
            yield Output(out, None)
        return
    with _open_or_fail(outfile, os.O_RDWR | os.O_CREAT) as out:
        lock_exclusively(out.fileno(), outfile)
        yield Output(out, outfile)
        out.flush()
        os.fsync(out.fileno())


def run_scan(guard, infile: Path, output: Output, *, identity: dict, restart: bool = False,
             show_progress: bool = True) -> ScanStats:
    """Scan ``infile`` into ``output``, resuming a file output unless ``restart``."""
    infile = Path(infile)
    out, outfile = output.stream, output.path
    if outfile is None:
        return _scan_into(guard, infile, out, ScanStats(), start=0, show_progress=show_progress)
    stats = ScanStats()
    if restart:
        out.truncate(0)
        start = 0
    else:
        start = _resume_point(out, infile, outfile, identity, stats)
    stats.kept = start

    def record(lines: int, input_sha256: str) -> None:
        write_atomically(record_path(outfile), Record(identity, lines, input_sha256).to_json())

    return _scan_into(guard, infile, out, stats, start=start, show_progress=show_progress, on_line=record)


def _scan_into(guard, infile: Path, out: BinaryIO, stats: ScanStats, *, start: int, show_progress: bool,
               on_line=None) -> ScanStats:
    """Check the input lines after ``start`` into ``out``; ``on_line(lines, input_sha256)``
    after each line written."""
    digest = hashlib.sha256()
    bar = progress_ui.bar(total=_count_lines(infile), initial=start, desc="scan", unit="line",
                          enabled=show_progress)
    with bar, open(infile, "rb") as src:
        if on_line is not None and start == 0:
            on_line(0, digest.hexdigest())  # the record exists before the first line does
        for number, raw in enumerate(src, 1):
            digest.update(raw)
            if number <= start:
                continue
            record, warning = check_line(guard, raw, number)
            if warning:
                progress_ui.message(f"{infile.name}: {warning}")
            out.write(json_line(record))
            out.flush()
            stats.done += 1
            stats.count(record)
            if on_line is not None:
                on_line(number, digest.hexdigest())
            bar.set_postfix_str(f"{stats.flagged} flagged", refresh=False)
            bar.update(1)
    return stats
