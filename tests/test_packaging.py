"""One version number (pyproject -> package metadata -> edgeguard.__version__ and --version);
runtime dependencies declared; user folders from platformdirs."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgeguard
from edgeguard.cli import main
from edgeguard.models import registry
from edgeguard.tomlfile import read_toml

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_one_version_number():
    declared = read_toml(PYPROJECT, "pyproject")["project"]["version"]
    assert edgeguard.__version__ == version("edgeguard") == declared
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and declared in result.output


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_runtime_dependencies_are_declared():
    project = read_toml(PYPROJECT, "pyproject")["project"]
    assert {"platformdirs", "tqdm", "huggingface-hub", "click"} <= names(project["dependencies"])
    assert "hypothesis" in names(project["optional-dependencies"]["test"])


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="checks the Linux (XDG) cache-folder rules; other platforms have their own")
def test_config_dir_follows_xdg_on_linux(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert registry.config_dir() == tmp_path / "home" / ".config" / "edgeguard"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert registry.config_dir() == tmp_path / "cfg" / "edgeguard"
