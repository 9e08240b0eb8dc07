"""`edgeguard doctor`: what this machine's llama.cpp build can do, and whether it runs.

The facts come from llama.cpp and onnxruntime themselves; the self-test decodes a tiny model in a
child process (``edgeguard.selftest``), so a native crash of the user's build is reported with
what to change instead of killing the caller.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from edgeguard.platform.builds import gpu_build_advice, native_flags_advice
from edgeguard.platform.selfpython import crash_name, self_test_python
from edgeguard.runtime.heads import onnxruntime_info
from edgeguard.runtime.kernels import ALLOW_AMX_ENV

SELFTEST_TIMEOUT_S = 300


@dataclass(frozen=True)
class ChildResult:
    ok: bool
    detail: dict = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict:
        return {"ok": self.ok, **self.detail, **({"error": self.error} if self.error else {})}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_child(folder: Path, device: str, env_extra: dict[str, str] | None = None,
              timeout: float = SELFTEST_TIMEOUT_S) -> ChildResult:
    """``python -m edgeguard.selftest`` in a child process; a crash or hang becomes an error."""
    import json

    python, why_none = self_test_python()
    if python is None:
        return ChildResult(False, {"skipped": True}, error=why_none)
    env = {**os.environ, **(env_extra or {})}
    try:
        proc = subprocess.run([python, "-m", "edgeguard.selftest", str(folder), device],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return ChildResult(False, error=f"the self-test did not finish in {timeout:.0f} s")
    crash = crash_name(proc.returncode)
    if crash is not None:
        return ChildResult(False, error=f"the self-test crashed with {crash} inside llama.cpp")
    lines = proc.stdout.strip().splitlines()
    try:
        detail = json.loads(lines[-1]) if lines else {}
    except ValueError:
        detail = {}
    if proc.returncode != 0 or not detail.get("ok"):
        tail = " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit status {proc.returncode}"
        return ChildResult(False, detail, error=f"the self-test failed: {tail}")
    return ChildResult(True, detail)


def gather(device: str = "auto", self_test: bool = True) -> dict:
    """The whole report as plain JSON types; ``report["healthy"]`` says whether all is well."""
    from edgeguard.models import hub
    from edgeguard.runtime import backend
    from edgeguard.runtime.kernels import amx_allowed, arm_note, choose_device, plan_kernels

    info = backend.system_info()
    report: dict = {
        "edgeguard": _version("edgeguard"),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "llama_cpp": _version("llama-cpp-python"),
        "onnxruntime": onnxruntime_info(),
        "llama_system_info": info.summary(),
        "gpu_offload": backend.gpu_offload_supported(),
        "devices": backend.devices(),
        "threads": backend.default_threads(),
        "cache_dir": str(hub.cache_dir()),
    }
    notes: list[str] = []
    try:
        choice = choose_device(device, gpu_offload=report["gpu_offload"])
        report["device"] = {"use": choice.device, "why": choice.reason}
    except Exception as e:  # an impossible --device gpu: report it, keep the rest of the report
        report["device"] = {"use": None, "why": str(e)}
        notes.append(str(e))
        choice = None
    plan = plan_kernels(info, [], repack=True, on_gpu=bool(choice and choice.n_gpu_layers))
    report["cpu_kernels"] = {
        "amx_in_build": info.amx,
        "amx_allowed": amx_allowed(),
        "extra_buffer_types": sorted(backend.cpu_extra_buffer_types()),
        "plan": "llama.cpp default" if plan.extra_bufts else "CPU_REPACK by name, AMX off",
        "why": plan.reason,
    }
    report["attention"] = _attention(choice.device if choice else "cpu")
    if note := arm_note(info):
        notes.append(note)
    if platform.system() == "Darwin" and report["gpu_offload"]:
        notes.append("Metal is on (llama.cpp's default on macOS): --device gpu and auto run on this Mac's GPU")
    healthy = choice is not None
    if self_test and choice is not None:
        with tempfile.TemporaryDirectory(prefix="edgeguard-doctor-") as tmp:
            result = run_child(Path(tmp), device)
            report["self_test"] = result.to_dict()
            skipped = result.detail.get("skipped", False)
            healthy = healthy and (result.ok or skipped)
            if skipped:
                notes.append(f"self-test skipped: {result.error}")
            elif not result.ok:
                notes.append(_advice(info.amx, choice.device))
            if info.amx and not amx_allowed() and result.ok:
                probe = run_child(Path(tmp), "cpu", {ALLOW_AMX_ENV: "1"})
                report["amx_probe"] = probe.to_dict()
                notes.append("llama.cpp's AMX kernels " + (
                    f"work in this build: {ALLOW_AMX_ENV}=1 lets edgeguard use them" if probe.ok else
                    f"crash in this build ({probe.error}); edgeguard keeps them off"))
    report["notes"] = notes
    report["healthy"] = healthy
    return report


def _attention(device: str) -> dict:
    """Whether each engine runs llama.cpp's flash attention on this device, by default."""
    from edgeguard.engines import gen, stream
    from edgeguard.engines.core import LONG_CTX
    from edgeguard.runtime.kernels import choose_flash_attn, choose_kv_type

    def pick(defaults, crowded=False):
        return choose_flash_attn(None, defaults.flash_attn, device, defaults.kv_type, crowded=crowded)

    lone = pick(stream.DEFAULTS)
    return {
        "gen": pick(gen.DEFAULTS),
        "stream_one_session": lone,
        "stream_several_sessions": pick(stream.DEFAULTS, crowded=True),
        "stream_long_kv": choose_kv_type(None, stream.DEFAULTS.kv_type, device, lone, long=True),
        "long_ctx": LONG_CTX,
        "why": "Gen is prefill-bound and flash attention speeds up every batch; a lone Stream session "
               "on a CPU decodes one token at a time, where plain attention is faster at long "
               "positions; with several sessions in one cache flash attention skips the others' "
               "cells; a GPU and a q8_0 KV cache use it always (option: flash_attn=True/False); past "
               "LONG_CTX cells a lone CPU session with plain attention keeps q8_0 keys (less to read "
               "per step, 0.77x the memory; option: kv_type=)",
    }


