"""From a model reference (registry name, converted folder, HF checkpoint folder) to a guard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgeguard.errors import ModelError, UsageError
from edgeguard.models import registry, store
from edgeguard.models.formats import LOAD_PREFERENCE
from edgeguard.models.manifest import MANIFEST_NAME, Manifest

if TYPE_CHECKING:
    from edgeguard.engines.core import EngineOptions
    from edgeguard.engines.gen import GenGuard, GenOptions
    from edgeguard.engines.stream import StreamGuard, StreamOptions
    from edgeguard.policy import Policy

Progress = Callable[[str], None]
_Options = TypeVar("_Options", bound="EngineOptions")


def resolve(model: str | Path | None, quant: str | None = None, *, kind: str = "gen",
            offline: bool | None = None, progress: Progress = lambda m: None) -> tuple[Path, Manifest, str]:
    """The converted folder, its manifest and the quant to load.

    ``None`` means the registry's default model of ``kind``, pulled on first use.
    """
    if model is None:
        spec = registry.default_model(kind)
        if not store.is_pulled(spec, quant or spec.default_quant):
            progress(f"first use: pulling the default {kind} model {spec.name} (once)")
        return _from_registry(spec, quant, offline, progress)
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            manifest = Manifest.read(path)
            return path, manifest, _pick_quant(manifest, quant)
        if (path / "config.json").is_file():
            folder = store.converted_checkpoint(path, quant or "q8_0", progress)
            manifest = Manifest.read(folder)
            return folder, manifest, manifest.quants[0]
        raise UsageError(f"{path} is neither a converted model (manifest.json) nor a checkpoint (config.json)")
    models = registry.load_registry()
    if str(model) in models:
        return _from_registry(models[str(model)], quant, offline, progress)
    raise UsageError(
        f"unknown model {model!r}: not a folder and not in the registry ({', '.join(sorted(models))})"
    )


def _from_registry(spec: registry.ModelSpec, quant: str | None, offline: bool | None,
                   progress: Progress) -> tuple[Path, Manifest, str]:
    folder = store.pull(spec, quant, offline=offline, progress=progress)
    manifest = Manifest.read(folder)
    return folder, manifest, _pick_quant(manifest, quant)


def _pick_quant(manifest: Manifest, quant: str | None) -> str:
    if quant is None:
        for preferred in LOAD_PREFERENCE:
            if preferred in manifest.quants:
                return preferred
        return manifest.quants[0]
    if quant not in manifest.quants:
        raise ModelError(f"model {manifest.name} has no {quant} file (quants: {', '.join(manifest.quants)})")
    return quant


def load(model: str | Path | None = None, quant: str | None = None, *, policy: Policy | str = "strict",
         engine: str | None = None, offline: bool | None = None, progress: Progress = lambda m: None,
         options: GenOptions | StreamOptions | None = None, **kwargs: Any) -> GenGuard | StreamGuard:
    """A ``GenGuard`` or ``StreamGuard`` by the model's kind (or ``engine`` for the default).

    Engine options come as a typed ``GenOptions`` / ``StreamOptions`` (``options=``) or as
    keyword arguments (``n_threads=2, device="cpu"``, ...); one that does not apply to the
    model's engine is a UsageError. Guards are thread-safe: concurrent calls are serialised.
    """
    folder, manifest, quant = resolve(model, quant, kind=engine or "gen", offline=offline, progress=progress)
    if engine is not None and engine != manifest.kind:
        raise UsageError(f"{manifest.name} is a {manifest.kind} model; it cannot run the {engine} engine")
    if manifest.kind == "gen":
        from edgeguard.engines.gen import GenGuard, GenOptions

        kwargs.setdefault("prefix_cache", store.prefix_dir())
        gen_options = _options(GenOptions, manifest.kind, options, kwargs)
        return GenGuard(folder, manifest, quant, policy=policy, options=gen_options)
    from edgeguard.engines.stream import StreamGuard, StreamOptions

    stream_options = _options(StreamOptions, manifest.kind, options, kwargs)
    return StreamGuard(folder, manifest, quant, policy=policy, options=stream_options)


def _options(cls: type[_Options], kind: str, options: object, kwargs: dict[str, Any]) -> _Options:
    """``options`` checked to be a ``cls``, or a ``cls`` made from the keyword arguments."""
    if options is not None and kwargs.keys() - {"prefix_cache"}:
        raise UsageError("give engine options either as options= or as keyword arguments, not both")
    if options is None:
        return cls.from_kwargs(kind, **kwargs)
    if not isinstance(options, cls):
        raise UsageError(f"options for a {kind} model must be {cls.__name__}, "
                         f"got {type(options).__name__}")
    return options
