"""Kernel and device choice from llama.cpp's system-info text: pure logic, checked on any machine.

The strings below have the shape llama.cpp 0.3.36 prints on the machines this project meets:
an Intel Xeon with AMX, an AMD EPYC, a Raspberry Pi 5 and a CUDA build on an H200.
"""

import pytest

from edgeguard.errors import RuntimeFailure, UsageError
from edgeguard.runtime.kernels import (
    CUDA_INSTALL,
    SystemInfo,
    TensorInfo,
    amx_allowed,
    arm_note,
    choose_device,
    choose_flash_attn,
    choose_kv_type,
    plan_kernels,
    repackable,
)

X86 = ("SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
       "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | ")
INTEL_AMX = f"CPU : {X86}AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
AMD = f"CPU : {X86}LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
# Captured by scripts/arm64-check.sh: llama.cpp 0.3.36 cross-built for a Pi 5
# (armv8.2-a+dotprod+fp16), llama_print_system_info() under qemu's Cortex-A76.
PI5 = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | REPACK = 1 | "
# A Pi 4 (Cortex-A72, armv8.0-a): no dot product, no fp16 arithmetic.
PI4 = "CPU : NEON = 1 | ARM_FMA = 1 | LLAMAFILE = 1 | REPACK = 1 | "
CUDA_AMX = "CUDA : ARCHS = 900 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | " + INTEL_AMX
AVX2_ONLY = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AMX_INT8 = 1 | REPACK = 1 | "


def q4_k_m_tensors(layers=2, hidden=1024, inner=3072):
    """The tensors of a Qwen3 Q4_K_M GGUF: Q4_K mostly, Q6_K for some ffn_down and attn_v."""
    out = [TensorInfo("token_embd.weight", "Q6_K", (hidden, 151936)),
           TensorInfo("output_norm.weight", "F32", (hidden,))]
    for i in range(layers):
        out += [
            TensorInfo(f"blk.{i}.attn_q.weight", "Q4_K", (hidden, 2048)),
            TensorInfo(f"blk.{i}.attn_k.weight", "Q4_K", (hidden, 1024)),
            TensorInfo(f"blk.{i}.attn_v.weight", "Q6_K", (hidden, 1024)),
            TensorInfo(f"blk.{i}.attn_output.weight", "Q4_K", (2048, hidden)),
            TensorInfo(f"blk.{i}.attn_q_norm.weight", "F32", (128,)),
            TensorInfo(f"blk.{i}.ffn_gate.weight", "Q4_K", (hidden, inner)),
            TensorInfo(f"blk.{i}.ffn_up.weight", "Q4_K", (hidden, inner)),
            TensorInfo(f"blk.{i}.ffn_down.weight", "Q6_K" if i == 0 else "Q4_K", (inner, hidden)),
        ]
    return out


def test_parse_sections_and_flags():
    info = SystemInfo.parse(CUDA_AMX)
    assert info.backends["CUDA"]["ARCHS"] == "900"
    assert info.amx and info.cpu_has("AVX512") and not info.cpu_has("NEON")
    assert info.arch == "x86"
    assert not SystemInfo.parse(AMD).amx
    assert SystemInfo.parse(PI5).arch == "arm"
    assert SystemInfo.parse("").backends == {}


def test_amx_build_never_lets_llama_cpp_choose():
    plan = plan_kernels(SystemInfo.parse(INTEL_AMX), q4_k_m_tensors(), repack=True, on_gpu=False)
    assert plan.extra_bufts is False  # llama.cpp's own list starts with the AMX buffer type
    assert "AMX" in plan.reason
    # Q4_K matmul weights go to CPU_REPACK; Q6_K (no x86 repack), norms and the embedding don't.
    expected = {f"blk.{i}.{k}.weight" for i in range(2)
                for k in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} | {"blk.1.ffn_down.weight"}
    assert set(plan.repack_tensors) == expected


def test_overrides_match_exactly_the_chosen_tensors():
    import re

    tensors = q4_k_m_tensors(layers=12)
    plan = plan_kernels(SystemInfo.parse(INTEL_AMX), tensors, repack=True, on_gpu=False)
    patterns = [re.compile(p) for p in plan.overrides()]
    matched = {t.name for t in tensors if any(p.search(t.name) for p in patterns)}
    assert matched == set(plan.repack_tensors)
    assert len(patterns) <= 7  # one per weight kind, not one per tensor


def test_non_amx_builds_keep_llama_cpp_default():
    for text in (AMD, PI5):
        plan = plan_kernels(SystemInfo.parse(text), q4_k_m_tensors(), repack=True, on_gpu=False)
        assert plan.extra_bufts is True and plan.repack_tensors == ()


