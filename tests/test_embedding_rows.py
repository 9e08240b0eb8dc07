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
