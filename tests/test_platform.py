"""edgeguard.platform on Linux with what Windows lacks taken away: no ``os.pread``/``os.preadv``/
``os.pwrite``, no ``fcntl``/``resource`` modules, ``ctypes.CDLL(None)`` raising TypeError, a
text-mode ``os.open`` (emulated), no stderr (a windowed app), a cp1252 stdout, a code page that
cannot spell the output path. The real stack runs under each; the oracle is the same command
with the platform's own calls in place."""

from __future__ import annotations

import ctypes
import io
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeguard.cli import main
from edgeguard.platform import console, files, locks, memory, net, paths, selfpython
from edgeguard.platform.builds import gpu_build_advice
from edgeguard.runtime.embedding_rows import EmbeddingRows
from tests.fixtures.converted import converted

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen_model(gen_ckpt):
    return str(converted(gen_ckpt, ("f16", "q8_0")))


@pytest.fixture(scope="module")
def stream_model(stream_ckpt):
    return str(converted(stream_ckpt, ("f16",)))


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def windows_apis(monkeypatch):
    """Take away the POSIX calls Windows lacks, for the rest of the test."""
    for name in ("pread", "preadv", "pwrite", "pwritev"):
        monkeypatch.delattr(os, name, raising=False)
    for name in ("fcntl", "resource"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    monkeypatch.setattr(locks, "fcntl", None)
    monkeypatch.setattr(locks, "msvcrt", None)
    real_cdll = ctypes.CDLL

    def cdll(name, *args, **kwargs):
        if name is None:
            raise TypeError("LoadLibrary() argument 1 must be str, not None")  # what Windows says
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    memory._malloc_trim.cache_clear()
    yield
    memory._malloc_trim.cache_clear()


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


# -- the seams one by one -------------------------------------------------------------------
def test_rows_without_pread_match_numpy_from_many_threads(tmp_path, windows_apis):
    table = np.random.default_rng(0).standard_normal((500, 48)).astype(np.float16)
    np.save(tmp_path / "embed.npy", table)
    rows = EmbeddingRows(tmp_path / "embed.npy")
    ids = [np.random.default_rng(seed).integers(0, 500, 200).tolist() for seed in range(8)]
    results: dict[int, np.ndarray] = {}

    def read(i):
        for _ in range(20):  # many interleaved seeks on one file: a race would mix rows
            results[i] = rows.rows(ids[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows.close()
    for i in range(8):
        np.testing.assert_array_equal(results[i], table[ids[i]].astype(np.float32))


def test_each_positioned_read_path_agrees(tmp_path, monkeypatch):
    table = np.arange(30 * 7, dtype=np.float32).reshape(30, 7)
    np.save(tmp_path / "t.npy", table)
    ids = [29, 0, 13, 13, 5]
    expected = table[ids]
    for missing in ((), ("preadv",), ("preadv", "pread")):
        for name in missing:
            monkeypatch.delattr(os, name, raising=False)
        with_rows = EmbeddingRows(tmp_path / "t.npy")
        np.testing.assert_array_equal(with_rows.rows(ids), expected, err_msg=str(missing))
        with_rows.close()


def test_malloc_trim_where_glibc_has_it(windows_apis):
    assert memory.trim_heap() is False  # CDLL(None) raised TypeError: a no-op, not a crash


def test_malloc_trim_runs_on_glibc():
    memory._malloc_trim.cache_clear()
    try:
        expected = hasattr(ctypes.CDLL(None), "malloc_trim") if sys.platform.startswith("linux") else False
        assert memory.trim_heap() is expected
    finally:
        memory._malloc_trim.cache_clear()


def test_freeze_startup_objects_collects_first_then_freezes():
    import gc
    import weakref

    class Node:
        pass

    garbage, kept = Node(), Node()
    garbage.me, kept.me = garbage, kept  # two cycles: one unreachable, one held
    dead = weakref.ref(garbage)
    del garbage
    before = gc.get_freeze_count()
    try:
        frozen = memory.freeze_startup_objects()
        assert dead() is None  # collected before the freeze, not kept forever
        assert frozen == gc.get_freeze_count() > before
        assert not any(o is kept for o in gc.get_objects())  # out of every generation's walk
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())


class _EmulatedMsvcrt:
    """msvcrt.locking's contract (a non-blocking lock of bytes at the file position, EACCES when
    another handle holds them), kept with flock, which also conflicts between two handles of
    one process."""

    LK_NBLCK, LK_UNLCK = 2, 0

    def __init__(self):
        import fcntl

        self._fcntl, self.positions = fcntl, []

    def locking(self, fd, mode, nbytes):
        self.positions.append(os.lseek(fd, 0, os.SEEK_CUR))
        try:
            self._fcntl.flock(fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(13, "Permission denied") from None


@pytest.mark.skipif(sys.platform == "win32", reason="the emulation is built on flock")
def test_msvcrt_lock_refuses_a_second_handle_and_keeps_the_position(tmp_path, monkeypatch):
    emulated = _EmulatedMsvcrt()
    monkeypatch.setattr(locks, "fcntl", None)
    monkeypatch.setattr(locks, "msvcrt", emulated)
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    with files.open_binary(path, os.O_RDWR) as first, files.open_binary(path, os.O_RDWR) as second:
        first.seek(4)
        assert locks.lock_exclusively(first.fileno()) == "msvcrt"
        assert os.lseek(first.fileno(), 0, os.SEEK_CUR) == 4  # the caller's position is kept
        with pytest.raises(locks.LockHeld):
            locks.lock_exclusively(second.fileno())
    assert emulated.positions == [locks.LOCK_OFFSET, locks.LOCK_OFFSET]  # never a byte of the data
    with files.open_binary(path, os.O_RDWR) as third:  # closed handles release the lock
        assert locks.lock_exclusively(third.fileno()) == "msvcrt"


def test_no_lock_at_all_still_scans(gen_model, tmp_path, windows_apis, caplog):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "id": i}) + "\n" for i in range(2)))
    with caplog.at_level("DEBUG", logger="edgeguard.scan.writer"):
        result = run("scan", src, "--out", tmp_path / "out.jsonl", "--model", gen_model, "--quant", "f16")
    assert result.exit_code in (0, 1), result.output
    assert "concurrent scans" in caplog.text


