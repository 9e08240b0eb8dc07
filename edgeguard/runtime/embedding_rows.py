"""Rows of the Stream model's input-embedding table, read from its ``.npy`` file on demand.

The table (vocabulary x hidden size; 151,936 x 1,024 for the 0.6B) is larger than the backbone's
weights, and a response touches a few thousand scattered rows. A memory map would count every
page the kernel reads ahead around each row in the process's RSS (a 7,000-token response grew a
Stream engine's mapped pages by ~200 MB); positional reads (``os.pread``) of exactly the rows
needed leave them in the page cache, which the kernel can drop, instead (where there is no
``pread``, Windows, a seek and a read under a lock: ``edgeguard.platform.files``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeguard.errors import ModelError
from edgeguard.platform.files import PositionedReader


class EmbeddingRows:
    """The table's shape and dtype from its header; ``rows(ids)`` as float32 [len(ids), width].
    Thread-safe (positional reads share no file offset; without them, one lock)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"unsupported .npy format version {version}")
                shape, fortran, dtype = read_header(f)
                self._offset = f.tell()
        except OSError as e:
            raise ModelError(f"cannot read the embedding table {self.path.name}: {e}") from e
        except Exception as e:  # numpy parses the header as a Python literal: any parser error
            raise ModelError(f"cannot read the embedding table {self.path.name}: its header is damaged "
                             f"({type(e).__name__}: {str(e)[:200]})") from e
        if len(shape) != 2 or fortran or dtype.kind != "f" or min(shape) < 1:
            raise ModelError(f"{self.path.name} is not a 2-D C-ordered table of floats (shape {list(shape)}, "
                             f"dtype {dtype})")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self._row_bytes = self.shape[1] * dtype.itemsize
        expected = self._offset + self.shape[0] * self._row_bytes
        if self.path.stat().st_size < expected:
            raise ModelError(f"{self.path.name} is truncated: {self.path.stat().st_size} bytes, "
                             f"its header says {expected}")
        self._reader: PositionedReader | None = PositionedReader(self.path)

    @property
    def ndim(self) -> int:
        return 2

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """The rows of ``ids`` (already validated to lie in [0, shape[0])) as float32."""
        if self._reader is None:
            raise ModelError(f"the embedding table {self.path.name} is closed")
        out = np.empty((len(ids), self.shape[1]), self.dtype)
        # straight into the output rows: no bytes object per row
        if not self._reader.read_rows(out, [self._offset + int(token) * self._row_bytes for token in ids]):
            raise ModelError(f"short read from the embedding table {self.path.name}")
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
