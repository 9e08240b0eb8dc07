"""One version number (pyproject -> package metadata -> edgeguard.__version__ and --version);
runtime dependencies declared; a built wheel holds every module; user folders from platformdirs."""

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


def test_wheel_holds_every_module_and_data_file(tmp_path):
    """A regular (not editable) install gets every module: the wheel built from the sources
    holds each ``.py`` of edgeguard/ and convert/ (as edgeguard_convert/) and the package data."""
    import shutil
    import subprocess
    import zipfile

    repo = PYPROJECT.parent
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (repo / name).exists():
            shutil.copy(repo / name, src / name)
    for folder in ("edgeguard", "convert"):
        shutil.copytree(repo / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    import importlib.util

    # the environment's setuptools where it has one (a venv of Python >= 3.12 has none: pip
    # then fetches the build backend pyproject names)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                           "-w", str(tmp_path / "out"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "out").glob("edgeguard-*.whl")
    held = {n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("edgeguard-")}
    expected = {p.relative_to(src).as_posix() for p in (src / "edgeguard").rglob("*.py")}
    expected |= {"edgeguard_convert/" + p.relative_to(src / "convert").as_posix()
                 for p in (src / "convert").rglob("*.py")}
    expected |= {"edgeguard/models.toml", "edgeguard/py.typed"}
    expected |= {p.relative_to(src).as_posix() for p in (src / "edgeguard" / "server" / "static").iterdir()}
    assert sorted(expected - held) == []
