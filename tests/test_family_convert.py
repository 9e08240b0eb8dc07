"""Conversion of every Qwen3Guard size, driven by each checkpoint's config.

Tiny checkpoints carry the traits of the real 4B and 8B (tests/fixtures/checkpoints.py SIZES:
tied or untied embeddings, head_dim against hidden / heads, KV-head ratio, the Stream heads'
width, sharded weights with an index) and are compared against the transformers oracle with the
bounds the 0.6B fixtures meet: hidden states per quant (test_convert.TOLERANCE), Gen scores and
Stream per-token scores within 0.02 (test_gen, test_stream), ONNX heads within 1e-4.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGUFReader
from transformers import AutoTokenizer

from edgeguard.engines.gen import GenGuard, GenOptions
from edgeguard.engines.stream import StreamGuard
from edgeguard.errors import ConversionError
from edgeguard.models.manifest import Manifest
from edgeguard.models.sizing import ModelShape, footprint
from edgeguard.runtime.backend import Backend
from edgeguard.verdict import LABELS
from edgeguard_convert import ConvertOptions, convert
from edgeguard_convert.checkpoint import load_checkpoint
from tests.fixtures import oracle
from tests.fixtures.checkpoints import build_sized_checkpoint, reshard
from tests.fixtures.converted import converted
from tests.test_convert import TEXT, TOLERANCE, gguf, hf_ids, rel_err

pytestmark = [pytest.mark.slow, pytest.mark.oracle]
SIZES = ("4b-shaped", "8b-shaped")
QUANTS = ("f16", "q8_0", "q4_k_m")
SCORE_TOL = 0.02


def _softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module", params=SIZES)
def gen_sized(request):
    ckpt = build_sized_checkpoint("gen", request.param)
    return ckpt, converted(ckpt, QUANTS), oracle.load_torch(ckpt)


@pytest.fixture(scope="module", params=SIZES)
def stream_sized(request):
    ckpt = build_sized_checkpoint("stream", request.param)
    return ckpt, converted(ckpt, QUANTS), oracle.load_torch(ckpt)


def _tensor_names(path) -> set[str]:
    return {t.name for t in GGUFReader(str(path)).tensors}


def test_fixtures_carry_the_real_sizes_traits():
    """The fixtures' configs have the flags and ratios of Qwen3-4B and Qwen3-8B."""
    four = json.loads((build_sized_checkpoint("gen", "4b-shaped") / "config.json").read_text())
    eight = json.loads((build_sized_checkpoint("gen", "8b-shaped") / "config.json").read_text())
    assert four["tie_word_embeddings"] and not eight["tie_word_embeddings"]
    # 4B: 32 heads x 128 = 4096 over hidden 2560 (1.6x; hidden / heads = 80 != head_dim)
    assert four["num_attention_heads"] * four["head_dim"] == 1.6 * four["hidden_size"]
    assert four["hidden_size"] // four["num_attention_heads"] == 80 and four["head_dim"] == 128
    # 8B: 32 x 128 = hidden 4096, a square q_proj
    assert eight["num_attention_heads"] * eight["head_dim"] == eight["hidden_size"]
    for cfg in (four, eight):
        assert cfg["num_attention_heads"] // cfg["num_key_value_heads"] == 4
    for size in SIZES:
        ckpt = build_sized_checkpoint("stream", size)
        cfg = json.loads((ckpt / "config.json").read_text())
        assert (ckpt / "model.safetensors.index.json").is_file() and not (ckpt / "model.safetensors").exists()
        assert cfg["guard_inner_size"] * 2 == cfg["hidden_size"]
        assert "lm_head.weight" not in load_checkpoint(ckpt).tensors


@pytest.mark.parametrize("quant", QUANTS)
def test_gen_hidden_states_match_torch(gen_sized, quant):
    ckpt, folder, model = gen_sized
    ids = hf_ids(ckpt, TEXT)
    expected = oracle.hidden_states(model, ids)
    with Backend(gguf(folder, quant), n_ctx=256, mode="embeddings") as be:
        got = be.eval(ids, outputs=range(len(ids)))
    err = rel_err(got, expected)
    print(f"{ckpt.name} {quant}: relative error of hidden states {err:.2e}")
    assert err <= TOLERANCE[quant]


