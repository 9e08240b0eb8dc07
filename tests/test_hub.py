"""hub.py against real Hugging Face cache layouts and a local stand-in for the Hub's HTTP API."""

import hashlib
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from huggingface_hub import constants, scan_cache_dir

from edgeguard.errors import IntegrityError, ModelError
from edgeguard.models import hub
from edgeguard.models.registry import ModelSpec

COMMIT = "419364a715de9840d47b1457982f64ff37f90ed4"
REPO = "Qwen/Tiny-Guard"
FILES = {
    "config.json": b'{"model_type": "qwen3"}',
    "model.safetensors": os.urandom(3000),
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"chat_template": ""}',
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec(revision=COMMIT, sha256=None, files=tuple(FILES), name="tiny"):
    return ModelSpec(name=name, kind="stream", repo=REPO, revision=revision, files=files,
                     default_quant="q4_k_m", context_length=8192, license="Apache-2.0",
                     sha256=sha256 or {})


def build_cache(cache: Path, files=FILES, commit=COMMIT, ref="main"):
    """The hub's own layout: blobs named by content hash, snapshot entries as relative links."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / sha(data)
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo, snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_layout_is_what_huggingface_hub_reads(offline_cache):
    build_cache(offline_cache)
    info = scan_cache_dir(offline_cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == {"main"}
    assert {f.file_name for f in revision.files} == set(FILES)


def test_offline_pinned_commit(offline_cache):
    _, snapshot = build_cache(offline_cache)
    digests = {name: sha(data) for name, data in FILES.items()}
    folder, commit = hub.fetch_checkpoint(spec(sha256=digests), progress=False)
    assert (folder, commit) == (snapshot, COMMIT)
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]


def test_offline_branch_resolves_through_refs(offline_cache):
    other = "a" * 40
    build_cache(offline_cache, commit=other, ref="release")
    folder, commit = hub.fetch_checkpoint(spec(revision="release"))
    assert commit == other and folder.name == other


def test_sha256_mismatch(offline_cache):
    build_cache(offline_cache)
    bad = spec(sha256={"config.json": sha(FILES["config.json"]),
                       "model.safetensors": "0" * 64})
    with pytest.raises(IntegrityError, match="model.safetensors") as info:
        hub.fetch_checkpoint(bad)
    assert "edgeguard pull tiny" in str(info.value)


@pytest.mark.parametrize("damage", ["nothing cached", "file missing", "blob missing",
                                    "other commit"])
def test_offline_and_not_cached_says_what_to_run(offline_cache, damage):
    if damage != "nothing cached":
        repo, snapshot = build_cache(offline_cache, commit="b" * 40 if damage == "other commit"
                                     else COMMIT)
        if damage == "file missing":
            (snapshot / "tokenizer.json").unlink()
        if damage == "blob missing":
            (repo / "blobs" / sha(FILES["model.safetensors"])).unlink()
    with pytest.raises(ModelError) as info:
        hub.fetch_checkpoint(spec(), progress=False)
    message = str(info.value)
    assert "edgeguard pull tiny" in message and "offline" in message


def test_explicit_offline_wins_over_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelError, match="edgeguard pull tiny"):
        hub.fetch_checkpoint(spec(), offline=True, hf_cache=tmp_path / "empty")


def test_sha256_file_streams(tmp_path):
    data = os.urandom(5000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert hub.sha256_file(path, chunk_size=1024) == sha(data)
    assert hub.sha256_file(path) == sha(data)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert hub.sha256_file(empty) == sha(b"")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EDGEGUARD_CACHE_DIR")
    assert "tmp" not in hub.cache_dir().parts[:2]


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="checks the Linux (XDG) cache-folder rules; other platforms have their own")
def test_cache_dir_follows_xdg_on_linux(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEGUARD_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "edgeguard"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert hub.cache_dir() == tmp_path / "x" / "edgeguard"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec says: ignore it
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "edgeguard"


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub endpoints snapshot_download uses: revision info, tree listing, resolve."""

    files: dict = FILES
    commit = COMMIT
    requests: list = []

    def log_message(self, *args):
        pass

    def _send(self, status, body=b"", headers=None, head=False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _handle(self, head):
        path = unquote(urlparse(self.path).path)
        self.requests.append((self.command, path))
        api = f"/api/models/{REPO}"
        revision = path.split("/")[6] if path.startswith(f"{api}/") else "main"
        if path.startswith(f"/{REPO}/resolve/"):
            revision = path.split("/")[4]
        if revision not in (self.commit, "main"):
            return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, head=head)
        if path.startswith(f"{api}/revision/") or path == api:
            body = {"id": REPO, "sha": self.commit,
                    "siblings": [{"rfilename": name} for name in self.files]}
            return self._send(200, json.dumps(body).encode(), head=head)
        if path.startswith(f"{api}/tree/"):
            tree = [{"type": "file", "path": name, "size": len(data),
                     "oid": hashlib.sha1(data).hexdigest()} for name, data in self.files.items()]
            return self._send(200, json.dumps(tree).encode(),
                              {"Content-Type": "application/json"}, head=head)
        prefix = f"/{REPO}/resolve/"
        if path.startswith(prefix):
            _, name = path[len(prefix):].split("/", 1)
            if name in self.files:
                data = self.files[name]
                headers = {"X-Repo-Commit": self.commit, "ETag": f'"{sha(data)}"'}
                return self._send(200, data, headers, head=head)
        self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, head=head)

    def do_GET(self):
        self._handle(head=False)

    def do_HEAD(self):
        self._handle(head=True)


