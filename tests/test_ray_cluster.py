"""The cluster recipe on a simulated two-node Ray cluster (one CPU per node): `scan --ray
--address` spreads one actor per node and gives the records of a local scan; CSV input."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'edgeguard[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils", reason="needs the ray extra: pip install 'edgeguard[ray]'")

from tests.fixtures.converted import converted  # noqa: E402
from tests.fixtures.ray_data import ROWS, rows, scan  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 100 * 2**20})
    cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def test_csv_on_two_nodes_equals_local_scan(gen_ckpt, cluster, tmp_path):
    model = str(converted(gen_ckpt))
    data = rows()
    src_jsonl, src_csv = tmp_path / "in.jsonl", tmp_path / "in.csv"
    src_jsonl.write_text("".join(json.dumps(r) + "\n" for r in data))
    # CSV: an empty cell is a missing value, and every row gets an id column (empty: none).
    src_csv.write_text("prompt,id\n" + "".join(
        f"{json.dumps(r.get('prompt', ''))},{r.get('id', '')}\n" for r in data))
    local, out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    expected = scan(src_jsonl, "--out", local, "--model", model, "--quant", "f16", "--threads", "1")
    result = scan(src_csv, "--out", out, "--model", model, "--quant", "f16", "--threads", "1",
                  "--ray", "--address", cluster.address, "--actors", "2")
    assert result.exit_code == expected.exit_code, result.output
    assert not ray.is_initialized()  # the CLI disconnected from the cluster it joined
    got = out.read_text().splitlines()
    want = local.read_text().splitlines()
    assert len(got) == ROWS
    # The CSV's empty prompt is a missing one; everything else is the same record.
    assert [json.loads(g) for g in got if "error" not in g] == [json.loads(w) for w in want if "error" not in w]
    assert sum("error" in g for g in got) == sum("error" in w for w in want) == 2


def test_two_actors_need_both_nodes(gen_ckpt, cluster, tmp_path):
    """Two 1-CPU actors fit only one per node: three do not fit, and say so."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    result = scan(src, "--out", tmp_path / "o.jsonl", "--model", str(converted(gen_ckpt)), "--quant", "f16",
                  "--ray", "--address", cluster.address, "--actors", "3")
    assert result.exit_code == 2 and "need 3 CPUs; the Ray cluster has 2" in result.stderr, result.output
