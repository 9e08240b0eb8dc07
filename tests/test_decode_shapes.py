"""edgeguard.runtime.decode_shapes: how a decode is cut into llama.cpp calls.

Oracle: the kernel thresholds read in llama.cpp 0.3.36's CPU source (the module's docstring),
restated here as the class of each call size; every plan is checked against them for every input
size up to a few batches, with and without output rows. The end-to-end effect (scores that do
not depend on what shares a call) is tests/test_invariance.py's.
"""

from __future__ import annotations

import random

import pytest

from edgeguard.runtime import decode_shapes as ds
from edgeguard.runtime import kv_state

RULES = {
    "k-quants": ds.rules_for(["Q4_K", "Q6_K"], repacked=False),
    "f16": ds.rules_for(["F16"], repacked=False),
    "q8_0": ds.rules_for(["Q8_0", "Q6_K"], repacked=False),
    "repacked": ds.rules_for(["Q4_K", "Q6_K"], repacked=True),
}


def tiled(n: int) -> bool:  # K-quant weights: tiled kernel from 8 tokens
    return n >= 8


def kernel_classes(n: int, rules: ds.Rules) -> tuple:
    """Which kernel each kind of weight takes for a call of ``n`` tokens."""
    return (tiled(n), n >= 2 if rules.narrow_min == 2 else None,
            (n % 4 == 0) if rules.wide_step == 4 else None, (n < 4) if rules.wide_step == 4 else None)


def check(pieces, total, outputs, wide, n_batch, rules):
    covered = [i for p in pieces for i in range(p.start, p.stop)]
    assert covered == list(range(total))  # every input once, in order
    for p in pieces:
        assert 1 <= p.size <= n_batch
        if outputs is not None:
            rows = sum(outputs[p.start:p.stop]) + (p.extra_output >= 0)
            assert rows == 0 or 2 <= rows <= rules.narrow_max or p.size == 1
            if p.extra_output >= 0:
                assert not (p.extra_output < p.stop - p.start and outputs[p.start + p.extra_output])
    if n_batch < 8:
        return
    sizes = {p.size for p in pieces}
    if wide:
        assert all(s >= ds.WIDE_MIN and s % rules.wide_step == 0 for s in sizes), sizes
    else:
        assert all(rules.narrow_min <= s <= rules.narrow_max for s in sizes), sizes
    # one kernel class per kind of call, whatever the sizes
    assert len({kernel_classes(s, rules) for s in sizes}) <= 1


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("wide", [True, False])
def test_every_call_of_a_kind_takes_the_same_kernels(name, wide):
    rules = RULES[name]
    rng = random.Random(7)
    for n_batch in (5, 8, 64, 256):
        for total in range(1, 3 * n_batch + 2):
            for outputs in (None, [rng.random() < 0.2 for _ in range(total)], [True] * total):
                if outputs is not None and not wide:
                    continue
                check(ds.plan(total, outputs, wide=wide, n_batch=n_batch, rules=rules), total, outputs,
                      wide, n_batch, rules)


def test_pieces_are_equal_and_few():
    assert [p.size for p in ds.plan(65, None, wide=True, n_batch=64)] == [32, 33]
    assert [p.size for p in ds.plan(3, None, wide=True, n_batch=256)] == [8]  # 5 padding tokens
    assert [(p.stop - p.start, p.pad) for p in ds.plan(1, None, wide=False, n_batch=256)] == [(1, 0)]
    f16 = RULES["f16"]
    assert [(p.stop - p.start, p.pad) for p in ds.plan(1, None, wide=False, n_batch=256, rules=f16)] == [(1, 1)]
    assert [p.size for p in ds.plan(16, None, wide=False, n_batch=256)] == [5, 5, 6]
    assert [p.size for p in ds.plan(10, None, wide=True, n_batch=256, rules=RULES["repacked"])] == [12]


def test_output_rows_split_calls_and_a_lone_row_gets_a_second():
    outputs = [i % 10 == 9 for i in range(80)]  # 8 sequences of 10 tokens, the last one read
    pieces = ds.plan(80, outputs, wide=True, n_batch=256)
    assert [(p.start, p.stop) for p in pieces] == [(0, 70), (70, 80)]
    assert pieces[1].extra_output == 0
    assert ds.plan(20, [False] * 20, wide=True, n_batch=256)[0].extra_output == -1


def test_rules_follow_the_weight_types():
    assert RULES["k-quants"] == ds.Rules(1, 7, 1)
    assert RULES["q8_0"].narrow_min == 2 and RULES["f16"].narrow_min == 2
    assert RULES["repacked"] == ds.Rules(1, 3, 4)
    assert max(r.spare_cells for r in RULES.values()) == ds.WIDE_MIN - 1


def test_bf16_conversion_matches_torch():
    torch = pytest.importorskip("torch")
    rng = random.Random(3)
    values = [rng.gauss(0, 10) for _ in range(4096)] + [0.0, -0.0, 1e-40, 3.4e38, float("inf"), float("-inf")]
    x = torch.tensor(values, dtype=torch.float32)
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view("uint16")
    got = kv_state.to_bf16(x.numpy())
    assert (got == want).all()
