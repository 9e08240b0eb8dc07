"""The model registry: models.toml files -> frozen, validated ``ModelSpec``s.

The packaged ``edgeguard/models.toml`` is read first, then one user file: the path in
``$EDGEGUARD_MODELS`` (which must exist), else ``<config dir>/models.toml`` if present. A user
entry replaces the packaged entry of the same name as a whole (so a new revision never
inherits stale sha256 digests) or adds a new model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from edgeguard.errors import UsageError
from edgeguard.models.formats import CHECKPOINT_FILES as REQUIRED_FILES
from edgeguard.models.formats import QUANTS
from edgeguard.models.sizing import DEFAULT_CTX, Footprint, ModelShape, footprint
from edgeguard.tomlfile import read_toml

KINDS = ("gen", "stream")
DEFAULT_MODELS = {"gen": "gen-0.6b", "stream": "stream-0.6b"}
ENV_MODELS = "EDGEGUARD_MODELS"
SHARD_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's tensor -> shard map

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. ``revision`` should be a commit (see ``pinned``); ``files`` are
    what a pull fetches (with model.safetensors.index.json: also every shard it names);
    ``sha256`` maps some of them to their expected digests; ``shape`` (optional) gives the
    checkpoint's sizes, from which ``footprint`` computes disk and memory before a download."""

    name: str
    kind: str
    repo: str
    revision: str
    files: tuple[str, ...]
    default_quant: str
    context_length: int
    license: str
    description: str = ""
    sha256: Mapping[str, str] = field(default_factory=dict)
    shape: ModelShape | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise UsageError(
                f"model {self.name!r}: the name must be lowercase letters, digits, '.', '_', '-'"
            )
        self._require(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}")
        self._require(isinstance(self.repo, str) and bool(_REPO.fullmatch(self.repo)),
                      "repo", "must be a Hugging Face repo id 'owner/name'")
        self._require(isinstance(self.revision, str) and bool(self.revision)
                      and not any(c.isspace() for c in self.revision),
                      "revision", "must be a commit hash (or a branch or tag name)")
        self._check_files()
        self._require(self.default_quant in QUANTS, "default_quant",
                      f"must be one of {', '.join(QUANTS)}")
        self._require(isinstance(self.context_length, int)
                      and not isinstance(self.context_length, bool)
                      and self.context_length > 0, "context_length", "must be a positive integer")
        self._require(isinstance(self.license, str) and bool(self.license),
                      "license", "must be a non-empty string")
        self._require(isinstance(self.description, str), "description", "must be a string")
        self._check_sha256()
        self._check_shape()

    def _require(self, ok: bool, field_name: str, message: str) -> None:
        if not ok:
            value = getattr(self, field_name)
            raise UsageError(f"model {self.name!r}: {field_name} {message}, got {value!r}")

    def _check_files(self) -> None:
        files = self.files
        self._require(not isinstance(files, str) and isinstance(files, Iterable),
                      "files", "must be a list of file names")
        files = tuple(files)
        self._require(all(isinstance(f, str) and f and not f.startswith("/")
                          and ".." not in f.split("/") for f in files),
                      "files", "must be relative paths inside the repo")
        self._require(len(set(files)) == len(files), "files", "must not repeat a file")
        missing = [f for f in REQUIRED_FILES if f not in files]
        self._require(not missing, "files", f"must include {', '.join(missing)}")
        self._require(any(f.endswith(".safetensors") for f in files) or SHARD_INDEX in files,
                      "files", f"must include the .safetensors weights or their {SHARD_INDEX}")
        object.__setattr__(self, "files", files)

    def _check_sha256(self) -> None:
        self._require(isinstance(self.sha256, Mapping), "sha256", "must be a table")
        digests = {}
        for file, digest in self.sha256.items():
            shard = SHARD_INDEX in self.files and isinstance(file, str) and file.endswith(".safetensors") \
                and "/" not in file
            self._require(file in self.files or shard, "sha256",
                          f"names {file!r}, which is not in files (nor a shard of a sharded entry)")
            self._require(isinstance(digest, str) and bool(_SHA256.fullmatch(digest.lower())),
                          "sha256", f"entry {file!r} must be 64 hex digits")
            digests[file] = digest.lower()
        object.__setattr__(self, "sha256", MappingProxyType(digests))

    def _check_shape(self) -> None:
        shape = self.shape
        if shape is None or isinstance(shape, ModelShape):
            pass
        elif isinstance(shape, Mapping):
            try:
                shape = ModelShape.from_mapping(shape)
            except (TypeError, ValueError) as error:
                raise UsageError(f"model {self.name!r}: {error}") from None
        else:
            self._require(False, "shape", "must be a table of sizes")
        if shape is not None and self.kind == "stream":
            self._require(shape.guard_inner > 0, "shape", "of a Stream model needs guard_inner")
        object.__setattr__(self, "shape", shape)

    def footprint(self, quant: str | None = None, ctx_tokens: int = DEFAULT_CTX) -> Footprint | None:
        """Disk and memory at ``quant`` (default: ``default_quant``), computed from ``shape``;
        None when the entry has no shape."""
        if self.shape is None:
            return None
        return footprint(self.shape, self.kind, quant or self.default_quant, name=self.name,
                         ctx_tokens=ctx_tokens)

    @property
    def pinned(self) -> bool:
        """Whether ``revision`` is an immutable commit rather than a branch or tag."""
        return bool(_COMMIT.fullmatch(self.revision))

    def __reduce__(self):
        values = [getattr(self, f.name) for f in fields(self)]
        values[-2] = dict(self.sha256)
        return (ModelSpec, tuple(values))


