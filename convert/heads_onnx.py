"""Export of the Stream classification heads to ONNX, built node by node (no torch).

Each path: x = RMSNorm(W_pre h) * w_norm, risk = W_risk x, category = W_cat x, in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeguard.models.formats import HEADS_INPUT as INPUT
from edgeguard.models.formats import HEADS_OUTPUTS as OUTPUTS
from edgeguard_convert.checkpoint import Checkpoint

OPSET = 17
# output name -> (pre, norm, risk/category head) tensor names in the checkpoint
PATHS = {
    "response": ("risk_level_category_pre", "risk_level_category_layernorm", "risk_level_head", "category_head"),
    "query": (
        "query_risk_level_category_pre",
        "query_risk_level_category_layernorm",
        "query_risk_level_head",
        "query_category_head",
    ),
}


def _path_nodes(prefix: str, names: tuple[str, str, str, str]):
    pre, norm, risk, cat = names
    def n(op, ins, out, **kw):
        return helper.make_node(op, ins, [f"{prefix}_{out}"], name=f"{prefix}_{out}", **kw)

    return [
        helper.make_node("MatMul", [INPUT, f"{pre}_t"], [f"{prefix}_pre"], name=f"{prefix}_pre"),
        n("Mul", [f"{prefix}_pre", f"{prefix}_pre"], "sq"),
        n("ReduceMean", [f"{prefix}_sq"], "ms", axes=[-1], keepdims=1),
        n("Add", [f"{prefix}_ms", "eps"], "ms_eps"),
        n("Sqrt", [f"{prefix}_ms_eps"], "rms"),
        n("Div", [f"{prefix}_pre", f"{prefix}_rms"], "normed"),
        n("Mul", [f"{prefix}_normed", norm], "x"),
        helper.make_node("MatMul", [f"{prefix}_x", f"{risk}_t"], [f"{prefix}_risk"], name=f"{prefix}_risk"),
        helper.make_node("MatMul", [f"{prefix}_x", f"{cat}_t"], [f"{prefix}_category"], name=f"{prefix}_category"),
    ]


def build_heads_model(ckpt: Checkpoint) -> onnx.ModelProto:
    hidden = ckpt.hyper.hidden
    initializers = [numpy_helper.from_array(np.array([ckpt.hyper.rms_eps], dtype=np.float32), "eps")]
    nodes = []
    for prefix, names in PATHS.items():
        pre, norm, risk, cat = names
        for mat in (pre, risk, cat):
            w = ckpt.tensors[f"{mat}.weight"].load_f32()
            initializers.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{mat}_t"))
        initializers.append(numpy_helper.from_array(ckpt.tensors[f"{norm}.weight"].load_f32(), norm))
        nodes += _path_nodes(prefix, names)
    outputs = []
    for out in OUTPUTS:
        prefix, part = out.split("_")
        size = ckpt.tensors[f"{PATHS[prefix][2 if part == 'risk' else 3]}.weight"].shape[0]
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n_tokens", size]))
    graph = helper.make_graph(
        nodes,
        "qwen3guard_stream_heads",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["n_tokens", hidden])],
        outputs,
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeguard")
    model.ir_version = 8
    onnx.helper.set_model_props(model, {"edgeguard.labels": json.dumps(ckpt.labels)})
    onnx.checker.check_model(model)
    return model


def write_heads_onnx(ckpt: Checkpoint, path: Path) -> None:
    onnx.save_model(build_heads_model(ckpt), str(path))
