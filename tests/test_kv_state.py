"""edgeguard.runtime.kv_state: sequence states moved between cache layouts, against real llama.cpp.

Oracles: llama.cpp's own computation in the target layout (logits of a fresh context, and the
q8_0 keys it writes itself), and gguf-py's q8_0 quantizer for the block format.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest

from edgeguard.errors import RuntimeFailure
from edgeguard.runtime import kv_state
from edgeguard.runtime.backend import Backend, Vocab
from tests.fixtures.tiny_gguf import write_random_qwen3_gguf

TEXT = "the quick brown fox jumps over the lazy dog and keeps on running far away"
LAYOUTS = [(False, "f16"), (True, "f16"), (False, "q8_0-keys"), (True, "q8_0-keys"), (True, "q8_0")]
ROT = kv_state.Rotations(128, 64)  # the fixture's head size: 128
F16, Q8, BF16 = kv_state.GGML_F16, kv_state.GGML_Q8_0, kv_state.GGML_BF16
TYPES = {"f16": (F16, F16), "q8_0-keys": (Q8, F16), "q8_0": (Q8, Q8)}


def _types(flash: bool, kv: str) -> tuple[int, int]:
    """(K, V) ggml types of a CPU backend: with flash attention an f16 cache keeps keys in bf16."""
    return (BF16, F16) if flash and kv == "f16" else TYPES[kv]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "full.gguf"
    write_random_qwen3_gguf(path, n_vocab=1000, seed=5)
    return path


@pytest.fixture(scope="module")
def tokens(model):
    with Vocab(model) as vocab:
        return vocab.tokenize(TEXT)


def _backend(model, flash, kv):
    return Backend(model, n_ctx=256, n_threads=2, flash_attn=flash, kv_type=kv)


@pytest.fixture(scope="module")
def fresh(model, tokens):
    """Logits of the suffix computed in one go in each layout, and each layout's prefix state."""
    out = {}
    for flash, kv in LAYOUTS:
        with _backend(model, flash, kv) as be:
            logits = be.eval(tokens, outputs=range(15, len(tokens)))
            be.truncate(15)
            out[flash, kv] = (logits, be.state())
    return out


@pytest.mark.parametrize("saved, restored", list(itertools.permutations(LAYOUTS, 2)))
def test_state_moves_between_layouts(model, tokens, fresh, saved, restored, tmp_path):
    """A prefix saved in one layout and restored in another (from bytes and from a file)
    continues as a fresh computation in the target layout would, up to the difference the two
    layouts' own rounding makes (the prefix's cache was computed the saved way)."""
    state = fresh[saved][1]
    with _backend(model, *saved) as be:  # the file as llama.cpp writes it
        assert be.restore(state, 15)
        assert be.state_to_file(tmp_path / "seq.kv")
    want = fresh[restored][0]
    apart = np.abs(fresh[saved][0] - want).max()
    for how in ("bytes", "file"):
        with _backend(model, *restored) as be:
            ok = be.restore(state, 15) if how == "bytes" else be.restore_from_file(tmp_path / "seq.kv", 15)
            assert ok and be.n_past[0] == 15
            got = be.eval(tokens[15:], outputs=range(len(tokens) - 15))
            assert be.layout == kv_state.Layout(*_types(*restored), v_trans=not restored[0])
        err = np.abs(got - want).max()
        print(f"{saved} -> {restored} ({how}): {err:.2e}, layouts apart {apart:.2e}")
        assert err <= max(1.5 * apart, 1e-4) and err <= 1e-2 * np.abs(want).max()


def test_converted_keys_match_llama_cpp_own_q8_0(fresh):
    """f16 keys rotated and quantized by kv_state are the q8_0 keys llama.cpp writes itself
    (rotating f32 keys): in the first layer, whose keys depend on the input alone, within 1.05
    quantization steps per value (the f16 rounding before ours) and 98% identical. (Later
    layers differ more: their input already went through attention over quantized keys.)"""
    ours = kv_state.convert_bytes(fresh[False, "f16"][1], kv_state.Layout(Q8, F16, True), ROT)
    native = fresh[False, "q8_0-keys"][1]
    assert len(ours) == len(native)
    a, b = _keys(ours)[0], _keys(native)[0]
    step = np.repeat(np.frombuffer(b, kv_state._Q8_BLOCK)["d"].astype(np.float32), 32)
    assert np.all(np.abs(kv_state.dequantize_q8_0(a) - kv_state.dequantize_q8_0(b)) <= 1.05 * step)
    qa, qb = np.frombuffer(a, kv_state._Q8_BLOCK)["qs"], np.frombuffer(b, kv_state._Q8_BLOCK)["qs"]
    assert (qa == qb).mean() > 0.98
    unrotated = kv_state.quantize_q8_0(np.frombuffer(_keys(fresh[False, "f16"][1])[0], np.float16))
    assert (np.frombuffer(unrotated, kv_state._Q8_BLOCK)["qs"] == qb).mean() < 0.2  # the rotation matters