def test_exclusive_port(monkeypatch):
    first = socket.socket()
    net.own_port(first)
    first.bind(("127.0.0.1", 0))
    first.listen(1)
    second = socket.socket()
    try:
        assert net.own_port(second) == ("SO_EXCLUSIVEADDRUSE" if sys.platform == "win32" else "SO_REUSEADDR")
        with pytest.raises(OSError):
            second.bind(first.getsockname())
    finally:
        first.close()
        second.close()


def test_stop_signals_include_ctrl_break_where_it_exists():
    import signal

    names = {s.name for s in net.stop_signals()}
    assert {"SIGTERM", "SIGINT"} <= names
    assert ("SIGBREAK" in names) == hasattr(signal, "SIGBREAK")


def test_self_test_python_in_a_frozen_app(monkeypatch):
    monkeypatch.delenv(selfpython.PYTHON_ENV, raising=False)
    assert selfpython.self_test_python() == (sys.executable, "this Python")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    python, why = selfpython.self_test_python()
    assert python is None and selfpython.PYTHON_ENV in why and "frozen" in why
    monkeypatch.setenv(selfpython.PYTHON_ENV, "/opt/py/bin/python3")
    assert selfpython.self_test_python() == ("/opt/py/bin/python3", selfpython.PYTHON_ENV)


