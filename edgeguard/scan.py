"""`edgeguard scan`: a JSONL dataset through a guard, resumable, one output line per input line."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeguard.errors import UsageError


@dataclass
class ScanStats:
    done: int = 0
    skipped: int = 0
    errors: int = 0
    flagged: int = 0


def _completed_lines(outfile: Path) -> int:
    """Complete lines already in ``outfile``; a torn last line (no newline) is cut off."""
    if not outfile.exists():
        return 0
    with open(outfile, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    return data[:end].count(b"\n")


def _parse(raw: bytes, number: int) -> tuple[dict | None, str | None]:
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
        return None, "missing or empty \"prompt\""
    if response is not None and (not isinstance(response, str) or not response.strip()):
        return None, "\"response\" must be non-empty text"
    return item, None


def run_scan(guard, infile: Path, outfile: Path, progress: Callable[[str], None] = lambda m: None) -> ScanStats:
    if infile.resolve() == outfile.resolve():
        raise UsageError("--out must differ from the input file")
    stats = ScanStats()
    with open(infile, "rb") as f:
        total = sum(1 for _ in f)
    already = _completed_lines(outfile)
    if already > total:
        raise UsageError(f"{outfile} has more lines ({already}) than {infile} ({total}): not a scan of it")
    stats.skipped = already
    tty = sys.stderr.isatty()
    with open(infile, "rb") as src, open(outfile, "ab") as dst:
        for number, raw in enumerate(src, 1):
            if number <= already:
                continue
            item, error = _parse(raw.rstrip(b"\r\n"), number) if raw.strip() else (None, "empty line")
            if error is not None:
                record = {"line": number, "error": error}
                stats.errors += 1
                progress(f"{infile.name}:{number}: skipped: {error}")
            else:
                try:
                    if guard.engine == "stream" and item.get("response") is not None:
                        raise UsageError("the stream engine's scan checks prompts only")
                    verdict = guard.check(item["prompt"], item.get("response")) if item.get("response") else guard.check(item["prompt"])
                except UsageError as e:
                    record = {"line": number, "error": str(e)}
                    stats.errors += 1
                    progress(f"{infile.name}:{number}: skipped: {e}")
                else:
                    record = verdict.to_dict()
                    stats.flagged += verdict.flagged
                    if "id" in item:
                        record["id"] = item["id"]
                    else:
                        record["line"] = number
            dst.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            dst.flush()
            stats.done += 1
            if tty:
                sys.stderr.write(f"\rscanning {number}/{total}")
                sys.stderr.flush()
        os.fsync(dst.fileno())
    if tty:
        sys.stderr.write("\n")
    return stats
