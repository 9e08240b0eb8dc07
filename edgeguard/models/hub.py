"""Checkpoint download and cache: the only importer of huggingface_hub.

Checkpoints live in the standard Hugging Face cache (shared with other tools, so a model
already downloaded by transformers is not fetched twice). ``cache_dir()`` is edgeguard's own
cache for what it derives from them (converted GGUF/ONNX files). The local cache is always
tried first; the network is used only when a file is missing and offline mode is off.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from edgeguard.errors import IntegrityError, ModelError
from edgeguard.models.formats import CHECKPOINT_FILES
from edgeguard.models.registry import SHARD_INDEX, ModelSpec

logger = logging.getLogger("edgeguard.models.hub")

ENV_CACHE_DIR = "EDGEGUARD_CACHE_DIR"
_TRUE = {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """edgeguard's cache folder (not created here): ``$EDGEGUARD_CACHE_DIR``, else the
    platform's user cache from platformdirs: ``$XDG_CACHE_HOME/edgeguard`` or
    ``~/.cache/edgeguard`` (Linux), ``~/Library/Caches/edgeguard`` (macOS),
    ``%LOCALAPPDATA%\\edgeguard\\Cache`` (Windows)."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("edgeguard", appauthor=False))


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time (huggingface_hub reads
    it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE or constants.HF_HUB_OFFLINE


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are larger than memory allows)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def fetch_checkpoint(
    spec: ModelSpec,
    *,
    offline: bool | None = None,
    progress: bool = True,
    hf_cache: str | os.PathLike[str] | None = None,
) -> tuple[Path, str]:
    """The local snapshot folder holding ``spec.files`` and its commit hash.

    The cache is tried first; then, unless ``offline`` (default: ``HF_HUB_OFFLINE``), the Hub.
    Files with a digest in ``spec.sha256`` are verified every time (IntegrityError).
    """
    wanted = _Wanted(spec.repo, spec.revision, spec.files, spec.files,
                     what=f"model {spec.name!r}", retry=f"edgeguard pull {spec.name}")
    folder = _fetch(wanted, offline=offline, progress=progress, hf_cache=hf_cache)
    verify_checkpoint(spec, folder, spec.files)
    if SHARD_INDEX in spec.files:  # then the shards it names, at the commit just resolved
        shards = shard_names(folder / SHARD_INDEX, wanted.what)
        wanted = _Wanted(spec.repo, folder.name, shards, shards, what=wanted.what, retry=wanted.retry)
        folder = _fetch(wanted, offline=offline, progress=progress, hf_cache=hf_cache)
        verify_checkpoint(spec, folder, [f for f in spec.sha256 if f not in spec.files])
    return folder, folder.name


def shard_names(index: Path, what: str) -> tuple[str, ...]:
    """The weight files a model.safetensors.index.json names (plain file names only)."""
    import json

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = tuple(sorted(set(weight_map.values())))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelError(f"{what}: {index.name} is not a readable shard index ({error})") from None
    bad = [n for n in names if not isinstance(n, str) or not n.endswith(".safetensors")
           or "/" in n or "\\" in n or n.startswith(".")]
    if bad or not names:
        raise ModelError(f"{what}: {index.name} names no usable .safetensors shards ({bad[:1] or 'none'})")
    return names


def download_repo(
    repo_id: str,
    *,
    revision: str | None = None,
    offline: bool | None = None,
    progress: bool = True,
    hf_cache: str | os.PathLike[str] | None = None,
) -> tuple[Path, str]:
    """A Hugging Face checkpoint that is not in the registry (``edgeguard convert REPO``):
    config, safetensors weights (sharded or not) and tokenizer files, cache first.
    Nothing to verify it against: the returned commit is what a manifest should record."""
    wanted = _Wanted(repo_id, revision or "main", CHECKPOINT_PATTERNS, REQUIRED_CHECKPOINT_FILES,
                     what=f"repository {repo_id}", retry="the same command")
    folder = _fetch(wanted, offline=offline, progress=progress, hf_cache=hf_cache)
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"repository {repo_id} at {wanted.revision} has no .safetensors weights")
    return folder, folder.name


CHECKPOINT_PATTERNS = ("config.json", "generation_config.json", "*.safetensors",
                       "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")