def test_doctor_in_a_frozen_app_skips_the_self_test_and_says_why(monkeypatch):
    from edgeguard.doctor import gather, render

    monkeypatch.delenv(selfpython.PYTHON_ENV, raising=False)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    report = gather("cpu")
    assert report["healthy"] and report["self_test"]["skipped"]
    assert any(selfpython.PYTHON_ENV in n for n in report["notes"])
    assert "self-test      skipped:" in render(report)


def test_crash_names():
    import signal

    assert selfpython.crash_name(-signal.SIGSEGV) == "SIGSEGV"
    assert selfpython.crash_name(0xC0000005) == "an access violation (0xC0000005)"
    assert selfpython.crash_name(-1073741819) == "an access violation (0xC0000005)"  # the signed form
    assert selfpython.crash_name(0xC0000135).startswith("a Windows exception")
    assert selfpython.crash_name(0) is None and selfpython.crash_name(3) is None


def test_gpu_advice_per_platform():
    windows = gpu_build_advice("Windows", "AMD64")
    assert '$env:CMAKE_ARGS="-DGGML_CUDA=on"' in windows and "-DGGML_VULKAN=on" in windows
    assert "Visual Studio Build Tools" in windows and "CMake" in windows
    mac = gpu_build_advice("Darwin", "arm64")
    assert "Metal" in mac and "Apple Silicon" in mac and "xcode-select" in mac and "CUDA" not in mac
    linux = gpu_build_advice("Linux", "x86_64")
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in linux and "-DGGML_VULKAN=on" in linux and "$env" not in linux


def test_progress_and_messages_without_stderr(monkeypatch):
    from edgeguard import progress

    monkeypatch.setattr(sys, "stderr", None)
    with progress.bar(total=3, desc="x", unit="it") as bar:
        bar.update(3)
    progress.message("nobody reads this")


def test_json_text_for_a_code_page():
    cp1252 = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    text = console.json_text({"t": "Привет, 世界 é"}, cp1252)
    assert text.isascii() and json.loads(text) == {"t": "Привет, 世界 é"}
    utf8 = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    assert console.json_text({"t": "世界"}, utf8) == '{"t": "世界"}'


# -- the quantizer's output path on a code page that cannot spell it ------------------------
def test_quantize_into_a_path_the_code_page_cannot_spell(tmp_path, monkeypatch):
    import llama_cpp

    from edgeguard.selftest import write_backbone
    from edgeguard_convert.quantize import quantize

    monkeypatch.setattr(paths, "IS_WINDOWS", True)
    monkeypatch.setattr(paths, "ANSI_ENCODING", "cp1252")
    monkeypatch.setattr(paths, "short_path", lambda path: None)  # a volume without 8.3 names
    handed: list[bytes] = []
    real = llama_cpp.llama_model_quantize
    monkeypatch.setattr(llama_cpp, "llama_model_quantize",
                        lambda src, dst, params: handed.append(dst) or real(src, dst, params))
    src = tmp_path / "f32.gguf"
    write_backbone(src)
    folder = tmp_path / "Дмитрий"
    folder.mkdir()
    dst = folder / "модель-q4_0.gguf"
    quantize(src, dst, "q4_0", threads=1)
    assert dst.stat().st_size > 0 and dst.read_bytes()[:4] == b"GGUF"
    assert len(handed) == 1 and handed[0].decode("cp1252") and "Дмитрий".encode() not in handed[0]
    assert not Path(handed[0].decode("cp1252")).exists()  # the staging folder is gone
    plain = tmp_path / "plain-q4_0.gguf"  # a name the code page spells: passed as is
    quantize(src, plain, "q4_0", threads=1)
    assert handed[1] == str(plain).encode("cp1252") and plain.read_bytes() == dst.read_bytes()
    with paths.native_output_path(tmp_path / "café.gguf") as name:  # in the code page, not UTF-8
        assert name == str(tmp_path / "café.gguf").encode("cp1252")


