"""From an empty store to a verdict: pull from the Hugging Face cache (offline) and from a local
stand-in for the Hub (network path through huggingface_hub), verify, remove, default model."""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from edgeguard.cli import main
from tests.test_hub import COMMIT, REPO, FakeHub, build_cache

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def fixture_files(ckpt):
    return {name: (ckpt / name).read_bytes() for name in FILES}


def user_registry(tmp_path, monkeypatch, name: str, revision: str, files) -> None:
    """A user registry with one Gen entry served by the test hub, and an empty edgeguard cache."""
    toml = tmp_path / "models.toml"
    toml.write_text(f"""
["{name}"]
kind = "gen"
repo = "{REPO}"
revision = "{revision}"
files = {json.dumps(list(files))}
default_quant = "q8_0"
context_length = 4096
license = "Apache-2.0"
""")
    monkeypatch.setenv("EDGEGUARD_MODELS", str(toml))
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A user registry whose default Gen model is the fixture, and an empty edgeguard cache."""
    user_registry(tmp_path, monkeypatch, "gen-0.6b", COMMIT, FILES)
    return tmp_path


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_offline_pull_check_verify_rm(registry, gen_ckpt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("check", "hello", "--json")
    assert result.exit_code == 3
    assert "edgeguard pull gen-0.6b" in result.output and "Traceback" not in result.output

    build_cache(registry / "hf", fixture_files(gen_ckpt))
    result = run("pull", "gen-0.6b")
    assert result.exit_code == 0, result.output
    folder = registry / "store" / "models" / "gen-0.6b-q8_0"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["revision"] == COMMIT and manifest["quants"] == ["q8_0"]

    result = run("check", "hello", "--json")  # no --model: the default, now pulled
    assert result.exit_code in (0, 1), result.output
    assert json.loads(result.stdout)["model"] == "gen-0.6b"

    listing = json.loads(run("models", "--json").stdout)
    entry = next(row for row in listing if row["name"] == "gen-0.6b")
    assert [p["quant"] for p in entry["pulled"]] == ["q8_0"]
    assert run("verify", "gen-0.6b").exit_code == 0

    gguf = folder / "gen-0.6b-q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 0xFF  # same size, different content: only the hash can tell
    gguf.write_bytes(bytes(data))
    result = run("verify", "gen-0.6b")
    assert result.exit_code == 3 and "edgeguard rm gen-0.6b && edgeguard pull gen-0.6b" in result.output

    gguf.write_bytes(bytes(data[:-10]))  # truncated: caught at load by its size
    result = run("check", "hello")
    assert result.exit_code == 3 and "repair with: edgeguard rm gen-0.6b && edgeguard pull gen-0.6b" in result.output

    assert run("rm", "gen-0.6b").exit_code == 0
    assert not folder.exists()
    assert run("rm", "gen-0.6b").exit_code == 2


def test_interrupted_pull_leaves_nothing_that_loads(registry, gen_ckpt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build_cache(registry / "hf", fixture_files(gen_ckpt))
    import edgeguard_convert.pipeline as pipeline

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "quantize", boom)
    result = run("pull", "gen-0.6b")
    assert result.exit_code == 130
    models = registry / "store" / "models"
    assert not models.exists() or list(models.iterdir()) == []


@pytest.fixture
def hub_server(registry, gen_ckpt, monkeypatch):
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported with HF_HUB_OFFLINE set")

    class FixtureHub(FakeHub):
        files = fixture_files(gen_ckpt)
        requests = []

    server = ThreadingHTTPServer(("127.0.0.1", 0), FixtureHub)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield FixtureHub
    server.shutdown()
    server.server_close()


def test_network_pull_then_check(hub_server):
    result = run("pull", "gen-0.6b")
    assert result.exit_code == 0, result.output
    assert any(path.endswith("model.safetensors") for _, path in hub_server.requests)
    result = run("check", "hello", "--model", "gen-0.6b", "--json")
    assert result.exit_code in (0, 1), result.output


def test_convert_from_a_hub_repo_id(hub_server, tmp_path):
    out = tmp_path / "converted"
    result = run("convert", REPO, "--out", str(out), "--quant", "q8_0")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"repo": REPO, "revision": COMMIT}
    assert manifest["name"] == REPO.split("/")[-1].lower()
    assert list(manifest["files"]) == [f"{manifest['name']}-q8_0.gguf"]


SHARDED_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def sharded(tmp_path, monkeypatch):
    """gen-4b as registered (files with the shard index), served by the 4B-shaped fixture."""
    from tests.fixtures.checkpoints import build_sized_checkpoint

    ckpt = build_sized_checkpoint("gen", "4b-shaped")
    files = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.name != "generation_config.json"}
    assert len([n for n in files if n.startswith("model-")]) == 2
    user_registry(tmp_path, monkeypatch, "gen-4b", "main", SHARDED_FILES)
    return tmp_path, files


@pytest.mark.slow
def test_sharded_pull_offline_then_check(sharded, monkeypatch):
    tmp_path, files = sharded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("pull", "gen-4b")
    assert result.exit_code == 3 and "edgeguard pull gen-4b" in result.output
    _, snapshot = build_cache(tmp_path / "hf", files)
    shard = next(n for n in files if n.startswith("model-00002"))
    (snapshot / shard).unlink()  # a shard the index names is missing: offline, nothing to do
    result = run("pull", "gen-4b")
    assert result.exit_code == 3 and "edgeguard pull gen-4b" in result.output and "offline" in result.output
    build_cache(tmp_path / "hf", {shard: files[shard]})
    result = run("pull", "gen-4b")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "store" / "models" / "gen-4b-q8_0" / "manifest.json").read_text())
    assert manifest["source"]["revision"] == COMMIT and manifest["hidden_size"] == 320
    result = run("check", "hello", "--model", "gen-4b", "--json")
    assert result.exit_code in (0, 1), result.output
    assert run("verify", "gen-4b").exit_code == 0


@pytest.mark.slow
def test_sharded_pull_from_the_hub_fetches_every_shard(sharded, monkeypatch):
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported with HF_HUB_OFFLINE set")
    tmp_path, files = sharded

    class ShardedHub(FakeHub):
        requests = []

    ShardedHub.files = files
    server = ThreadingHTTPServer(("127.0.0.1", 0), ShardedHub)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    try:
        result = run("pull", "gen-4b")
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.output
    fetched = {path.rsplit("/", 1)[-1] for method, path in ShardedHub.requests if method == "GET"}
    assert {n for n in files if n.startswith("model-")} <= fetched
    folder = tmp_path / "store" / "models" / "gen-4b-q8_0"
    assert json.loads((folder / "manifest.json").read_text())["source"]["revision"] == COMMIT