REQUIRED_CHECKPOINT_FILES = CHECKPOINT_FILES


def verify_checkpoint(spec: ModelSpec, folder: str | os.PathLike[str],
                      files: Collection[str] | None = None) -> None:
    """IntegrityError naming the first file (of ``files``, default all) whose sha256 differs
    from the registry's, or that is missing (a shard digest for a shard the index does not name)."""
    for file, expected in spec.sha256.items():
        if files is not None and file not in files:
            continue
        path = Path(folder) / file
        if not path.is_file():
            raise IntegrityError(f"{path}: the registry entry {spec.name!r} has a sha256 for {file}, "
                                 f"which its {SHARD_INDEX} does not name")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"{path}: sha256 is {actual}, but the registry entry {spec.name!r} expects "
                f"{expected}; delete the file and run: edgeguard pull {spec.name}"
            )


@dataclass(frozen=True)
class _Wanted:
    repo: str
    revision: str
    patterns: tuple[str, ...]
    required: tuple[str, ...]
    what: str  # how messages name it
    retry: str  # the command that fetches it

    def missing(self, folder: Path) -> list[str]:
        # exists() follows the cache's symlinks: an entry whose blob is gone is missing.
        return [file for file in self.required if not (folder / file).exists()]


def _fetch(wanted: _Wanted, *, offline: bool | None, progress: bool,
           hf_cache: str | os.PathLike[str] | None) -> Path:
    offline = hub_offline() if offline is None else offline
    cache = hf_cache_dir() if hf_cache is None else Path(hf_cache)
    folder = _cached_snapshot(wanted, cache)
    if folder is not None:
        return folder
    if offline:
        raise ModelError(
            f"{wanted.what} ({wanted.repo} at {wanted.revision}) is not in the Hugging Face "
            f"cache {cache} and offline mode is on. {_what_to_do(wanted)}"
        )
    return _download(wanted, cache, progress)


def _first_line(error: BaseException) -> str:
    """huggingface_hub's messages run over several lines of advice; a CLI line keeps the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _what_to_do(wanted: _Wanted) -> str:
    return (f"With network access, run: {wanted.retry}; offline, pass --model FOLDER with a converted "
            "model or a downloaded checkpoint")


def _cached_snapshot(wanted: _Wanted, cache: Path) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(
            wanted.repo, revision=wanted.revision, allow_patterns=list(wanted.patterns),
            cache_dir=cache, local_files_only=True,
        ))
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        return None
    missing = wanted.missing(folder)
    if missing:
        logger.info("cached snapshot %s lacks %s", folder, ", ".join(missing))
        return None
    return folder


def _download(wanted: _Wanted, cache: Path, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{wanted.repo} at {wanted.revision}"
    logger.info("downloading %s into %s", where, cache)
    try:
        folder = Path(snapshot_download(
            wanted.repo, revision=wanted.revision, allow_patterns=list(wanted.patterns),
            cache_dir=cache, tqdm_class=_bar_class() if progress else _quiet_tqdm(),
            # read at call time, like the cache folder (huggingface_hub reads it at import)
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        ))
    except RevisionNotFoundError:
        raise ModelError(f"{wanted.what}: the Hub has no revision {where}") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelError(
            f"{wanted.what}: repository {wanted.repo} not found or not accessible"
        ) from None
    except LocalEntryNotFoundError as error:
        raise ModelError(f"{wanted.what}: cannot reach the Hugging Face Hub for {where} ({_first_line(error)}). "
                         f"{_what_to_do(wanted)}") from None
    except (HfHubHTTPError, OSError) as error:
        raise ModelError(f"{wanted.what}: download of {where} failed ({_first_line(error)}). "
                         f"{_what_to_do(wanted)}") from None
    missing = wanted.missing(folder)
    if missing:
        raise ModelError(f"{wanted.what}: {where} has no {', '.join(missing)}")
    return folder


def _bar_class() -> type:
    """Our bar: rate and ETA on a terminal, plain periodic lines in a log."""
    from edgeguard.progress import Bar

    return Bar


def _quiet_tqdm() -> type:
    from huggingface_hub.utils import tqdm

    class QuietTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm
