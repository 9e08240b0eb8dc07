"""Shared pytest fixtures: cached tiny Qwen3Guard checkpoints with the real Qwen vocabulary."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import edgeguard  # noqa: E402,F401  (sets llama.cpp's read-once switches before any test runs it)
from tests.fixtures.checkpoints import build_checkpoint, real_qwen_vocab_dir  # noqa: E402


@pytest.fixture(scope="session")
def qwen_vocab_dir() -> Path:
    """Folder with ggml-vocab-qwen2.gguf and its .inp/.out tokenizer test vectors."""
    return real_qwen_vocab_dir()


@pytest.fixture(scope="session")
def gen_ckpt() -> Path:
    """Tiny Gen checkpoint (tied embeddings, non-square q_proj: 4x128 heads over hidden 256)."""
    return build_checkpoint("gen")


@pytest.fixture(scope="session")
def gen_ckpt_untied() -> Path:
    """Tiny Gen checkpoint with a separate lm_head.weight (8x64 heads over hidden 256, kv 2)."""
    return build_checkpoint("gen", hidden=256, heads=8, kv_heads=2, head_dim=64, tied=False,
                            seed=1)


@pytest.fixture(scope="session")
def stream_ckpt() -> Path:
    """Tiny Stream checkpoint (Qwen3ForGuardModel layout, guard_inner_size 64)."""
    return build_checkpoint("stream", seed=2)


# Markers by module, for the modules whose every test shares one trait (a module may add more
# with pytestmark or per test). The fast subset for daily work is `-m "not slow"`
# (docs/development.md).
_MODULE_MARKERS = {
    "test_server": ("server",),
    "test_server_stream": ("server",),
    "test_server_readme": ("server",),
    "test_ray": ("ray", "slow"),
    "test_ray_cluster": ("ray", "slow"),
    "test_convert": ("oracle",),
    "test_gen": ("oracle",),
    "test_stream": ("oracle",),
    "test_fixtures": ("oracle",),
    "test_end_to_end": ("oracle", "slow"),
    "test_trained": ("oracle", "slow"),
    "test_eval_fixtures": ("oracle", "slow"),
    "test_memory_budget": ("slow",),
    "test_device": ("slow",),  # a fresh process per import order
    "test_fuzz_cli": ("slow",),
    "test_fuzz_stream_text": ("slow",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in _MODULE_MARKERS.get(item.module.__name__.rpartition(".")[2], ()):
            item.add_marker(getattr(pytest.mark, name))
