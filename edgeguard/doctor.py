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
DEFAULT_RESERVE_MB = 4096  # kept for the user's own LLM: a 7B at Q4_K_M with a short context


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


def gather(device: str = "auto", self_test: bool = True, reserve_mb: float = DEFAULT_RESERVE_MB) -> dict:
    """The whole report as plain JSON types; ``report["healthy"]`` says whether all is well.
    ``reserve_mb``: memory kept for the user's own LLM when choosing the model size that fits."""
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
    report["model_fit"] = model_fit(report["devices"], reserve_mb)
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
    from edgeguard.runtime.kernels import choose_flash_attn

    def pick(defaults):
        return choose_flash_attn(None, defaults.flash_attn, device, defaults.kv_type_on(device))

    return {
        "gen": pick(gen.DEFAULTS),
        "stream_one_session": pick(stream.DEFAULTS),
        "stream_several_sessions": pick(stream.DEFAULTS),
        "gen_kv": gen.DEFAULTS.kv_type_on(device),
        "stream_kv": stream.DEFAULTS.kv_type_on(device),  # f16 instead where a model's head size rules it out
        "why": "one attention kind and one KV type per guard, whatever the load, so scores do not "
               "depend on other requests (docs/performance.md); flash attention computes each token "
               "over its own sequence's cells (option: flash_attn=False, faster at long contexts on "
               "some CPUs but not batch-invariant; kv_type= for less memory)",
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
    one, several = att["stream_one_session"], att["stream_several_sessions"]
    stream = kind(one) if one == several else f"{kind(one)} for one session, {kind(several)} for several"
    return (f"Gen {kind(att['gen'])}, KV {att['gen_kv']}; Stream {stream}, KV {att['stream_kv']}; "
            f"at every length ({att['why']})")


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
            f"ok ({st.get('device')}, {st.get('kernels')}, KV {st.get('kv_type')}, {st.get('decode_ms')} ms)"
            if st["ok"]
            else f"skipped: {st.get('error')}" if st.get("skipped") else f"FAILED: {st.get('error')}"))
    lines += _fit_lines(report.get("model_fit"))
    lines += [f"note           {n}" for n in report["notes"]]
    lines.append("healthy" if report["healthy"] else "NOT healthy")
    return "\n".join(lines)


# -- which model size fits ----------------------------------------------------------------------


def available_memory_mb() -> float | None:
    """Memory available to a new process (Linux MemAvailable; else free pages), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (AttributeError, ValueError, OSError):
        return None


def model_fit(devices: list[dict], reserve_mb: float) -> dict:
    """The largest registry model of each kind, at its default quant, whose memory fits this
    machine's available RAM (and each GPU's free memory, all layers offloaded) after
    ``reserve_mb`` (edgeguard.models.sizing does the arithmetic)."""
    from edgeguard.models.registry import load_registry
    from edgeguard.models.sizing import largest_fitting

    feet = [f for f in (spec.footprint() for spec in load_registry().values()) if f is not None]
    places = [("ram", "RAM", available_memory_mb())]
    places += [("gpu", d["name"], d.get("memory_free_mb")) for d in devices if d.get("type") == "gpu"]
    out: dict = {"reserve_mb": reserve_mb, "fits": []}
    for where, label, free in places:
        if not free:
            continue
        for kind in ("gen", "stream"):
            fit = largest_fitting(feet, kind, available_mb=free, reserve_mb=reserve_mb, where=where)
            out["fits"].append({"place": label, **fit.to_dict()})
    return out


def _fit_lines(fit: dict | None) -> list[str]:
    if not fit:
        return []
    lines = []
    for row in fit["fits"]:
        model = row["model"]
        need = model and (model["ram_mb"] if row["where"] == "ram" else model["gpu_mb"])
        what = (f"{model['name']} {model['quant']} (~{need} MB)" if model else
                f"none of {', '.join(row['considered'])}")
        lines.append(f"fits {row['place']:<9} {row['kind']:<6} {what}, of {row['available_mb']} MB available "
                     f"with {row['reserve_mb']} MB kept for your LLM (--reserve-mb)")
    return lines
