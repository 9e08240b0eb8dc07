"""edgeguard: Qwen3Guard safety models on small machines.

    >>> import edgeguard
    >>> with edgeguard.load() as guard:          # the default Gen model, pulled on first use
    ...     verdict = guard.check("How do I bake bread?")
    >>> verdict.label, verdict.flagged

The guards and the session are imported on first use, to keep ``import edgeguard`` light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from edgeguard.errors import (
    ConversionError,
    EdgeguardError,
    InputTooLong,
    IntegrityError,
    ModelError,
    RuntimeFailure,
    UsageError,
)
from edgeguard.kinds import Device, Engine, KVType, Label
from edgeguard.runtime import native_order as _native_order
from edgeguard.verdict import StreamState, TokenVerdict, Verdict

if TYPE_CHECKING:
    from edgeguard.engines.gen import GenGuard, GenOptions
    from edgeguard.engines.stream import StreamGuard, StreamOptions, StreamSession

__all__ = [
    "ConversionError",
    "Device",
    "EdgeguardError",
    "Engine",
    "GenGuard",
    "GenOptions",
    "InputTooLong",
    "IntegrityError",
    "KVType",
    "Label",
    "ModelError",
    "RuntimeFailure",
    "StreamGuard",
    "StreamOptions",
    "StreamSession",
    "StreamState",
    "TokenVerdict",
    "UsageError",
    "Verdict",
    "__version__",
    "guard_stream",
    "load",
]
if _native_order.llama_is_cuda_build():  # onnxruntime must load before a CUDA llama.cpp
    _native_order.load_onnxruntime_first()

try:
    __version__ = _version("edgeguard")  # one source: pyproject.toml, through the package metadata
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "GenGuard": "edgeguard.engines.gen",
    "GenOptions": "edgeguard.engines.gen",
    "StreamGuard": "edgeguard.engines.stream",
    "StreamOptions": "edgeguard.engines.stream",
    "StreamSession": "edgeguard.engines.stream",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeguard' has no attribute {name!r}")


ModelRef = str | Path | None


@overload
def load(model: ModelRef = None, quant: str | None = None, *, engine: Literal["gen"],
         policy: Any = "strict", offline: bool | None = None, progress: Callable[[str], None] = ...,
         options: GenOptions | None = None, **kwargs: Any) -> GenGuard: ...
@overload
def load(model: ModelRef = None, quant: str | None = None, *, engine: Literal["stream"],
         policy: Any = "strict", offline: bool | None = None, progress: Callable[[str], None] = ...,
         options: StreamOptions | None = None, **kwargs: Any) -> StreamGuard: ...
@overload
def load(model: ModelRef = None, quant: str | None = None, *, engine: None = None,
         policy: Any = "strict", offline: bool | None = None, progress: Callable[[str], None] = ...,
         options: GenOptions | StreamOptions | None = None, **kwargs: Any) -> GenGuard | StreamGuard: ...
def load(model: ModelRef = None, quant: str | None = None, **kwargs: Any) -> GenGuard | StreamGuard:
    """A ``GenGuard`` or ``StreamGuard`` for a registry name, converted folder or checkpoint
    folder (see ``edgeguard.loader.load``); ``engine=`` narrows the type for a checker."""
    from edgeguard.loader import load as _load

    return _load(model, quant, **kwargs)


def guard_stream(session: StreamSession, chunks: Iterable[str]) -> Iterator[str]:
    """Pass a text stream through a Stream session, stopping when it is flagged
    (see ``edgeguard.engines.passthrough.guard_stream``)."""
    from edgeguard.engines.passthrough import guard_stream as _guard_stream

    return _guard_stream(session, chunks)