# -- every command with the Windows-missing calls removed -----------------------------------
@pytest.mark.slow
def test_every_command_without_the_posix_calls(gen_model, stream_model, gen_ckpt, tmp_path, windows_apis,
                                                monkeypatch):
    from edgeguard.engines import core

    grown: list[int] = []
    real_trim = core.release_free_heap
    monkeypatch.setattr(core, "release_free_heap", lambda: (grown.append(1), real_trim())[1])  # counts growths
    long_text = "word " * 1500  # past the Gen context's first 1,024 cells
    result = run("check", "--model", gen_model, "--quant", "f16", "--json", long_text)
    assert result.exit_code in (0, 1), result.output
    assert json.loads(result.stdout)["label"] in ("Safe", "Unsafe", "Controversial")
    assert grown, "the Gen context did not grow"
    grown.clear()
    response = "the sky is blue and the grass is green " * 80  # past a Stream session's 512
    result = run("stream", "--model", stream_model, "--prompt", "Tell me something.", "--response", response,
                 "--json")
    assert result.exit_code in (0, 1), result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) > 512 and lines[-1]["event"] == "verdict"
    assert grown, "the Stream context did not grow"
    result = run("check", "--model", stream_model, "--engine", "stream", "--json", "hello")
    assert result.exit_code in (0, 1), result.output
    assert run("models", "--json").exit_code == 0
    result = run("doctor", "--json", "--no-self-test", "--device", "cpu")
    assert result.exit_code == 0 and json.loads(result.stdout)["healthy"]
    out = tmp_path / "converted"
    result = run("convert", gen_ckpt, "--out", out, "--quant", "q8_0")
    assert result.exit_code == 0, result.output
    assert run("check", "--model", out, "--json", "hi").exit_code in (0, 1)
    result, resumed, fresh = _scan_resumes_exactly(gen_model, tmp_path)
    assert result.exit_code in (0, 1), result.output
    assert _rows(resumed) == _rows(fresh) and len(_rows(fresh)) == 5


def _scan_resumes_exactly(model, tmp_path, out_name="out.jsonl"):
    """A scan of 3 lines, 2 more lines appended to the input and a torn line to the output, then
    the same command again: the output must equal a fresh scan of all 5 lines."""
    src, out, fresh = tmp_path / "in.jsonl", tmp_path / out_name, tmp_path / "fresh.jsonl"
    lines = [json.dumps({"prompt": f"question {i}: is this fine?", "id": f"x{i}"}) + "\n" for i in range(5)]
    src.write_text("".join(lines[:3]))
    scan = ("--model", model, "--quant", "f16")
    assert run("scan", src, "--out", out, *scan).exit_code in (0, 1)
    src.write_text("".join(lines))
    with open(out, "ab") as f:
        f.write(b'{"line": 4, "torn')
    resumed = run("scan", src, "--out", out, *scan)
    assert run("scan", src, "--out", fresh, *scan).exit_code in (0, 1)
    return resumed, out.read_bytes(), fresh.read_bytes()


# -- text-mode opens (Windows without O_BINARY), emulated ------------------------------------
class _CrtTextMode(io.RawIOBase):
    """The Microsoft C runtime's text mode over a real file: "\\n" written as "\\r\\n", "\\r\\n"
    read as "\\n", positions and truncation in raw bytes."""

    def __init__(self, raw: io.FileIO):
        self._raw = raw

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def fileno(self):
        return self._raw.fileno()

    def readinto(self, b):
        data = self._raw.read(len(b)).replace(b"\r\n", b"\n")
        b[:len(data)] = data
        return len(data)

    def write(self, b):
        self._raw.write(bytes(b).replace(b"\n", b"\r\n"))
        return len(b)

    def seek(self, pos, whence=0):
        return self._raw.seek(pos, whence)

    def tell(self):
        return self._raw.tell()

    def truncate(self, size=None):
        return self._raw.truncate(size)

    def close(self):
        self._raw.close()
        super().close()


