import pickle
from pathlib import Path

import pytest

from edgeguard.errors import UsageError
from edgeguard.models import registry
from edgeguard.models.registry import ModelSpec, default_model, load_registry

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "419364a715de9840d47b1457982f64ff37f90ed4"


@pytest.fixture(autouse=True)
def no_user_file(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEGUARD_MODELS", raising=False)
    monkeypatch.setattr(registry, "config_dir", lambda: tmp_path / "config")


def spec(**overrides):
    args = dict(name="m", kind="gen", repo="Qwen/X", revision=COMMIT,
                files=["config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json"],
                default_quant="q4_k_m", context_length=8192, license="Apache-2.0")
    args.update(overrides)
    return ModelSpec(**args)


def test_packaged_registry():
    models = load_registry()
    gen, stream = models["gen-0.6b"], models["stream-0.6b"]
    assert (gen.kind, gen.repo) == ("gen", "Qwen/Qwen3Guard-Gen-0.6B")
    assert (stream.kind, stream.repo, stream.revision) == (
        "stream", "Qwen/Qwen3Guard-Stream-0.6B", COMMIT)
    assert stream.pinned
    for model in (gen, stream):
        assert model.default_quant == "q4_k_m" and model.context_length == 8192
        assert model.license == "Apache-2.0" and model.description
        assert {"config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"} <= set(model.files)
    assert default_model() is not None and default_model().name == "gen-0.6b"
    assert default_model("stream").name == "stream-0.6b"
    with pytest.raises(UsageError):
        default_model("classifier")


def test_the_packaged_registry_is_the_top_level_file():
    """A copy, not a symlink: a checkout on Windows without symlink rights would turn a link into
    a text file holding its target's name. The two files must stay byte-equal."""
    packaged = ROOT / "edgeguard" / "models.toml"
    assert not packaged.is_symlink()
    assert packaged.read_bytes() == (ROOT / "models.toml").read_bytes()
    assert registry.packaged_registry_path().resolve() == packaged.resolve()


def test_spec_is_frozen_and_normalized():
    s = spec(files=["config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json"], sha256={"config.json": "A" * 64})
    assert isinstance(s.files, tuple)
    assert s.sha256 == {"config.json": "a" * 64}
    with pytest.raises(TypeError):
        s.sha256["config.json"] = "b" * 64
    with pytest.raises(Exception):
        s.revision = "main"
    assert pickle.loads(pickle.dumps(s)) == s
    assert not spec(revision="main").pinned


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(name="Gen Model"), "name"),
        (dict(kind="classifier"), "kind"),
        (dict(repo="no-owner"), "repo"),
        (dict(revision=""), "revision"),
        (dict(files=["config.json", "tokenizer.json", "tokenizer_config.json"]), "files"),
        (dict(files=["config.json", "model.safetensors", "tokenizer.json"]), "files"),
        (dict(files=["../config.json"]), "files"),
        (dict(files="config.json"), "files"),
        (dict(default_quant="q3"), "default_quant"),
        (dict(context_length=0), "context_length"),
        (dict(context_length=True), "context_length"),
        (dict(license=""), "license"),
        (dict(sha256={"README.md": "a" * 64}), "sha256"),
        (dict(sha256={"config.json": "abc"}), "sha256"),
    ],
)
def test_spec_validation_names_the_field(overrides, field):
    with pytest.raises(UsageError, match=field):
        spec(**overrides)


USER = f"""
["gen-0.6b"]
kind = "gen"
repo = "Me/My-Gen"
revision = "{"b" * 40}"
files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
default_quant = "q8_0"
context_length = 4096
license = "MIT"

[mine]
kind = "stream"
repo = "Me/My-Stream"
revision = "{COMMIT}"
files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
default_quant = "f16"
context_length = 2048
license = "Apache-2.0"
description = "mine"
[mine.sha256]
"config.json" = "{"c" * 64}"
"""


def test_user_file_overrides_and_adds(tmp_path, monkeypatch):
    user = tmp_path / "user.toml"
    user.write_text(USER)
    monkeypatch.setenv("EDGEGUARD_MODELS", str(user))
    models = load_registry()
    assert models["gen-0.6b"].repo == "Me/My-Gen"  # replaced as a whole
    assert models["gen-0.6b"].description == ""
    assert models["mine"].sha256 == {"config.json": "c" * 64}
    assert models["stream-0.6b"].revision == COMMIT  # untouched
    assert default_model("gen", models).repo == "Me/My-Gen"


def test_user_file_in_config_dir(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "models.toml").write_text(USER)
    assert "mine" in load_registry()


def test_missing_env_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGUARD_MODELS", str(tmp_path / "nope.toml"))
    with pytest.raises(UsageError, match="nope.toml"):
        load_registry()


def test_explicit_paths(tmp_path):
    user = tmp_path / "user.toml"
    user.write_text(USER)
    assert set(load_registry([user])) == {"gen-0.6b", "mine"}


