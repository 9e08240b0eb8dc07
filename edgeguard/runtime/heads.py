"""The Stream classification heads (ONNX) through onnxruntime.

The only module of edgeguard that runs ``onnxruntime`` (imported through
``edgeguard.runtime.native_order``, which refuses where the import would crash the process). The heads
are four small matrix products per token, so the session runs single-threaded by default: on a
2-core CPU one thread is the fastest for one token and as fast as two for a backlog of tokens,
and it leaves the other core to llama.cpp.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeguard.errors import ModelError, RuntimeFailure, UsageError
from edgeguard.models.formats import HEADS_INPUT as INPUT
from edgeguard.models.formats import HEADS_OUTPUTS as OUTPUTS
from edgeguard.runtime import native_order

_ORT_LOG_ERROR = 3


def onnxruntime_info() -> dict:
    """The installed onnxruntime's version and execution providers, for ``edgeguard doctor``."""
    try:
        import onnxruntime
    except ImportError as e:
        return {"version": None, "error": str(e)}
    return {"version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class Heads:
    """One onnxruntime session over ``heads.onnx``; ``run`` maps hidden states to head logits.

    Not thread-safe in the sense of edgeguard's other runtime objects: give each thread its own.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"heads file not found: {path}")
        threads = 1 if threads is None else threads
        if threads < 1:
            raise UsageError(f"heads threads must be positive, got {threads}")
        ort = native_order.onnxruntime()
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing or not providers:
            raise ModelError(
                f"onnxruntime provider {', '.join(missing) or '(none given)'} is not available "
                f"here (available: {', '.join(available)})"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = _ORT_LOG_ERROR
        if threads == 1:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options,
                                                 providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"cannot load heads {path}: {_one_line(exc)}") from exc
        inputs = self._session.get_inputs()
        names = [o.name for o in self._session.get_outputs()]
        if [i.name for i in inputs] != [INPUT] or sorted(names) != sorted(OUTPUTS):
            raise ModelError(
                f"{path} is not a Stream heads model (inputs {[i.name for i in inputs]}, "
                f"outputs {names}; expected {INPUT} -> {', '.join(OUTPUTS)})"
            )
        width = inputs[0].shape[1]
        self.hidden_size = width if isinstance(width, int) else None
        self._names = names
        self._unchecked: dict[str, int | None] = {}  # outputs run() checks: name -> width, or None
        self.path = path

    def expect(self, hidden_size: int, widths: dict[str, int]) -> None:
        """A ModelError unless the heads take ``hidden_size`` values and their outputs have these
        widths (the model's label counts) where the graph says; ``run`` checks the outputs whose
        type, rank or width the graph leaves open (a converted graph declares all of them)."""
        if self.hidden_size is not None and self.hidden_size != hidden_size:
            raise ModelError(f"{self.path.name} takes hidden states of {self.hidden_size} values; the model's "
                             f"are {hidden_size}")
        for output in self._session.get_outputs() if self._session is not None else ():
            shape, want = output.shape, widths.get(output.name)
            if want is not None and isinstance(shape, list) and \
                    (len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != want)):
                raise ModelError(f"{self.path.name}: output {output.name} has shape {shape}; the model has "
                                 f"{want} labels for it")
            declared = output.type == "tensor(float)" and isinstance(shape, list) and len(shape) == 2 \
                and isinstance(shape[1], int)
            if not declared:
                self._unchecked[output.name] = want

    def run(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        """Head logits for hidden states [n, hidden]: ``{output name: float32 [n, k]}``."""
        if self._session is None:
            raise RuntimeFailure("the heads session is closed")
        data = np.ascontiguousarray(hidden, dtype=np.float32)
        if data.ndim != 2 or (self.hidden_size is not None and data.shape[1] != self.hidden_size):
            raise UsageError(f"hidden states must have shape [n, {self.hidden_size}], "
                             f"got {list(data.shape)}")
        try:
            values = self._session.run(None, {INPUT: data})
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime failed on the heads: {_one_line(exc)}") from exc
        out = dict(zip(self._names, values))
        for name, width in self._unchecked.items():
            value = out[name]
            want = None if width is None else (len(data), width)
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim != 2 \
                    or (want is not None and value.shape != want):
                raise ModelError(f"{self.path.name}: output {name} is {getattr(value, 'dtype', type(value))} "
                                 f"{list(getattr(value, 'shape', []))}, expected float {list(want or ['n', 'k'])}")
        return out

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> Heads:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