@pytest.fixture
def text_mode_os(tmp_path, monkeypatch):
    """os.open as on Windows: a file under tmp_path opened without O_BINARY is in text mode."""
    fake_binary = 0x8000  # O_LARGEFILE on Linux: harmless to the real open
    monkeypatch.setattr(files, "O_BINARY", fake_binary)
    monkeypatch.setattr(os, "O_BINARY", fake_binary, raising=False)
    text_fds: set[int] = set()
    real_open, real_fdopen = os.open, os.fdopen

    def open_(path, flags, mode=0o777, *, dir_fd=None):
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if str(path).startswith(str(tmp_path)) and not flags & fake_binary:
            text_fds.add(fd)
        return fd

    def fdopen(fd, mode="r", *args, **kwargs):
        if fd in text_fds and "b" in mode:
            text_fds.discard(fd)
            return io.BufferedRandom(_CrtTextMode(io.FileIO(fd, "r+")))
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fdopen", fdopen)
    return text_fds


def _rows(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.replace(b"\r\n", b"\n").decode().splitlines()]


def test_scan_resume_in_binary_mode_under_text_mode_semantics(gen_model, tmp_path, text_mode_os, windows_apis):
    result, resumed, fresh = _scan_resumes_exactly(gen_model, tmp_path)
    assert result.exit_code in (0, 1), result.output
    assert b"\r" not in resumed
    assert _rows(resumed) == _rows(fresh) and len(_rows(fresh)) == 5


def test_the_emulation_reproduces_the_text_mode_corruption(gen_model, tmp_path, text_mode_os, monkeypatch):
    """The negative control: the writer's open without O_BINARY, as edgeguard once did it."""
    monkeypatch.setattr(files, "O_BINARY", 0)
    result, resumed, fresh = _scan_resumes_exactly(gen_model, tmp_path)
    assert b"\r\n" in resumed
    try:
        same = _rows(resumed) == _rows(fresh)
    except ValueError:  # a line that is no longer JSON
        same = False
    assert result.exit_code == 2 or not same, result.output


# -- windowed apps and code pages, in fresh processes ---------------------------------------
def _python(code: str, env_extra: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEGUARD_CACHE_DIR": str(tmp_path / "cache"), **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=REPO, timeout=600)


@pytest.mark.slow
def test_first_load_with_conversion_without_stderr(gen_ckpt, tmp_path):
    code = ("import sys; sys.stderr = None\n"
            "import edgeguard\n"
            f"g = edgeguard.load({str(gen_ckpt)!r}, quant='q8_0', device='cpu')\n"
            "print(g.check('hello there').label)\n")
    proc = _python(code, {}, tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() in ("Safe", "Unsafe", "Controversial")
    assert proc.stderr == b""


@pytest.mark.slow
def test_every_json_output_is_valid_json_on_a_cp1252_stdout(gen_model, stream_model, tmp_path):
    text = "Привет! 你好 — café"
    commands = [
        ["check", "--model", gen_model, "--quant", "f16", "--json", text],
        ["check", "--model", stream_model, "--engine", "stream", "--json", text],
        ["stream", "--model", stream_model, "--prompt", text, "--response", text, "--json"],
        ["models", "--json"],
        ["doctor", "--json", "--no-self-test", "--device", "cpu"],
        ["check", "--model", gen_model, "--quant", "f16", text],  # plain text: escaped, not a crash
    ]
    for args in commands:
        code = f"import sys; from edgeguard.cli import main; sys.argv = ['edgeguard'] + {args!r}; main()"
        proc = _python(code, {"PYTHONIOENCODING": "cp1252"}, tmp_path)
        assert proc.returncode in (0, 1), (args, proc.stderr.decode())
        out = proc.stdout.decode("cp1252")
        if "--json" not in args:
            continue
        values = [json.loads(line) for line in out.splitlines()] if args[0] == "stream" else [json.loads(out)]
        assert values, args
        if args[0] == "stream":
            assert "".join(v["text"] for v in values[:-1]) == text
