"""`edgeguard scan --ray` and `edgeguard.scan.ray.moderate` on a real local Ray runtime (2 CPUs):
the same records as a local scan, in input order, each row exactly once, also when an actor is
killed mid-run; error rows; the missing extra."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'edgeguard[ray]'")
pq = pytest.importorskip("pyarrow.parquet", reason="needs the ray extra: pip install 'edgeguard[ray]'")
pa = pytest.importorskip("pyarrow", reason="needs the ray extra: pip install 'edgeguard[ray]'")

import edgeguard.scan.ray as eg_ray  # noqa: E402
from edgeguard.errors import UsageError  # noqa: E402
from tests.fixtures.converted import converted  # noqa: E402
from tests.fixtures.ray_data import (  # noqa: E402
    BLANK_LINE,
    NOT_JSON_LINE,
    ROWS,
    rows,
    scan,
    worker_pids,
    write_jsonl,
)


def test_this_module_is_not_the_ray_package():
    assert eg_ray.require_ray() is ray and ray.__name__ == "ray" and hasattr(ray, "data")


@pytest.fixture(scope="module")
def model(gen_ckpt):
    return str(converted(gen_ckpt))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_scan(model, tmp_path_factory):
    """The 200-row JSONL and its local scan (1 thread): (input, output bytes, exit code)."""
    folder = tmp_path_factory.mktemp("local")
    src, out = write_jsonl(folder / "in.jsonl"), folder / "out.jsonl"
    result = scan(src, "--out", out, "--model", model, "--quant", "f16", "--threads", "1")
    assert result.exit_code == 1, result.output  # the tiny model flags some rows
    return src, out.read_bytes(), result.exit_code


def test_scan_ray_jsonl_equals_local_scan(model, local_ray, local_scan, tmp_path):
    src, expected, code = local_scan
    out = tmp_path / "out.jsonl"
    result = scan(src, "--out", out, "--model", model, "--quant", "f16", "--ray", "--actors", "2", "--threads", "1")
    assert result.exit_code == code, result.output
    assert out.read_bytes() == expected
    assert f"line {NOT_JSON_LINE}: skipped: not JSON" in result.stderr
    assert "scanned 200 lines" in result.stderr


def test_scan_ray_parquet_in_and_out_equals_local_scan(model, local_ray, local_scan, tmp_path):
    _, expected, code = local_scan
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    # The same rows as the JSONL, except its blank and non-JSON lines, which a table cannot hold:
    # there the prompt is missing.
    table = rows()
    table[BLANK_LINE - 1] = table[NOT_JSON_LINE - 1] = {"id": "missing"}
    pq.write_table(pa.table({key: [r.get(key) for r in table] for key in ("prompt", "id")}), src)
    result = scan(src, "--out", out, "--model", model, "--quant", "f16", "--ray", "--actors", "2", "--threads", "1")
    assert result.exit_code == code, result.output
    got = pq.read_table(out).to_pylist()
    want = [json.loads(line) for line in expected.splitlines()]
    assert len(got) == ROWS
    for number, (g, w) in enumerate(zip(got, want), 1):
        if number in (BLANK_LINE, NOT_JSON_LINE):
            w = {"line": number, "id": "missing", "error": "missing or empty \"prompt\""}
        # One column set for all rows: a key a record lacks is a null in its row.
        assert all(g[k] is None for k in g.keys() - w.keys()), number
        g = {k: dict(v) if k == "category_scores" else v for k, v in g.items() if k in w}
        assert g == w, number


def test_moderate_adds_verdict_columns_in_order(model, local_ray, local_scan):
    _, expected, _ = local_scan
    want = [json.loads(line) for line in expected.splitlines()]
    items = [{"prompt": r.get("prompt"), "n": i} for i, r in enumerate(rows())]
    out = eg_ray.moderate(ray.data.from_items(items), model, "f16", actors=2, batch_size=8).take_all()
    assert [r["n"] for r in out] == list(range(ROWS))
    for r, w in zip(out, want):
        if r["n"] + 1 in (BLANK_LINE, NOT_JSON_LINE):
            continue  # not rows of the JSONL
        if "error" in w:
            assert r["error"] == w["error"] and r["label"] is None and r["flagged"] is None
            continue
        assert r["error"] is None and r["prompt"] == items[r["n"]]["prompt"]
        for key in eg_ray.VERDICT_COLUMNS:
            got = dict(r[key]) if key == "category_scores" else r[key]
            assert got == w[key], (r["n"], key)


def test_moderate_refuses_a_dataset_without_prompts_or_with_verdict_columns(model, local_ray):
    with pytest.raises(UsageError, match="no \"prompt\" column"):
        eg_ray.moderate(ray.data.from_items([{"text": "x"}]), model, "f16")
    with pytest.raises(UsageError, match="already has verdict column"):
        eg_ray.moderate(ray.data.from_items([{"prompt": "x", "label": 1}]), model, "f16")
    with pytest.raises(UsageError, match="need 6 CPUs"):
        eg_ray.moderate(ray.data.from_items([{"prompt": "x"}]), model, "f16", actors=3, threads_per_actor=2)


def test_an_actor_killed_mid_run_is_restarted_and_every_row_comes_once(model, local_ray):
    items = [{"prompt": r.get("prompt") or "x", "n": i} for i, r in enumerate(rows())]
    result = eg_ray.moderate(ray.data.from_items(items, override_num_blocks=25), model, "f16", actors=1, batch_size=4)
    seen, killed = [], None
    for row in result.iter_rows():
        seen.append(row["n"])
        if killed is None:
            (killed,) = worker_pids()
            os.kill(killed, signal.SIGKILL)
            received_at_kill = len(seen)
        elif len(seen) == ROWS - 1:
            restarted = worker_pids()
    assert received_at_kill < ROWS // 2
    assert restarted and killed not in restarted  # a new actor process finished the job
    assert seen == list(range(ROWS))


def test_scan_ray_usage_errors(model, local_ray, local_scan, tmp_path):
    src = local_scan[0]
    result = scan(src, "--out", tmp_path / "o.jsonl", "--model", model, "--actors", "2")
    assert result.exit_code == 2 and "need --ray" in result.stderr
    result = scan(src, "--out", tmp_path / "o.txt", "--model", model, "--ray")
    assert result.exit_code == 2 and "*.jsonl or *.parquet" in result.stderr
    full = tmp_path / "full.jsonl"
    full.write_text("{}\n")
    result = scan(src, "--out", full, "--model", model, "--ray")
    assert result.exit_code == 2 and "--restart" in result.stderr and full.read_text() == "{}\n"


def test_scan_ray_without_the_extra_exits_2_with_the_install_command(tmp_path, model):
    src = write_jsonl(tmp_path / "in.jsonl")
    code = ("import sys; sys.modules['ray'] = None; from edgeguard.cli import main; "
            f"main(['scan', {str(src)!r}, '--out', {str(tmp_path / 'o.jsonl')!r}, '--model', {model!r}, '--ray'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'edgeguard[ray]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("total,actors,batch", [(200, 2, 16), (64, 2, 16), (10_000, 2, 16), (10**6, 4, 16),
                                                (5, 2, 16), (1, 1, 16), (3_000, 2, 4), (999, 3, 7)])
def test_blocks_leave_a_short_tail_and_hold_whole_batches(total, actors, batch):
    size = eg_ray._block_rows(total, actors, batch)
    assert 1 <= size <= 4096
    assert size < batch or size % batch == 0  # a block of at least a batch holds whole batches
    if size < 4096:  # the last task is at most ~1/32 of an actor's share (plus one batch's rounding)
        assert size <= total / actors / 32 + batch
    table = pa.table({"line": list(range(1, total + 1))})
    blocks = eg_ray._blocks([table.slice(0, total // 2), table.slice(total // 2)], total, size)
    assert [b.num_rows for b in blocks[:-1]] == [size] * (len(blocks) - 1) and 0 < blocks[-1].num_rows <= size
    assert pa.concat_tables(blocks).column("line").to_pylist() == list(range(1, total + 1))
