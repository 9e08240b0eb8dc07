"""Stream's embedding rows read with positional reads: the same rows as numpy's own loader."""

from __future__ import annotations

import numpy as np
import pytest

from edgeguard.errors import ModelError
from edgeguard.runtime.embedding_rows import EmbeddingRows


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_rows_equal_numpy(tmp_path, dtype):
    table = np.random.default_rng(0).standard_normal((1000, 24)).astype(dtype)
    np.save(tmp_path / "emb.npy", table)
    rows = EmbeddingRows(tmp_path / "emb.npy")
    assert rows.shape == (1000, 24) and rows.ndim == 2
    ids = [0, 999, 17, 17, 500]
    got = rows.rows(ids)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, table[ids].astype(np.float32))
    assert rows.rows([]).shape == (0, 24)
    rows.close()
    with pytest.raises(ModelError, match="closed"):
        rows.rows([1])


def test_bad_tables_are_clear_errors(tmp_path):
    np.save(tmp_path / "good.npy", np.zeros((100, 8), np.float16))
    data = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-10])
    with pytest.raises(ModelError, match="truncated"):
        EmbeddingRows(tmp_path / "short.npy")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(ModelError, match="cannot read"):
        EmbeddingRows(tmp_path / "junk.npy")
    np.save(tmp_path / "vector.npy", np.zeros(10, np.float32))
    with pytest.raises(ModelError, match="2-D"):
        EmbeddingRows(tmp_path / "vector.npy")
    with pytest.raises(ModelError, match="cannot read"):
        EmbeddingRows(tmp_path / "missing.npy")


def test_damaged_headers_and_non_float_tables_are_clear_errors(tmp_path):
    """numpy parses a .npy header as a Python literal: a flipped byte there raises parser errors
    (tokenize.TokenError, SyntaxError), and a table of strings or raw bytes fails only when read;
    each is a ModelError at open."""
    np.save(tmp_path / "good.npy", np.zeros((100, 8), np.float16))
    data = bytearray((tmp_path / "good.npy").read_bytes())
    header_end = data.index(b"\n")
    for offset, flip in [(o, f) for o in range(8, header_end) for f in (0x08, 0x09, 0x20, 0x7D)]:
        damaged = bytearray(data)
        damaged[offset] ^= flip
        (tmp_path / "flipped.npy").write_bytes(bytes(damaged))
        try:
            table = EmbeddingRows(tmp_path / "flipped.npy")
        except ModelError:
            continue
        table.rows([0])  # the flip left a readable float header: reading works
        table.close()
    for dtype in ("S2", "V2"):
        np.save(tmp_path / f"{dtype}.npy", np.zeros((100, 8), dtype))
        with pytest.raises(ModelError, match="floats"):
            EmbeddingRows(tmp_path / f"{dtype}.npy")
