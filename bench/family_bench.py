"""What a larger Qwen3Guard costs on this machine: a random-weight checkpoint of the exact shape
of a registry model (default gen-4b / stream-4b), converted by ``edgeguard convert`` and run.

    python bench/family_bench.py [--size 4b] [--quants q4_k_m,q8_0] [--keep] [--out bench/results]

Measured, per kind and quant: the files on disk (and what edgeguard.models.sizing computes for
them), the conversion's wall time and peak RSS, a running guard's peak RSS (a fresh process:
load + one Gen check of 60 words, or a Stream session of 32 tokens), Gen check latency against
llama.cpp's own greedy generation of the verdict on the same GGUF, and Stream per-token feed
against one bare llama.cpp decode step (the Gen GGUF of the same size stands in for the plain
full-vocabulary model: same shapes, and speed does not depend on the values), interleaved in
one process as bench/run.py does for the 0.6B. Load average is recorded before and after.

The checkpoint is written in the Hugging Face layout the real ones have (bf16 shards with a
model.safetensors.index.json; the Stream checkpoint hard-links the same backbone shards and adds
its heads). A 4B needs ~8 GB for the checkpoint and ~22 GB more while converting; everything
is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import gen_inputs, machine_info, run_worker  # noqa: E402


def log(msg: str) -> None:
    print(f"[family {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _shape(size: str):
    from edgeguard.models.registry import load_registry

    models = load_registry()
    return models[f"gen-{size}"].shape, models[f"stream-{size}"].shape


def _config(kind: str, shape) -> dict:
    from bench.models import _config as base_config

    cfg = base_config(kind)
    cfg.update({"hidden_size": shape.hidden, "num_hidden_layers": shape.layers, "max_window_layers": shape.layers,
                "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
                "head_dim": shape.head_dim, "intermediate_size": shape.ffn, "vocab_size": shape.vocab,
                "tie_word_embeddings": shape.tied})
    if kind == "stream":
        cfg["guard_inner_size"] = shape.guard_inner
    return cfg


def _side_files(folder: Path, kind: str, cfg: dict) -> None:
    from tests.fixtures import checkpoints as fx

    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copyfile(fx.tokenizer_json_path(), folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(fx.tokenizer_config(kind), indent=2) + "\n")


def write_checkpoints(root: Path, gen_shape, stream_shape) -> tuple[Path, Path]:
    """Gen: backbone in two bf16 shards (+ lm_head when untied) and an index. Stream: the same
    backbone shards, hard-linked, and a third shard with the heads."""
    from bench.models import _Random, write_safetensors

    s = gen_shape
    r = _Random(7)
    h, d, f = s.hidden, s.head_dim, s.ffn
    q, kv = s.heads * d, s.kv_heads * d

    def layer(i: int) -> dict:
        p = f"model.layers.{i}."
        return {p + "input_layernorm.weight": r.ones((h,)), p + "self_attn.q_proj.weight": r.normal((q, h)),
                p + "self_attn.k_proj.weight": r.normal((kv, h)), p + "self_attn.v_proj.weight": r.normal((kv, h)),
                p + "self_attn.o_proj.weight": r.normal((h, q)), p + "self_attn.q_norm.weight": r.ones((d,)),
                p + "self_attn.k_norm.weight": r.ones((d,)), p + "post_attention_layernorm.weight": r.ones((h,)),
                p + "mlp.gate_proj.weight": r.normal((f, h)), p + "mlp.up_proj.weight": r.normal((f, h)),
                p + "mlp.down_proj.weight": r.normal((h, f))}

    half = s.layers // 2
    first = {"model.embed_tokens.weight": r.normal((s.vocab, h))}
    for i in range(half):
        first.update(layer(i))
    second: dict = {}
    for i in range(half, s.layers):
        second.update(layer(i))
    second["model.norm.weight"] = r.ones((h,))
    gen, stream = root / "ckpt-gen", root / "ckpt-stream"
    for folder in (gen, stream):
        folder.mkdir(parents=True)
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {}
    for name, tensors in zip(names, (first, second)):
        write_safetensors(gen / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
        os.link(gen / name, stream / name)
    gen_map = dict(weight_map)
    if not s.tied:
        write_safetensors(gen / "model-lm_head.safetensors", {"lm_head.weight": r.normal((s.vocab, h))})
        gen_map["lm_head.weight"] = "model-lm_head.safetensors"
    heads: dict = {}
    g = stream_shape.guard_inner
    for prefix, n_cat in (("", 8), ("query_", 9)):
        heads[f"{prefix}risk_level_category_pre.weight"] = r.normal((g, h))
        heads[f"{prefix}risk_level_category_layernorm.weight"] = r.ones((g,))
        heads[f"{prefix}risk_level_head.weight"] = r.normal((3, g))
        heads[f"{prefix}category_head.weight"] = r.normal((n_cat, g))
    write_safetensors(stream / "model-heads.safetensors", heads)
    stream_map = {**weight_map, **dict.fromkeys(heads, "model-heads.safetensors")}
    for folder, kind, wmap, shape in ((gen, "gen", gen_map, gen_shape), (stream, "stream", stream_map, stream_shape)):
        _side_files(folder, kind, _config(kind, shape))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return gen, stream


def convert(ckpt: Path, out: Path, quants: str) -> dict:
    """``edgeguard convert`` in a child process: wall time and the child's peak RSS."""
    cmd = [sys.executable, "-c", "from edgeguard.cli import main; main()", "convert", str(ckpt), "--out", str(out), "--quant", quants]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"edgeguard convert failed ({proc.returncode}): {stdout[-500:]!r}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6,
            "files": {Path(line.split(b"\t")[0].decode()).name: int(line.split(b"\t")[1])
                      for line in stdout.splitlines() if b"\t" in line}}


def _files_mb(folder: Path, quant: str) -> float:
    manifest = json.loads((folder / "manifest.json").read_text())
    return sum(e["size"] for e in manifest["files"].values()
               if e.get("role") != "model" or e.get("quant") == quant) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4b", help="registry size: 4b (default) or 8b")
    ap.add_argument("--quants", default="q4_k_m,q8_0")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "family-bench")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and converted models")
    a = ap.parse_args()
    from edgeguard.models.sizing import footprint

    gen_shape, stream_shape = _shape(a.size)
    quants = a.quants.split(",")
    need = gen_shape.params("gen") * 2 * 3.2  # checkpoint + master GGUF + quants, Gen then Stream
    a.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(a.work).free
    if free < need:
        log(f"{free / 1e9:.0f} GB free in {a.work}, this needs ~{need / 1e9:.0f} GB: not run")
        return 2
    res: dict = {"command": "python bench/family_bench.py" + (f" --size {a.size}" if a.size != "4b" else "")
                 + (f" --quants {a.quants}" if a.quants != "q4_k_m,q8_0" else ""),
                 "machine": machine_info(), "size": a.size, "threads": a.threads,
                 "loadavg_start": os.getloadavg(), "disk_free_gb": free / 1e9}
    root = a.work / f"run-{os.getpid()}"
    try:
        log(f"writing random {a.size} checkpoints into {root}")
        t0 = time.perf_counter()
        gen_ckpt, stream_ckpt = write_checkpoints(root, gen_shape, stream_shape)
        res["checkpoint"] = {"write_s": time.perf_counter() - t0,
                             "gen_bytes": sum(p.stat().st_size for p in gen_ckpt.glob("*.safetensors"))}
        folders = {}
        for kind, ckpt in (("gen", gen_ckpt), ("stream", stream_ckpt)):
            log(f"edgeguard convert {kind} -> {a.quants}")
            folders[kind] = root / f"{kind}-{a.size}"
            res[f"convert_{kind}"] = convert(ckpt, folders[kind], a.quants)
            log(f"  {res[f'convert_{kind}']['wall_s']:.0f} s, peak RSS {res[f'convert_{kind}']['peak_rss_mb']:.0f} MB")
        shutil.rmtree(gen_ckpt)
        shutil.rmtree(stream_ckpt)
        rows = []
        items = [it for it in gen_inputs(quick=True) if it["kind"] in ("short", "medium")][:2]
        for quant in quants:
            for kind in ("gen", "stream"):
                shape = gen_shape if kind == "gen" else stream_shape
                row = {"model": f"{kind}-{a.size}", "quant": quant, "disk_mb": _files_mb(folders[kind], quant),
                       "computed": footprint(shape, kind, quant, name=f"{kind}-{a.size}").to_dict()}
                la = os.getloadavg()[0]
                log(f"{kind} {quant}: memory")
                row["memory"] = run_worker("memory", kind, {"folder": str(folders[kind]), "quant": quant,
                                                            "n_tokens": 32}, timeout=900)
                log(f"{kind} {quant}: speed")
                if kind == "gen":
                    row["speed"] = run_worker("gen_bench", "edgeguard_vs_llama", {
                        "folder": str(folders["gen"]), "quant": quant, "threads": a.threads, "inputs": items,
                        "reps": 1}, timeout=1800)
                else:
                    row["speed"] = run_worker("stream_bench", "per_token", {
                        "folder": str(folders["stream"]), "plain": str(folders["gen"]), "quant": quant,
                        "threads": a.threads, "n_tokens": 12, "backlog": 8, "backlog_reps": 1, "check_reps": 1,
                        "embd_mode": False}, timeout=1800)
                row["loadavg"] = [la, os.getloadavg()[0]]
                rows.append(row)
                log(f"  {json.dumps(_summary(row))}")
        res["rows"] = rows
    finally:
        res["loadavg_end"] = os.getloadavg()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    cpu = "-".join(re.sub(r"[^a-z0-9]+", " ", res["machine"]["cpu"].lower()).split()[:2]) or "cpu"
    path = a.out / f"{time.strftime('%Y-%m-%d')}-{cpu}-family-{a.size}.json"
    path.write_text(json.dumps(res, indent=1))
    path.with_suffix(".md").write_text(render(res) + "\n")
    print(render(res))
    log(f"wrote {path} and its .md")
    return 0