_FIELDS = {f.name for f in fields(ModelSpec)} - {"name"}
_REQUIRED_FIELDS = ("kind", "repo", "revision", "files", "default_quant", "context_length",
                    "license")


def packaged_registry_path() -> Path:
    return Path(str(resources.files("edgeguard").joinpath("models.toml")))


def config_dir() -> Path:
    """Where edgeguard reads user configuration: the platform's user config folder
    (``$XDG_CONFIG_HOME/edgeguard`` or ``~/.config/edgeguard`` on Linux)."""
    import platformdirs

    # roaming: on Windows %APPDATA%, where this folder was before platformdirs
    return Path(platformdirs.user_config_dir("edgeguard", appauthor=False, roaming=True))


def user_registry_path() -> Path | None:
    """``$EDGEGUARD_MODELS`` (must exist), else ``<config dir>/models.toml`` if it exists."""
    env = os.environ.get(ENV_MODELS)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise UsageError(f"{ENV_MODELS}={env}: no such file")
        return path
    path = config_dir() / "models.toml"
    return path if path.is_file() else None


def load_registry(paths: Iterable[str | os.PathLike[str]] | None = None) -> dict[str, ModelSpec]:
    """Read registry files in order (later entries replace earlier ones of the same name).
    ``paths=None`` means the packaged file, then the user file if any."""
    if paths is None:
        user = user_registry_path()
        paths = [packaged_registry_path()] + ([user] if user else [])
    registry: dict[str, ModelSpec] = {}
    for path in paths:
        registry.update(_read_registry_file(Path(path)))
    return registry


def _read_registry_file(path: Path) -> dict[str, ModelSpec]:
    data = read_toml(path, "model registry")
    specs = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise UsageError(f"{path}: [{name}] must be a table describing one model")
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            hint = ""
            if isinstance(entry[unknown[0]], dict):
                hint = f' (a model name with a dot must be quoted: ["{name}.{unknown[0]}"])'
            raise UsageError(f"{path}: [{name}] unknown field {unknown[0]!r}{hint}")
        missing = [key for key in _REQUIRED_FIELDS if key not in entry]
        if missing:
            raise UsageError(f"{path}: [{name}] missing field {missing[0]!r}")
        try:
            specs[name] = ModelSpec(name=name, **entry)
        except UsageError as error:
            raise UsageError(f"{path}: [{name}] {error}") from None
    return specs


def get_model(name: str, registry: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    registry = load_registry() if registry is None else registry
    try:
        return registry[name]
    except KeyError:
        raise UsageError(
            f"unknown model {name!r}; registered: {', '.join(sorted(registry)) or 'none'}"
        ) from None


def default_model(kind: str = "gen", registry: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    """The registry's default model of a kind ("gen-0.6b" or "stream-0.6b")."""
    if kind not in KINDS:
        raise UsageError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    spec = get_model(DEFAULT_MODELS[kind], registry)
    if spec.kind != kind:
        raise UsageError(
            f"the default {kind} model {spec.name!r} is registered as kind {spec.kind!r}"
        )
    return spec