@pytest.mark.parametrize(
    "text, words",
    [
        ("[a\n", ["malformed TOML"]),
        ('a = 1\n', ["[a]", "table"]),
        (USER.replace('license = "MIT"', 'licence = "MIT"'), ["[gen-0.6b]", "'licence'"]),
        (USER.replace('context_length = 2048\n', ''), ["[mine]", "'context_length'"]),
        (USER.replace('"f16"', '"q2"'), ["[mine]", "default_quant", "'q2'"]),
        (USER.replace('kind = "stream"', 'kind = "guard"'), ["[mine]", "kind"]),
    ],
)
def test_file_errors_name_file_entry_and_field(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_registry([path])
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_sha256_digest_must_be_hex(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(USER.replace("c" * 64, "xyz"))
    with pytest.raises(UsageError, match=r"bad.toml: \[mine\] .*sha256"):
        load_registry([path])


def test_default_of_wrong_kind(tmp_path):
    path = tmp_path / "user.toml"
    path.write_text(USER.replace("[mine]", '["stream-0.6b"]').replace("[mine.sha256]",
                                                                      '["stream-0.6b".sha256]'))
    models = load_registry([registry.packaged_registry_path(), path])
    assert default_model("stream", models).repo == "Me/My-Stream"
    models = load_registry([path])
    with pytest.raises(UsageError, match="unknown model 'stream-0.6b'|kind"):
        default_model("gen", {"gen-0.6b": models["stream-0.6b"]})


# Public config.json facts of the backbones: hidden, layers, heads, kv_heads, head_dim, ffn, tied.
FAMILY = {
    "0.6b": (1024, 28, 16, 8, 128, 3072, True),
    "4b": (2560, 36, 32, 8, 128, 9728, True),
    "8b": (4096, 36, 32, 8, 128, 12288, False),
}


@pytest.mark.parametrize("kind", ["gen", "stream"])
@pytest.mark.parametrize("size", sorted(FAMILY))
def test_the_whole_family_is_registered(kind, size):
    model = load_registry()[f"{kind}-{size}"]
    variant = "Gen" if kind == "gen" else "Stream"
    assert (model.kind, model.repo) == (kind, f"Qwen/Qwen3Guard-{variant}-{size.upper()}")
    assert model.license == "Apache-2.0" and model.default_quant == "q4_k_m"
    assert model.context_length == 8192 and model.description
    assert model.pinned or model.revision == "main"
    sharded = size != "0.6b"
    assert ("model.safetensors.index.json" in model.files) == sharded
    assert ("model.safetensors" in model.files) == (not sharded)
    hidden, layers, heads, kv_heads, head_dim, ffn, tied = FAMILY[size]
    shape = model.shape
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn, shape.tied) == (
        hidden, layers, heads, kv_heads, head_dim, ffn, tied)
    assert shape.vocab == 151936
    assert (shape.guard_inner > 0) == (kind == "stream")


def test_unpinned_entries_say_so_in_the_file():
    text = (ROOT / "models.toml").read_text()
    unpinned = [name for name, model in load_registry().items() if not model.pinned]
    assert unpinned and "UNPINNED" in text
    for name in unpinned:
        start = text.index(f'["{name}"]\n')
        entry = text[start:text.index('\n["', start)]
        assert "UNPINNED" in entry, name


def test_published_parameter_counts_follow_from_the_shapes():
    models = load_registry()
    billions = {name: models[name].shape.params(models[name].kind) / 1e9 for name in models}
    assert 0.59 < billions["gen-0.6b"] < 0.61
    assert 4.0 < billions["gen-4b"] < 4.05  # Qwen3-4B: 4.0B
    assert 8.15 < billions["gen-8b"] < 8.25  # Qwen3-8B: 8.2B, with its own lm_head
    assert billions["stream-8b"] < billions["gen-8b"]  # no lm_head in the guard model


def test_footprint_grows_with_size_and_bits():
    models = load_registry()
    for kind in ("gen", "stream"):
        small, mid, large = (models[f"{kind}-{s}"].footprint() for s in ("0.6b", "4b", "8b"))
        assert small.disk_bytes < mid.disk_bytes < large.disk_bytes
        assert small.ram_bytes < mid.ram_bytes < large.ram_bytes
        q4, q8 = models[f"{kind}-4b"].footprint("q4_k_m"), models[f"{kind}-4b"].footprint("q8_0")
        assert q4.disk_bytes < q8.disk_bytes


def test_entry_without_shape_has_no_footprint():
    assert spec().footprint() is None


@pytest.mark.parametrize("shape, words", [
    ({"hidden": 8}, "missing field"),
    ({**dict.fromkeys(("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab"), 4), "width": 2},
     "unknown field 'width'"),
    ({**dict.fromkeys(("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab"), 4), "layers": 0},
     "layers"),
    ({**dict.fromkeys(("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab"), 4), "tied": "yes"},
     "tied"),
    ("big", "shape"),
])
def test_shape_validation(shape, words):
    with pytest.raises(UsageError, match=words):
        spec(shape=shape)


def test_stream_shape_needs_the_heads_width(tmp_path):
    path = tmp_path / "user.toml"
    path.write_text(USER + "[mine.shape]\nhidden = 8\nlayers = 1\nheads = 2\nkv_heads = 1\nhead_dim = 4\n"
                    "ffn = 16\nvocab = 32\n")
    with pytest.raises(UsageError, match=r"\[mine\] .*guard_inner"):
        load_registry([path])
    path.write_text(path.read_text() + "guard_inner = 4\n")
    assert load_registry([path])["mine"].footprint().disk_bytes > 0


def test_sharded_entry_needs_weights_or_index():
    files = ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
    assert spec(files=files).files == tuple(files)
    with pytest.raises(UsageError, match="index"):
        spec(files=files[:1] + files[2:])


def test_sharded_entry_may_pin_shard_digests():
    files = ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
    assert spec(files=files, sha256={"model-00001-of-00002.safetensors": "a" * 64}).sha256
    with pytest.raises(UsageError, match="sha256"):
        spec(sha256={"model-00001-of-00002.safetensors": "a" * 64})  # not sharded