def _summary(row: dict) -> dict:
    speed, mem = row.get("speed", {}), row.get("memory", {})
    out = {"model": row["model"], "quant": row["quant"], "disk_mb": round(row["disk_mb"]),
           "computed_disk_mb": row["computed"]["disk_mb"], "computed_ram_mb": row["computed"]["ram_mb"],
           "peak_rss_mb": round(mem.get("peak_rss_mb", 0) * 1e6 / 2**20) or mem.get("error")}  # VmHWM, in 2**20
    if "error" in speed:
        out["speed_error"] = speed["error"]
    elif row["model"].startswith("gen"):
        ours, plain = speed["ours"]["median_ms"], speed["plain"]["median_ms"]
        out.update({"check_ms": round(ours), "llama_generate_ms": round(plain), "ratio": round(ours / plain, 2),
                    "tokens": sorted(speed["n_tokens"].values())})
    else:
        feed, bare = speed["feed"]["median_ms"], speed["bare_decode"]["median_ms"]
        out.update({"feed_ms_per_token": round(feed, 1), "llama_decode_ms": round(bare, 1),
                    "ratio": round(feed / bare, 2), "prompt_check_ms": round(speed["check"]["median_ms"])})
    return out


def render(res: dict) -> str:
    lines = [f"# {res['size']} models, random weights, on {res['machine']['cpu']}", "",
             f"command: {res['command']}", f"threads {res['threads']}, load average "
             f"{res['loadavg_start'][0]:.1f} at start, {res['loadavg_end'][0]:.1f} at end", "",
             "MB = 2**20 bytes; computed = edgeguard.models.sizing from the registry shape; Gen speed: "
             "one check; Stream: one response token fed.", "",
             "| model | quant | disk MB (computed) | peak RSS MB (computed RAM) | speed | vs llama.cpp |",
             "|---|---|---|---|---|---|"]
    for row in res.get("rows", []):
        s = _summary(row)
        if "speed_error" in s:
            speed, ratio = s["speed_error"], ""
        elif "check_ms" in s:
            speed, ratio = f"check {s['check_ms']} ms ({s['tokens']} tokens)", f"{s['ratio']}x of {s['llama_generate_ms']} ms"
        else:
            speed = f"{s['feed_ms_per_token']} ms/token; prompt check {s['prompt_check_ms']} ms"
            ratio = f"{s['ratio']}x of {s['llama_decode_ms']} ms"
        lines.append(f"| {s['model']} | {s['quant']} | {s['disk_mb']} ({s['computed_disk_mb']}) | "
                     f"{s['peak_rss_mb']} ({s['computed_ram_mb']}) | {speed} | {ratio} |")
    for kind in ("gen", "stream"):
        c = res.get(f"convert_{kind}")
        if c:
            lines.append(f"\nconvert {kind}: {c['wall_s']:.0f} s, peak RSS {c['peak_rss_mb'] * 1e6 / 2**20:.0f} MB "
                         f"(resident pages of the memory-mapped lossless GGUF included)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
