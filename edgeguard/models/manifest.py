"""manifest.json: what a converted model folder holds, with sizes and sha256 of every file."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeguard.errors import IntegrityError, ModelError
from edgeguard.models.hub import sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT = 1
CHECKSUM_KEY = "manifest_sha256"


def _content_sha256(data: dict) -> str:
    """sha256 of the manifest's content in a canonical form (key order and spacing free)."""
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _shape_problem(data) -> str | None:
    """What in a manifest's content is not of the shape edgeguard writes (None: nothing)."""
    if not isinstance(data, dict):
        return "the manifest is not a JSON object"
    for key in ("name", "architecture"):
        if not isinstance(data.get(key), str):
            return f"'{key}' is not a string"
    if data.get("kind") not in ("gen", "stream"):
        return f"'kind' is {data.get('kind')!r}, not 'gen' or 'stream'"
    for key in ("context_length", "hidden_size"):
        if not _whole(data.get(key)) or data[key] < 1:
            return f"'{key}' is {data.get(key)!r}, not a positive whole number"
    if not isinstance(data.get("source"), dict):
        return "'source' is not an object"
    if not _strings(data.get("quants")):
        return "'quants' is not a list of names"
    labels = data.get("labels")
    if not isinstance(labels, dict) or not all(_strings(v) and v for v in labels.values()):
        return "'labels' is not an object of non-empty lists of names"
    files = data.get("files", {})
    if not isinstance(files, dict):
        return "'files' is not an object"
    for name, entry in files.items():
        if not isinstance(entry, dict) or not _whole(entry.get("size")) or entry["size"] < 0 \
                or not isinstance(entry.get("role"), str) or not isinstance(entry.get("quant", ""), str):
            return f"the entry of {name!r} in 'files' has no size and role"
    return None


def file_entry(path: Path, **extra) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path), **extra}


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: str  # "gen" | "stream"
    architecture: str
    source: dict
    context_length: int
    hidden_size: int
    quants: tuple[str, ...]
    labels: dict
    files: dict = field(default_factory=dict)  # file name -> {size, sha256, role, quant?}
    format: int = FORMAT

    def write(self, folder: Path) -> None:
        """Write atomically, with a sha256 of the content (``manifest_sha256``) that ``read``
        checks, so a damaged or hand-edited manifest is never trusted."""
        data = asdict(self)
        data["quants"] = list(self.quants)
        data[CHECKSUM_KEY] = _content_sha256(data)
        tmp = folder / (MANIFEST_NAME + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST_NAME)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            recorded = data.pop(CHECKSUM_KEY, None)
            # Manifests written before the checksum existed have none; they are read as before.
            if recorded is not None and recorded != _content_sha256(data):
                raise IntegrityError(f"{path}: checksum mismatch (a damaged or edited manifest); "
                                     "convert or pull the model again")
            if data.get("format") != FORMAT:
                raise ModelError(f"{path}: manifest format {data.get('format')} is not supported (need {FORMAT})")
            problem = _shape_problem(data)
            if problem:
                raise ModelError(f"{path}: {problem} (a damaged or hand-edited manifest)")
            data["quants"] = tuple(data["quants"])
            return cls(**data)
        except FileNotFoundError as e:
            raise ModelError(f"{folder}: no {MANIFEST_NAME} (not a converted edgeguard model)") from e
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise ModelError(f"{path}: unreadable manifest ({type(e).__name__}: {str(e)[:200]})") from e

    def file_for(self, role: str, quant: str | None = None) -> str:
        for fname, entry in self.files.items():
            if entry.get("role") == role and (quant is None or entry.get("quant") == quant):
                return fname
        wanted = f"{role} ({quant})" if quant else role
        have = ", ".join(self.quants)
        raise ModelError(f"model {self.name} has no {wanted} file (quants: {have})")

    def check_sizes(self, folder: Path, names: list[str]) -> None:
        """Cheap load-time check: every needed file exists with its recorded size."""
        for fname in names:
            path = Path(folder) / fname
            expected = self.files[fname]["size"]
            actual = path.stat().st_size if path.exists() else None
            if actual != expected:
                state = "missing" if actual is None else f"{actual} bytes, expected {expected}"
                raise IntegrityError(f"{path}: {state} (corrupted or incomplete); repair with: {self.repair_command()}")

    def repair_command(self) -> str:
        """The command that rebuilds this model folder."""
        name = self.source.get("registry_name")
        if name:
            return f"edgeguard rm {name} && edgeguard pull {name}"
        src = self.source.get("repo") or self.source.get("path", "SRC")
        return f"edgeguard convert {src} --out <this folder> --quant {','.join(self.quants)}"

    def verify(self, folder: Path) -> list[str]:
        """Full check of every file's sha256; returns the names of bad files."""
        bad = []
        for fname, entry in self.files.items():
            path = Path(folder) / fname
            if not path.exists() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
                bad.append(fname)
        return bad