def test_repack_off_and_gpu_and_opt_in():
    info = SystemInfo.parse(INTEL_AMX)
    off = plan_kernels(info, q4_k_m_tensors(), repack=False, on_gpu=False)
    assert (off.extra_bufts, off.repack_tensors) == (False, ())
    gpu = plan_kernels(info, q4_k_m_tensors(), repack=True, on_gpu=True)
    assert (gpu.extra_bufts, gpu.repack_tensors) == (False, ())  # overrides would pin weights to the CPU
    allowed = plan_kernels(info, q4_k_m_tensors(), repack=True, on_gpu=False, allow_amx=True)
    assert allowed.extra_bufts is True
    assert amx_allowed({"EDGEGUARD_ALLOW_AMX": "1"}) and not amx_allowed({})


def test_repackable_rules():
    amd = SystemInfo.parse(AMD)
    avx2 = SystemInfo.parse(AVX2_ONLY)
    assert repackable(TensorInfo("blk.0.ffn_up.weight", "Q4_0", (1024, 3072)), amd)
    assert not repackable(TensorInfo("blk.0.ffn_up.weight", "Q4_0", (1024, 3076)), amd)  # rows % 8
    assert not repackable(TensorInfo("blk.0.ffn_up.weight", "Q8_0", (1024, 3072)), amd)  # ARM only
    assert not repackable(TensorInfo("blk.0.ffn_up.weight", "F16", (1024, 3072)), amd)
    assert repackable(TensorInfo("blk.0.ffn_up.weight", "Q2_K", (1024, 3072)), amd)
    assert not repackable(TensorInfo("blk.0.ffn_up.weight", "Q2_K", (1024, 3072)), avx2)  # needs AVX-512
    assert not repackable(TensorInfo("token_embd.weight", "Q4_K", (1024, 3072)), amd)  # GET_ROWS too
    assert not repackable(TensorInfo("blk.0.ffn_up.weight", "Q4_K", (1024, 3072)), SystemInfo.parse(PI5))


def test_choose_device():
    assert choose_device("cpu", gpu_offload=True).n_gpu_layers == 0
    assert choose_device("auto", gpu_offload=False).device == "cpu"
    auto = choose_device("auto", gpu_offload=True)
    assert (auto.device, auto.n_gpu_layers) == ("gpu", 999)
    assert choose_device("gpu", gpu_offload=True, n_gpu_layers=10).n_gpu_layers == 10
    with pytest.raises(RuntimeFailure) as err:
        choose_device("gpu", gpu_offload=False)
    assert CUDA_INSTALL in str(err.value) and err.value.exit_code == 3
    with pytest.raises(UsageError):
        choose_device("tpu", gpu_offload=True)


def test_flash_attention_choice():
    """One setting per guard, never the load: on unless asked or an engine's default says otherwise."""
    assert choose_flash_attn(None, None, "cpu", "f16") is True
    assert choose_flash_attn(None, None, "gpu", "f16") is True
    assert choose_flash_attn(None, None, "cpu", "q8_0-keys") is True
    assert choose_flash_attn(False, None, "cpu", "f16") is False  # asked: the opt-in, not batch-invariant
    assert choose_flash_attn(None, False, "gpu", "f16") is False
    assert choose_flash_attn(None, False, "cpu", "q8_0") is True  # llama.cpp needs it for a quantized V cache


def test_kv_type_choice():
    """One KV type per guard: as asked, else the default while it fits the budget, else the first
    that fits; types the model's head size rules out are skipped."""
    assert choose_kv_type(None, "f16") == "f16"
    assert choose_kv_type("q8_0-keys", "f16") == "q8_0-keys"  # asked
    assert choose_kv_type(None, "f16", fits=lambda kv: kv != "f16") == "q8_0-keys"
    assert choose_kv_type(None, "f16", fits=lambda kv: kv == "q8_0") == "q8_0"
    assert choose_kv_type(None, "f16", usable=lambda kv: kv == "f16", fits=lambda kv: kv != "f16") == "f16"
    # Stream's CPU default: q8_0 keys; f16 where the head size rules q8_0 out; none fitting, the smallest
    assert choose_kv_type(None, "q8_0-keys") == "q8_0-keys"
    assert choose_kv_type(None, "q8_0-keys", usable=lambda kv: kv == "f16") == "f16"
    assert choose_kv_type(None, "q8_0-keys", fits=lambda kv: kv == "q8_0") == "q8_0"
    assert choose_kv_type(None, "q8_0-keys", fits=lambda kv: False) == "q8_0"
    assert choose_kv_type(None, "q8_0-keys", usable=lambda kv: kv == "f16", fits=lambda kv: False) == "f16"
    # on a GPU, mixed key and value types are not taken under a budget (CUDA converts them to f16)
    assert choose_kv_type(None, "f16", fits=lambda kv: kv != "f16", device="gpu") == "q8_0"
    assert choose_kv_type(None, "f16", fits=lambda kv: False, device="gpu") == "q8_0"
    assert choose_kv_type(None, "f16", usable=lambda kv: kv == "f16", fits=lambda kv: False, device="gpu") == "f16"
    assert choose_kv_type("q8_0-keys", "f16", device="gpu") == "q8_0-keys"  # asked


