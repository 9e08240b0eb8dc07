"""Damaged cache files are cache misses, never different verdicts.

Every persisted cache file carries a sha256 of its whole content. The tests flip bytes at the
start (header), in the middle and at the end of a real cache file and expect: the same verdict
as an undamaged run, exactly one warning, and the file rewritten to its undamaged bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from edgeguard.engines.gen import GenGuard, GenOptions
from edgeguard.errors import IntegrityError
from edgeguard.models import store
from edgeguard.models.manifest import MANIFEST_NAME, Manifest
from tests.fixtures.converted import converted

PROMPT = "How do I bake bread at home?"


@pytest.fixture(scope="module")
def gen_dir(gen_ckpt):
    return converted(gen_ckpt, ("f16",))


def check(gen_dir: Path, prefix_cache: Path):
    with GenGuard(gen_dir, Manifest.read(gen_dir), "f16", options=GenOptions(prefix_cache=prefix_cache)) as g:
        return g.check(PROMPT)


def flipped(data: bytes, offset: int, width: int) -> bytes:
    damaged = bytearray(data)
    for i in range(offset, min(offset + width, len(data))):
        damaged[i] ^= 0xFF
    return bytes(damaged)


def warnings_about(caplog, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and word in r.getMessage()]


@pytest.fixture(scope="module")
def reference(gen_dir, tmp_path_factory):
    """The verdict without any cache, and the prefix file an undamaged run writes."""
    uncached = GenGuard(gen_dir, Manifest.read(gen_dir), "f16", options=GenOptions(prefix_cache=None))
    with uncached as g:
        verdict = g.check(PROMPT)
    cache = tmp_path_factory.mktemp("prefix")
    assert check(gen_dir, cache).to_dict() == verdict.to_dict()
    (kv,) = cache.glob("prefix-*.kv")
    return verdict, kv.name, kv.read_bytes()


@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_damaged_prefix_cache_is_recomputed_and_rewritten(gen_dir, reference, tmp_path, caplog, where):
    verdict, name, good = reference
    offset = {"header": 50, "middle": len(good) // 2, "end": len(good) - 64}[where]
    (tmp_path / name).write_bytes(flipped(good, offset, 64))
    with caplog.at_level(logging.WARNING):
        again = check(gen_dir, tmp_path)
    assert again.to_dict() == verdict.to_dict()
    assert len(warnings_about(caplog, "prefix cache")) == 1
    assert (tmp_path / name).read_bytes() == good  # rewritten, so later runs hit the cache again
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert check(gen_dir, tmp_path).to_dict() == verdict.to_dict()
    assert warnings_about(caplog, "prefix cache") == []


def test_truncated_prefix_cache_is_a_miss(gen_dir, reference, tmp_path):
    verdict, name, good = reference
    (tmp_path / name).write_bytes(good[: len(good) // 3])
    assert check(gen_dir, tmp_path).to_dict() == verdict.to_dict()
    assert (tmp_path / name).read_bytes() == good


# -- manifests ------------------------------------------------------------------------------
def test_manifest_carries_a_checksum_that_read_verifies(gen_dir, tmp_path):
    Manifest.read(gen_dir).write(tmp_path)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert len(data["manifest_sha256"]) == 64
    assert Manifest.read(tmp_path) == Manifest.read(gen_dir)
    data["context_length"] += 1  # valid JSON, plausible value: only the checksum can tell
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="checksum"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_damaged_manifest_in_the_store_is_converted_again(gen_ckpt, tmp_path, monkeypatch, caplog, where):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path))
    folder = store.converted_checkpoint(gen_ckpt, "f16")
    good = (folder / MANIFEST_NAME).read_bytes()
    offset = {"start": 20, "middle": len(good) // 2, "end": len(good) - 4}[where]
    damaged = bytearray(good)
    damaged[offset] ^= 0x01  # one bit: often still valid JSON
    (folder / MANIFEST_NAME).write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        again = store.converted_checkpoint(gen_ckpt, "f16")
    assert again == folder
    assert len(warnings_about(caplog, "damaged manifest")) == 1
    assert Manifest.read(folder).verify(folder) == []
    assert json.loads((folder / MANIFEST_NAME).read_text())["files"] == json.loads(good)["files"]
