"""A small, validating safetensors reader (bf16/f16/f32) that memory-maps tensor data.

Our own reader rather than the safetensors package: numpy has no bfloat16, and we want a
truncated or malformed file to produce one clear error instead of a deep traceback.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeguard.errors import ConversionError

_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str  # "BF16" | "F16" | "F32"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in the file
    nbytes: int

    def load_f32(self) -> np.ndarray:
        """The tensor as float32 (bf16 widened exactly)."""
        raw = self.load_raw()
        if self.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)

    def load_raw(self) -> np.ndarray:
        """The stored values: uint16 bit patterns for bf16, else the float dtype."""
        np_dtype, _ = _DTYPES[self.dtype]
        mm = np.memmap(self.file, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.nbytes,))
        return np.frombuffer(mm, dtype=np_dtype).reshape(self.shape)


def read_index(path: Path) -> dict[str, TensorRecord]:
    """Tensor records of one .safetensors file, validated against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path.name}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise ConversionError(f"{path.name}: truncated or not a safetensors file")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path.name}: malformed safetensors header") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path.name}: malformed safetensors header")
    data_start = 8 + header_len
    records: dict[str, TensorRecord] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path.name}: malformed entry for tensor {name!r}") from e
        if dtype not in _DTYPES:
            raise ConversionError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype} (need BF16, F16 or F32)")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]
        if end - begin != nbytes:
            raise ConversionError(f"{path.name}: tensor {name!r} size does not match its shape {list(shape)}")
        if data_start + end > size:
            raise ConversionError(
                f"{path.name}: truncated file: tensor {name!r} ends at byte {data_start + end}, file has {size}"
            )
        records[name] = TensorRecord(name, dtype, shape, path, data_start + begin, nbytes)
    return records


def read_checkpoint_tensors(folder: Path) -> dict[str, TensorRecord]:
    """All tensors of a checkpoint folder: model.safetensors or a sharded index.

    With an index, every tensor must be in the shard the index names for it, and in one shard
    only: a mix of shards from two downloads is refused rather than converted.
    """
    index = folder / "model.safetensors.index.json"
    weight_map: dict[str, str] | None = None
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{index.name}: malformed shard index") from e
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise ConversionError(f"{folder}: no *.safetensors file found")
    records: dict[str, TensorRecord] = {}
    for shard in shards:
        shard_path = folder / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise ConversionError(f"{folder}: missing weights file {shard}")
        for name, record in read_index(shard_path).items():
            if name in records:
                raise ConversionError(f"{shard}: tensor {name} is also in {records[name].file.name}")
            if weight_map is not None and weight_map.get(name) != shard:
                where = f"in {weight_map[name]}" if name in weight_map else "absent"
                raise ConversionError(f"{shard}: holds tensor {name}, which {index.name} lists {where}")
            records[name] = record
    if weight_map is not None:
        lost = [n for n in weight_map if n not in records]
        if lost:
            raise ConversionError(f"{index.name}: lists tensor {lost[0]}, which {weight_map[lost[0]]} lacks")
    return records