@pytest.fixture
def online(tmp_path, monkeypatch):
    if constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported with HF_HUB_OFFLINE set")
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    FakeHub.requests = []
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield tmp_path / "hf"
    server.shutdown()
    server.server_close()


def test_download_then_cache_first(online):
    digests = {name: sha(data) for name, data in FILES.items()}
    folder, commit = hub.fetch_checkpoint(spec(sha256=digests), progress=False)
    assert commit == COMMIT and folder == online / "models--Qwen--Tiny-Guard" / "snapshots" / COMMIT
    for name, data in FILES.items():
        assert (folder / name).read_bytes() == data
    assert any(path.endswith("/model.safetensors") for _, path in FakeHub.requests)
    # now cached: no request at all, even with the network allowed
    FakeHub.requests = []
    assert hub.fetch_checkpoint(spec(), progress=False) == (folder, COMMIT)
    assert FakeHub.requests == []


def test_download_of_a_branch_resolves_the_commit(online):
    folder, commit = hub.fetch_checkpoint(spec(revision="main"), progress=False)
    assert commit == COMMIT
    assert (online / "models--Qwen--Tiny-Guard" / "refs" / "main").read_text() == COMMIT


def test_download_of_a_file_the_repo_lacks(online):
    wanted = tuple(FILES) + ("merges.txt",)
    with pytest.raises(ModelError, match="merges.txt"):
        hub.fetch_checkpoint(spec(files=wanted))


def test_download_then_integrity_error(online):
    with pytest.raises(IntegrityError):
        hub.fetch_checkpoint(spec(sha256={"config.json": "1" * 64}), progress=False)



def test_download_of_an_unknown_revision(online):
    with pytest.raises(ModelError, match="has no revision"):
        hub.fetch_checkpoint(spec(revision="c" * 40), progress=False)


def test_download_repo_from_cache(offline_cache):
    build_cache(offline_cache)
    assert hub.download_repo(REPO) == (
        offline_cache / "models--Qwen--Tiny-Guard" / "snapshots" / COMMIT, COMMIT)
    with pytest.raises(ModelError, match="offline"):
        hub.download_repo(REPO, revision="v2")


def test_download_repo_online(online):
    folder, commit = hub.download_repo(REPO, progress=False)
    assert commit == COMMIT
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)


SHARDED = {
    "config.json": FILES["config.json"],
    "model.safetensors.index.json": json.dumps({"metadata": {"total_size": 5000}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode(),
    "model-00001-of-00002.safetensors": os.urandom(3000),
    "model-00002-of-00002.safetensors": os.urandom(2000),
    "tokenizer.json": FILES["tokenizer.json"],
    "tokenizer_config.json": FILES["tokenizer_config.json"],
}
SHARDED_SPEC_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")


def test_offline_sharded_checkpoint_takes_its_shards_from_the_index(offline_cache):
    _, snapshot = build_cache(offline_cache, SHARDED)
    index_sha = {"model.safetensors.index.json": sha(SHARDED["model.safetensors.index.json"])}
    folder, commit = hub.fetch_checkpoint(spec(files=SHARDED_SPEC_FILES, sha256=index_sha), progress=False)
    assert (folder, commit) == (snapshot, COMMIT)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (folder / name).read_bytes() == SHARDED[name]


def test_offline_sharded_checkpoint_missing_a_shard_says_what_to_run(offline_cache):
    _, snapshot = build_cache(offline_cache, SHARDED)
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError) as info:
        hub.fetch_checkpoint(spec(files=SHARDED_SPEC_FILES), progress=False)
    assert "edgeguard pull tiny" in str(info.value) and "offline" in str(info.value)


@pytest.mark.parametrize("index", [b"{", b'{"weight_map": {"a": "../x.safetensors"}}', b'{"weight_map": {}}',
                                   b'{"weight_map": {"a": "notes.txt"}}'])
def test_unusable_shard_index(offline_cache, index):
    build_cache(offline_cache, {**SHARDED, "model.safetensors.index.json": index})
    with pytest.raises(ModelError, match="model.safetensors.index.json"):
        hub.fetch_checkpoint(spec(files=SHARDED_SPEC_FILES), progress=False)


def test_download_of_a_sharded_checkpoint(online, monkeypatch):
    monkeypatch.setattr(FakeHub, "files", SHARDED)
    folder, commit = hub.fetch_checkpoint(spec(files=SHARDED_SPEC_FILES, revision="main"), progress=False)
    assert commit == COMMIT
    assert sorted(p.name for p in folder.iterdir()) == sorted(SHARDED)
    fetched = {path.rsplit("/", 1)[-1] for method, path in FakeHub.requests if method == "GET"}
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= fetched
    # now cached: no request at all
    FakeHub.requests = []
    assert hub.fetch_checkpoint(spec(files=SHARDED_SPEC_FILES), progress=False) == (folder, COMMIT)
    assert FakeHub.requests == []


def test_shard_digests_are_verified_after_the_shards_arrive(offline_cache):
    build_cache(offline_cache, SHARDED)
    shard = "model-00002-of-00002.safetensors"
    good = spec(files=SHARDED_SPEC_FILES, sha256={shard: sha(SHARDED[shard])})
    assert hub.fetch_checkpoint(good, progress=False)[1] == COMMIT
    with pytest.raises(IntegrityError, match=shard):
        hub.fetch_checkpoint(spec(files=SHARDED_SPEC_FILES, sha256={shard: "0" * 64}), progress=False)
    with pytest.raises(IntegrityError, match="does not name"):
        hub.fetch_checkpoint(spec(files=SHARDED_SPEC_FILES, sha256={"model-00009-of-00009.safetensors": "0" * 64}),
                             progress=False)
