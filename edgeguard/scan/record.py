"""What a scan's output file is a scan of, and who may write it.

Beside ``OUT.jsonl`` a scan keeps ``OUT.jsonl.scan.json``, rewritten atomically after every
output line: the sha256 and count of the input lines covered so far, the model (name, quant,
sha256 of its GGUF), the policy and the engine. A resume recomputes the input's digest over
the recorded lines and compares everything else, so a different input, model or policy is
refused instead of being appended to the old results. An exclusive lock on the output (``flock``;
``msvcrt.locking`` on Windows) refuses a second writer while the first one runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edgeguard.errors import UsageError
from edgeguard.platform import locks

log = logging.getLogger("edgeguard.scan.writer")

RECORD_SUFFIX = ".scan.json"
FORMAT = 1

def record_path(outfile: Path) -> Path:
    return outfile.with_name(outfile.name + RECORD_SUFFIX)


@dataclass(frozen=True)
class Record:
    """The content of a scan record; ``identity`` is everything but the input's progress."""

    identity: dict  # {"model": {...}, "policy": {...}, "engine": str}
    lines: int  # input lines covered by the output
    input_sha256: str  # of the raw bytes of those lines

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **self.identity,
                           "input": {"lines": self.lines, "sha256": self.input_sha256}}, indent=1)

    @classmethod
    def read(cls, path: Path) -> Record:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.pop("format") != FORMAT:
                raise ValueError("unknown format")
            progress = data.pop("input")
            return cls(data, int(progress["lines"]), str(progress["sha256"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{path} is unreadable ({e}); rerun with --restart to scan again from the start") from None


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def differences(recorded: dict, current: dict) -> list[str]:
    """Human-readable names of what differs between two identities."""
    return [f"{key} (was {recorded.get(key)}, now {current.get(key)})"
            for key in sorted(set(recorded) | set(current)) if recorded.get(key) != current.get(key)]


def input_digest(infile: Path, lines: int) -> tuple[str, int]:
    """sha256 of the first ``lines`` raw lines of ``infile`` and how many there were."""
    digest = hashlib.sha256()
    n = 0
    with open(infile, "rb") as f:
        for raw in f:
            if n == lines:
                break
            digest.update(raw)
            n += 1
    return digest.hexdigest(), n


def lock_exclusively(fd: int, outfile: Path) -> None:
    """Refuse a second concurrent writer of ``outfile``; a no-op where the platform has no lock."""
    try:
        how = locks.lock_exclusively(fd)
    except locks.LockHeld:
        raise UsageError(f"another scan is writing {outfile} right now; wait for it or choose another --out") from None
    except OSError as e:  # e.g. a network file system without locks
        log.warning("cannot lock %s (%s): concurrent scans into it are not detected", outfile, e.strerror or e)
        return
    if how is None:
        log.debug("no file locks on this platform: concurrent scans into %s are not detected", outfile)
