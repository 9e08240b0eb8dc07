"""Exit codes are the documented ones with and without --debug; a bug exits 3, never 1
("flagged"); Ctrl-C exits 130. --debug only adds the traceback."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from edgeguard.cli import commands as cli
from edgeguard.cli import main
from tests.fixtures.converted import converted


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "cache"))


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_usage_error_exits_2_with_or_without_debug(debug):
    result = run(*debug, "check", "")
    assert result.exit_code == 2, result.output
    assert "empty" in result.output
    assert ("Traceback" in result.output) == bool(debug)


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_truncated_model_exits_3_with_or_without_debug(gen_ckpt, tmp_path, debug):
    folder = tmp_path / "m"
    shutil.copytree(converted(gen_ckpt, ("f16",)), folder)
    gguf = next(folder.glob("*-f16.gguf"))
    gguf.write_bytes(gguf.read_bytes()[:1000])
    result = run(*debug, "check", "hello", "--model", str(folder))
    assert result.exit_code == 3, result.output
    assert "corrupted or incomplete" in result.output
    assert ("Traceback" in result.output) == bool(debug)


class Bug(Exception):
    pass


def broken(*args, **kwargs):
    raise Bug("something nobody expected")


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_unexpected_exception_exits_3_in_one_line(monkeypatch, debug):
    monkeypatch.setattr(cli, "_read_text", broken)
    result = run(*debug, "check", "hello")
    assert result.exit_code == 3, result.output
    assert "unexpected Bug: something nobody expected" in result.output
    if debug:
        assert "Traceback" in result.output
    else:
        assert "Traceback" not in result.output
        assert result.output.strip().count("\n") == 0  # one line


def test_unexpected_exception_in_a_command_without_handle_errors_exits_3(monkeypatch):
    """The group maps exceptions too, so a command that forgets the decorator still exits 3."""

    @main.command("explode-for-test")
    def explode():
        raise Bug("boom")

    try:
        result = run("explode-for-test")
    finally:
        main.commands.pop("explode-for-test")
    assert result.exit_code == 3 and "unexpected Bug: boom" in result.output
    assert "Traceback" not in result.output


def test_keyboard_interrupt_exits_130(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_read_text", interrupted)
    result = run("check", "hello")
    assert result.exit_code == 130 and "interrupted" in result.output


def test_os_error_exits_3_with_the_path(monkeypatch, tmp_path):
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "secret"))

    monkeypatch.setattr(cli, "_read_text", unreadable)
    result = run("check", "hello")
    assert result.exit_code == 3
    assert "Permission denied" in result.output and str(tmp_path / "secret") in result.output