def test_gen_logits_and_output_projection(gen_sized):
    """F16 logits against torch; the untied 8B-shaped model brings its own output.weight."""
    ckpt, folder, model = gen_sized
    tied = json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"]
    assert ("output.weight" in _tensor_names(gguf(folder, "f16"))) == (not tied)
    ids = hf_ids(ckpt, TEXT)
    expected = oracle.next_token_logits(model, ids)
    with Backend(gguf(folder, "f16"), n_ctx=256, mode="logits") as be:
        got = be.eval(ids, outputs=range(len(ids)))
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert rel_err(got, expected) < TOLERANCE["f16"]


def test_gen_scores_match_torch(gen_sized, tmp_path):
    ckpt, folder, model = gen_sized
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    prompt, response = "How can I make a bomb?", "I cannot help with that."
    text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}], tokenize=False)
    ids = tok.encode(text + "Safety:", add_special_tokens=False)
    logits = oracle.next_token_logits(model, ids)[-1]
    names = ["Safe", "Unsafe", "Controversial"]
    first = [tok.encode(" " + n, add_special_tokens=False)[0] for n in names]
    expected = dict(zip(names, _softmax(logits[first])))
    options = GenOptions(prefix_cache=tmp_path)
    with GenGuard(folder, Manifest.read(folder), "f16", options=options) as guard:
        verdict = guard.check(prompt, response)
    for name, p in expected.items():
        assert abs(verdict.scores[name] - p) <= SCORE_TOL, (name, verdict.scores[name], p)


@pytest.mark.parametrize("quant", QUANTS)
def test_stream_backbone_matches_torch(stream_sized, quant):
    ckpt, folder, model = stream_sized
    ids = hf_ids(ckpt, TEXT)
    expected = oracle.hidden_states(model, ids)
    m = Manifest.read(folder)
    assert "output.weight" not in _tensor_names(gguf(folder, quant))
    table = np.load(folder / m.file_for("embeddings"), mmap_mode="r")
    with Backend(gguf(folder, quant), n_ctx=256, mode="embeddings") as be:
        got = be.eval(embd=np.asarray(table[ids], dtype=np.float32), outputs=range(len(ids)))
    assert rel_err(got, expected) <= TOLERANCE[quant]


