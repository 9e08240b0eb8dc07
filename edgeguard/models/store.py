"""The local model store: registry models pulled, converted and verified under the user cache.

Layout: ``<cache>/models/<name>-<quant>/`` holds one converted model (manifest + files);
``<cache>/converted/`` holds conversions of local checkpoint folders; ``<cache>/prefix/`` the
persisted prefix states. A pull converts into a staging folder and renames it into place, so
an interrupted pull never leaves a model that later loads.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeguard.errors import IntegrityError, ModelError
from edgeguard.models import hub
from edgeguard.models.manifest import MANIFEST_NAME, Manifest
from edgeguard.models.registry import ModelSpec

Progress = Callable[[str], None]
log = logging.getLogger("edgeguard.models.store")


def models_dir() -> Path:
    return hub.cache_dir() / "models"


def prefix_dir() -> Path:
    return hub.cache_dir() / "prefix"


def model_dir(spec: ModelSpec, quant: str) -> Path:
    return models_dir() / f"{spec.name}-{quant}"


def is_pulled(spec: ModelSpec, quant: str) -> bool:
    return _manifest_intact(model_dir(spec, quant))


def _manifest_intact(folder: Path) -> bool:
    """Whether ``folder`` holds a manifest that reads and matches its own checksum."""
    try:
        Manifest.read(folder)
    except ModelError:
        return False
    return True


def _warn_if_damaged(folder: Path) -> None:
    """One warning when a cached conversion is about to be redone because its manifest is
    damaged (the conversion then replaces the whole folder atomically)."""
    if (folder / MANIFEST_NAME).is_file():
        log.warning("%s: damaged manifest (checksum or format); converting the model again", folder)


def pull(spec: ModelSpec, quant: str | None = None, *, offline: bool | None = None,
         progress: Progress = lambda m: None, show_progress: bool = True) -> Path:
    """Fetch (cache first), convert and verify one quant of a registry model; its folder.
    ``show_progress``: bars for the download and the conversion on stderr."""
    from edgeguard_convert import ConvertOptions, convert

    quant = quant or spec.default_quant
    out = model_dir(spec, quant)
    if is_pulled(spec, quant):
        return out
    _warn_if_damaged(out)
    progress(f"fetching {spec.repo} at {spec.revision[:12]}")
    folder, commit = hub.fetch_checkpoint(spec, offline=offline, progress=show_progress)
    progress(f"converting {spec.name} to {quant}")
    options = ConvertOptions(
        quants=(quant,),
        name=spec.name,
        context=spec.context_length,
        source={"repo": spec.repo, "revision": commit, "registry_name": spec.name},
        show_progress=show_progress,
    )
    manifest = convert(folder, out, options, progress=progress)
    bad = manifest.verify(out)
    if bad:
        shutil.rmtree(out, ignore_errors=True)
        raise IntegrityError(f"{spec.name}: {', '.join(bad)} failed verification right after conversion")
    return out


@dataclass(frozen=True)
class LocalModel:
    name: str
    quant: str
    folder: Path
    size: int


def pulled(spec: ModelSpec) -> list[LocalModel]:
    out = []
    for folder in sorted(models_dir().glob(f"{spec.name}-*")):
        if not (folder / MANIFEST_NAME).is_file():
            continue
        try:
            manifest = Manifest.read(folder)
        except ModelError:
            continue
        if manifest.name != spec.name:
            continue
        size = sum(e["size"] for e in manifest.files.values())
        for quant in manifest.quants:
            out.append(LocalModel(spec.name, quant, folder, size))
    return out


def remove(spec: ModelSpec, quant: str | None = None) -> list[Path]:
    removed = []
    for local in pulled(spec):
        if quant is None or local.quant == quant:
            shutil.rmtree(local.folder)
            removed.append(local.folder)
    return removed


def verify(spec: ModelSpec) -> dict[Path, list[str]]:
    """Bad files per pulled folder (an empty list: all hashes match)."""
    return {local.folder: Manifest.read(local.folder).verify(local.folder) for local in pulled(spec)}


def converted_checkpoint(ckpt: Path, quant: str, progress: Progress = lambda m: None,
                         show_progress: bool = True) -> Path:
    """A local HF checkpoint folder converted once into the cache (keyed by its files)."""
    from edgeguard_convert import ConvertOptions, convert

    ckpt = Path(ckpt).resolve()
    digest = hashlib.sha256(str(ckpt).encode())
    for path in sorted(ckpt.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = hub.cache_dir() / "converted" / f"{ckpt.name}-{quant}-{digest.hexdigest()[:12]}"
    if not _manifest_intact(out):
        _warn_if_damaged(out)
        progress(f"converting {ckpt} to {quant} (once; cached in {out.parent})")
        options = ConvertOptions(quants=(quant,), name=ckpt.name.lower(), show_progress=show_progress)
        convert(ckpt, out, options, progress=progress)
    return out
