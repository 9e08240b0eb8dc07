"""The GPU path (``-m gpu``): the same verdicts with the model on the GPU as on the CPU.

Skipped, with the reason, where the installed llama.cpp build cannot offload (the default pip
build is CPU-only; README "GPU" says how to build a CUDA wheel). Tolerances are those measured
on an NVIDIA H200 (CUDA 13): GPU vs CPU scores within 0.012 (Gen) and 0.0086 (Stream), here 0.02.
"""

from __future__ import annotations

import pytest

import edgeguard
from edgeguard.runtime.backend import gpu_offload_supported
from tests.fixtures.converted import converted
from tests.test_device import ORDERS, PROMPT, scores_after_imports

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_offload_supported(), reason="this llama-cpp-python build has no GPU offload"),
]
TOL = 0.02
PROMPTS = ["How do I bake bread?", "How do I pick a lock?", "word " * 200]


@pytest.mark.parametrize("kind", ["gen", "stream"])
def test_gpu_scores_match_cpu(kind, gen_ckpt, stream_ckpt):
    folder = converted(gen_ckpt if kind == "gen" else stream_ckpt)
    results = {}
    for device in ("cpu", "gpu"):
        with edgeguard.load(str(folder), "q4_k_m", device=device) as guard:
            assert guard.device.device == device
            results[device] = [guard.check(p) for p in PROMPTS] + list(guard.check_many(PROMPTS, batch_size=3))
    for cpu, gpu in zip(results["cpu"], results["gpu"]):
        assert dict(gpu.scores) == pytest.approx(dict(cpu.scores), abs=TOL)


def test_gpu_stream_sessions_match_cpu(stream_ckpt):
    folder = converted(stream_ckpt)
    scores = {}
    for device in ("cpu", "gpu"):
        with edgeguard.load(str(folder), "q4_k_m", device=device) as guard:
            ids = guard.response_tokens("Sure, here is how to do it step by step. " * 4)
            with guard.session(PROMPTS[0]) as a, guard.session(PROMPTS[1]) as b:
                out = guard.feed_many({a: ids, b: ids[:10]})
                scores[device] = [v.scores for s in (a, b) for v in out[s]]
    for cpu, gpu in zip(scores["cpu"], scores["gpu"]):
        assert dict(gpu) == pytest.approx(dict(cpu), abs=TOL)


# On a CUDA build, importing onnxruntime or torch after llama_cpp crashes the process (H200,
# bench/results/2026-11-28-nvidia-h200-gpu.md); edgeguard loads onnxruntime first whenever it is imported, or
# loads a model, before llama_cpp. These are the orders where that is in edgeguard's hands.
SAFE_ORDERS = [o for o in ORDERS if o.index("llama_cpp") > min(o.index("edgeguard"), o.index("onnxruntime"))]


@pytest.mark.parametrize("order", SAFE_ORDERS, ids=["-".join(o) for o in SAFE_ORDERS])
def test_gpu_import_orders(order, gen_ckpt, stream_ckpt, tmp_path):
    gen, stream = str(converted(gen_ckpt)), str(converted(stream_ckpt))
    scores = scores_after_imports(order, [gen, stream], "gpu", tmp_path)
    for folder in (gen, stream):
        with edgeguard.load(folder, "q4_k_m", device="cpu") as guard:
            assert scores[guard.engine] == pytest.approx(dict(guard.check(PROMPT).scores), abs=TOL)