def _keys(state: bytes) -> list[bytes]:
    """Each layer's K rows of a one-stream state."""
    src = io.BytesIO(state)
    r = kv_state._Reader(src, None)
    r.take(kv_state.BYTES_HEADER)
    assert r.int() == 1
    cells = r.cells()
    r.int()
    out = []
    for _ in range(r.int()):
        r.int()
        out.append(r.take(cells * r.int(8)))
    return out


def test_quantize_q8_0_matches_gguf_py():
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    x[3, :32] = 0.0  # an all-zero block: scale 0
    theirs = quantize(x, GGMLQuantizationType.Q8_0).tobytes()
    ours = kv_state.quantize_q8_0(x)
    assert len(ours) == len(theirs)
    a, b = np.frombuffer(ours, kv_state._Q8_BLOCK), np.frombuffer(theirs, kv_state._Q8_BLOCK)
    assert np.array_equal(a["d"], b["d"])
    assert (a["qs"] != b["qs"]).sum() <= 2  # exact .5 ties: gguf-py rounds away from zero
    np.testing.assert_allclose(kv_state.dequantize_q8_0(ours), x.reshape(-1),
                               atol=float(np.abs(x).max() / 127 / 2 * 1.01))


def test_key_rotation_is_llama_cpps_hadamard():
    """The fast transform equals the Sylvester matrix (H[i, j] = (-1)^popcount(i & j) / sqrt(n)),
    is its own inverse, and the block size follows llama.cpp's rule."""
    n = 128
    i = np.arange(n)
    h = (-1.0) ** np.array([[bin(a & b).count("1") for b in i] for a in i]) / np.sqrt(n)
    x = np.random.default_rng(1).standard_normal(3 * n).astype(np.float32)
    np.testing.assert_allclose(kv_state.hadamard(x, n), (x.reshape(-1, n) @ h).reshape(-1), atol=1e-5)
    np.testing.assert_allclose(kv_state.hadamard(kv_state.hadamard(x, n), n), x, atol=1e-5)
    assert [kv_state.rotations(d).k for d in (128, 64, 192, 256, 80, 0)] == [128, 64, 64, 256, 0, 0]
    assert [kv_state.rotations(d).v for d in (128, 64, 80)] == [64, 64, 0]
    with pytest.raises(RuntimeFailure, match="untransposed"):
        kv_state.convert(io.BytesIO(), io.BytesIO(), 8, kv_state.Layout(Q8, Q8, True), ROT)


def test_v_layout_round_trip_is_exact(fresh):
    state = fresh[False, "f16"][1]
    flipped = kv_state.convert_bytes(state, kv_state.Layout(F16, F16, v_trans=False), ROT)
    assert flipped != state
    assert kv_state.layout_of(io.BytesIO(flipped), kv_state.BYTES_HEADER) == kv_state.Layout(F16, F16, False)
    assert kv_state.convert_bytes(flipped, kv_state.Layout(F16, F16, v_trans=True), ROT) == state
    assert kv_state.convert_bytes(state, kv_state.Layout(F16, F16, True), ROT) is state  # already so


def test_damaged_states_are_refused(model, fresh, tmp_path):
    state = fresh[False, "f16"][1]
    to = kv_state.Layout(Q8, F16, True)
    with pytest.raises(RuntimeFailure, match="shorter"):
        kv_state.convert_bytes(state[:-3], to, ROT)
    with pytest.raises(RuntimeFailure, match="after its last stream"):
        kv_state.convert_bytes(state + b"\0", to, ROT)
    with _backend(model, False, "q8_0-keys") as be:  # refused, not a crash; the sequence stays empty
        assert not be.restore(state[:-3], 15)
        assert be.n_past[0] == 0
        path = tmp_path / "short.kv"
        path.write_bytes(b"ggsq")
        assert not be.restore_from_file(path, 15)
        with pytest.raises(RuntimeFailure, match="not a llama.cpp sequence state"):
            kv_state.convert_file(path, to, ROT)
        assert be.eval([1, 2, 3]).shape[-1] == be.n_vocab  # still usable


def test_conversion_in_chunks_equals_whole_layers(fresh, monkeypatch):
    """Layers are converted a chunk of cells at a time (bounded temporaries): the bytes do not
    depend on the chunk size."""
    cases = [(fresh[False, "f16"][1], kv_state.Layout(Q8, Q8, False)),  # K, and V transposed -> rows
             (fresh[True, "q8_0"][1], kv_state.Layout(F16, F16, False))]  # q8_0 rows -> f16 rows
    whole = [kv_state.convert_bytes(state, to, ROT) for state, to in cases]
    monkeypatch.setattr(kv_state, "_CHUNK", 4)  # 15 cells: chunks of 4, 4, 4, 3
    assert [kv_state.convert_bytes(state, to, ROT) for state, to in cases] == whole