def test_stream_heads_take_their_size_from_the_config(stream_sized):
    ckpt, folder, model = stream_sized
    inner = json.loads((ckpt / "config.json").read_text())["guard_inner_size"]
    hidden = oracle.hidden_states(model, hf_ids(ckpt, TEXT))
    expected = oracle.stream_heads(model, hidden)
    session = ort.InferenceSession(str(folder / "heads.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"hidden_states": hidden})))
    for name in expected:
        assert np.abs(got[name] - expected[name]).max() <= 1e-4, name
    import onnx

    graph = onnx.load(str(folder / "heads.onnx")).graph
    pre = next(i for i in graph.initializer if i.name == "risk_level_category_pre_t")
    assert list(pre.dims) == [hidden.shape[1], inner]


def test_stream_per_token_scores_match_torch(stream_sized):
    ckpt, folder, model = stream_sized
    with StreamGuard(folder, Manifest.read(folder), "f16") as guard:
        tokens, end = guard.prompt_tokens("How do I bake bread?")
        response = guard.vocab.tokenize("Mix flour, water and salt; knead, rise, bake at 230°C.")
        expected = oracle.stream_logits(model, tokens + response)
        with guard.session("How do I bake bread?") as session:
            verdicts = session.feed(response)
        names = guard.manifest.labels["response_risk_level"]
    want = _softmax(expected["response_risk"][len(tokens):])[..., [names.index(k) for k in LABELS]]
    got = np.array([[v.scores[k] for k in LABELS] for v in verdicts])
    assert np.abs(got - want).max() < SCORE_TOL


def test_two_shard_copy_converts_to_exactly_the_single_file_result(gen_ckpt, tmp_path):
    sharded = reshard(gen_ckpt, tmp_path / "sharded", 2)
    assert len(list(sharded.glob("model-*.safetensors"))) == 2
    outs = []
    for src in (gen_ckpt, sharded):
        out = tmp_path / f"out-{src.name}"
        convert(src, out, ConvertOptions(quants=("f16", "q8_0"), name="same"))
        outs.append(out)
    for quant in ("f16", "q8_0"):
        assert gguf(outs[0], quant).read_bytes() == gguf(outs[1], quant).read_bytes(), quant


@pytest.mark.parametrize("damage", ["tensor in another shard", "tensor twice", "listed but absent",
                                    "shard missing"])
def test_inconsistent_shards_are_refused(gen_ckpt, tmp_path, damage):
    sharded = reshard(gen_ckpt, tmp_path / "sharded", 2)
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = sorted(set(index["weight_map"].values()))
    if damage == "tensor in another shard":
        index["weight_map"]["model.norm.weight"] = first if index["weight_map"]["model.norm.weight"] == second \
            else second
    elif damage == "tensor twice":
        shutil.copyfile(sharded / second, sharded / "extra.safetensors")
        index["weight_map"]["lm_head.weight"] = "extra.safetensors"
    elif damage == "listed but absent":
        index["weight_map"]["model.layers.99.mlp.up_proj.weight"] = first
    else:
        (sharded / second).unlink()
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError):
        load_checkpoint(sharded)


@pytest.mark.parametrize("kind", ["gen", "stream"])
@pytest.mark.parametrize("size", SIZES)
def test_sizing_predicts_the_converted_files(kind, size):
    """edgeguard.models.sizing, from the config alone, against the files conversion wrote."""
    ckpt = build_sized_checkpoint(kind, size)
    folder = converted(ckpt, QUANTS)
    shape = ModelShape.from_config(json.loads((ckpt / "config.json").read_text()))
    manifest = Manifest.read(folder)
    extra = sum(e["size"] for e in manifest.files.values() if e.get("role") != "model")
    for quant in QUANTS:
        actual = (folder / manifest.file_for("model", quant)).stat().st_size + extra
        predicted = footprint(shape, kind, quant).disk_bytes
        assert abs(predicted - actual) <= 0.01 * actual, (quant, predicted, actual)


def test_stored_lm_head_copy_is_not_written_twice(gen_ckpt, tmp_path):
    """A tied Gen checkpoint that also stores lm_head as an exact copy of the embedding
    converts to the same GGUF as one without it."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "with-copy"
    shutil.copytree(gen_ckpt, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    outs = [convert(src, tmp_path / f"out-{i}", ConvertOptions(quants=("f16",), name="same"))
            for i, src in enumerate((gen_ckpt, copy))]
    assert outs[0].files[next(iter(outs[0].files))]["sha256"] == outs[1].files[next(iter(outs[1].files))]["sha256"]
    assert "output.weight" not in _tensor_names(gguf(tmp_path / "out-1", "f16"))


def test_stored_lm_head_that_differs_is_the_projection(tmp_path):
    """Tied in config.json, but a stored lm_head with its own values: transformers projects with
    it, and so does the converted model."""
    ckpt = build_sized_checkpoint("gen", "4b-shaped", shards=1, lm_head=True)
    folder = tmp_path / "out"
    convert(ckpt, folder, ConvertOptions(quants=("f16",)))
    assert "output.weight" in _tensor_names(gguf(folder, "f16"))
    model = oracle.load_torch(ckpt)
    ids = hf_ids(ckpt, TEXT)
    expected = oracle.next_token_logits(model, ids)
    with Backend(gguf(folder, "f16"), n_ctx=256, mode="logits") as be:
        got = be.eval(ids, outputs=range(len(ids)))
    assert rel_err(got, expected) < TOLERANCE["f16"]


def test_stream_ignores_a_stored_lm_head(tmp_path):
    ckpt = build_sized_checkpoint("stream", "8b-shaped", shards=1, lm_head=True)
    assert "lm_head.weight" in load_checkpoint(ckpt).tensors
    folder = tmp_path / "out"
    convert(ckpt, folder, ConvertOptions(quants=("f16",)))
    assert "output.weight" not in _tensor_names(gguf(folder, "f16"))