@pytest.mark.parametrize("head,ok", [(128, ("f16", "q8_0-keys", "q8_0")), (64, ("f16", "q8_0-keys", "q8_0")),
                                     (24, ("f16",)), (80, ("f16",)), (96, ("f16", "q8_0-keys", "q8_0"))])
def test_kv_type_problem_follows_the_block_size(head, ok):
    """llama.cpp views a quantized cache one head at a time: q8_0 needs heads that 32 divides."""
    from edgeguard.runtime.kernels import kv_type_problem

    for kv in ("f16", "q8_0-keys", "q8_0"):
        problem = kv_type_problem(kv, head, head)
        assert (problem is None) == (kv in ok), (kv, head, problem)
        if problem:
            assert f"hold {head}" in problem and "kv_type='f16'" in problem


def test_memory_plan_picks_kv_type_and_cap():
    from edgeguard.runtime.kernels import plan_memory

    values = 2 * 28 * 8 * 128  # the real 0.6B: 28 layers, 8 KV heads, head_dim 128 -> 112 KiB/token at f16
    every = ["f16", "q8_0-keys", "q8_0"]

    def plan(budget, candidates=every):
        return plan_memory(budget, weights_mb=400, kv_values_per_token=values, candidates=candidates, max_ctx=8192)

    fits = plan(2000)
    assert (fits.kv_type, fits.max_tokens) == ("f16", 8192)  # 8192 x 112 KiB = 896 MiB < 1400
    q8 = plan(1200)  # 600 MiB: f16 holds 5485, q8_0 keys 7162, q8_0 all 8192
    assert (q8.kv_type, q8.max_tokens) == ("q8_0", 8192)
    assert q8.caps == {"f16": int(600 * 2**20 / (values * 2)), "q8_0-keys": int(600 * 2**20 / (values * 49 / 32)),
                       "q8_0": 8192}
    capped = plan(1000)
    assert capped.kv_type == "q8_0" and capped.max_tokens == int(400 * 2**20 / (values * 34 / 32))
    assert "capped at" in capped.reason
    asked = plan(1000, ["f16"])
    assert asked.kv_type == "f16" and asked.max_tokens == int(400 * 2**20 / (values * 2))
    with pytest.raises(UsageError, match="raise max_memory_mb"):
        plan(500)
    stream_like = plan_memory(1200, weights_mb=400, kv_values_per_token=values, candidates=every, max_ctx=8192,
                              runtime_mb=450)  # an engine's own runtime allowance: 350 MiB left
    assert stream_like.caps["q8_0"] == int(350 * 2**20 / (values * 34 / 32))


def test_arm_system_info_from_the_arm64_check():
    for text in (PI5, PI5.rstrip(" |"), PI4):
        info = SystemInfo.parse(text)
        assert info.arch == "arm" and not info.amx and not info.cpu_has("AVX2")
        plan = plan_kernels(info, q4_k_m_tensors(), repack=True, on_gpu=False)
        assert (plan.extra_bufts, plan.repack_tensors) == (True, ())  # llama.cpp picks its ARM layouts
    pi5 = SystemInfo.parse(PI5)
    assert pi5.cpu_has("DOTPROD") and pi5.cpu_has("FP16_VA") and not pi5.cpu_has("MATMUL_INT8")
    assert pi5.backends == {"CPU": {"NEON": "1", "ARM_FMA": "1", "FP16_VA": "1", "DOTPROD": "1",
                                    "LLAMAFILE": "1", "REPACK": "1"}}
    assert not SystemInfo.parse(PI4).cpu_has("DOTPROD")


def test_arm_note_names_the_repacked_quants():
    pi5 = arm_note(SystemInfo.parse(PI5))
    assert "Q4_0" in pi5 and "Q4_K" in pi5 and "q4_k_m" in pi5 and "repacks no" not in pi5
    i8mm = arm_note(SystemInfo.parse(PI5.replace("DOTPROD = 1", "DOTPROD = 1 | MATMUL_INT8 = 1")))
    assert i8mm == pi5
    assert "repacks no weights" in arm_note(SystemInfo.parse(PI4))
    assert arm_note(SystemInfo.parse(AMD)) is None and arm_note(SystemInfo.parse(INTEL_AMX)) is None