def _advice(amx: bool, device: str) -> str:
    if device == "gpu":
        return "the GPU path failed: try `--device cpu`, or rebuild llama-cpp-python: " + gpu_build_advice()
    if amx:
        return ("the CPU path failed on an AMX machine: rebuild llama-cpp-python with GCC >= 13 or "
                "without native flags: " + native_flags_advice())
    return ("the CPU path failed: try `EDGEGUARD_THREADS=1`, or reinstall llama-cpp-python "
            "without native flags: " + native_flags_advice())


def _attention_line(att: dict) -> str:
    def kind(on: bool) -> str:
        return "flash" if on else "plain"
    return (f"Gen {kind(att['gen'])}; Stream {kind(att['stream_one_session'])} for one session, "
            f"{kind(att['stream_several_sessions'])} for several; Stream KV {att['stream_long_kv']} past "
            f"{att['long_ctx']} cells ({att['why']})")


def render(report: dict) -> str:
    """The report as aligned text lines for a terminal."""
    ort = report["onnxruntime"]
    lines = [
        f"edgeguard      {report['edgeguard']}  (Python {report['python']}, {report['machine']})",
        f"llama.cpp      llama-cpp-python {report['llama_cpp']}",
        f"onnxruntime    {ort.get('version') or 'missing: ' + ort.get('error', '')}"
        + (f"  providers: {', '.join(ort['providers'])}" if ort.get("providers") else ""),
        f"system info    {report['llama_system_info']}",
        f"GPU offload    {'yes' if report['gpu_offload'] else 'no'}",
    ]
    for dev in report["devices"]:
        memory = f", {dev['memory_total_mb']:.0f} MB" if dev.get("memory_total_mb") else ""
        lines.append(f"  device       {dev['name']}: {dev['description']}{memory}")
    kernels = report["cpu_kernels"]
    lines += [
        f"device         {report['device']['use'] or 'none'} ({report['device']['why']})",
        f"CPU kernels    {kernels['plan']}: {kernels['why']}",
        "attention      " + _attention_line(report["attention"]),
        f"threads        {report['threads']}",
        f"cache          {report['cache_dir']}",
    ]
    if "self_test" in report:
        st = report["self_test"]
        lines.append("self-test      " + (
            f"ok ({st.get('device')}, {st.get('kernels')}, {st.get('decode_ms')} ms)" if st["ok"]
            else f"skipped: {st.get('error')}" if st.get("skipped") else f"FAILED: {st.get('error')}"))
    lines += [f"note           {n}" for n in report["notes"]]
    lines.append("healthy" if report["healthy"] else "NOT healthy")
    return "\n".join(lines)
