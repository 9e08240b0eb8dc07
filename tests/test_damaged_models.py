"""Converted model folders that are damaged or unlike anything the converter writes (found by
fuzzing them, each case in a child process): every one is a ModelError naming the fault at
load, never a raw KeyError/TypeError/IndexError from deep inside, a wrong verdict, or the
caller blamed. The fixture: the tiny Stream model (conftest), copied and edited per case; the
manifest's checksum is rewritten with each edit, as a consistent but foreign folder has it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgeguard
from edgeguard.errors import ModelError
from edgeguard.models.manifest import CHECKSUM_KEY, MANIFEST_NAME, _content_sha256
from tests.fixtures.converted import converted


@pytest.fixture(scope="module")
def stream_folder(stream_ckpt):
    return converted(stream_ckpt, ("f16",))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.pop(CHECKSUM_KEY, None)
    edit(data)
    for name, entry in data.get("files", {}).items() if isinstance(data.get("files"), dict) else ():
        if isinstance(entry, dict) and (folder / name).is_file() and "size" in entry:
            entry["size"] = (folder / name).stat().st_size
    data[CHECKSUM_KEY] = _content_sha256(data)
    path.write_text(json.dumps(data))


def _load_and_use(folder: Path):
    with edgeguard.load(folder, "f16", n_threads=1) as guard:
        guard.check("hello")
        with guard.session("hi") as session:
            session.feed_text("Sure, here is the answer.")
            session.finish()


def _set(path: list, value):
    def edit(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


MANIFEST_CASES = {
    "files is a list": (_set(["files"], []), "'files'"),
    "a file entry is a string": (lambda d: d["files"].update({next(iter(d["files"])): "x"}), "entry of"),
    "a file entry without size": (lambda d: next(iter(d["files"].values())).pop("size"), "entry of"),
    "context length is text": (_set(["context_length"], "abc"), "context_length"),
    "context length is a fraction": (_set(["context_length"], 1000.5), "context_length"),
    "labels is a list": (_set(["labels"], []), "'labels'"),
    "category names are numbers": (_set(["labels", "response_category"], [1, 2]), "'labels'"),
    "no query categories": (_set(["labels", "query_category"], []), "'labels'"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_of_another_shape_is_a_model_error(stream_folder, tmp_path, case):
    edit, named = MANIFEST_CASES[case]
    folder = _copy(stream_folder, tmp_path / "m")
    _edit_manifest(folder, edit)
    with pytest.raises(ModelError, match=named):
        _load_and_use(folder)


def test_deeply_nested_manifest_is_a_model_error(stream_folder, tmp_path):
    folder = _copy(stream_folder, tmp_path / "m")
    (folder / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelError, match="manifest"):
        _load_and_use(folder)


def test_category_names_fewer_than_the_heads_outputs_are_a_model_error(stream_folder, tmp_path):
    folder = _copy(stream_folder, tmp_path / "m")
    _edit_manifest(folder, lambda d: d["labels"].update(response_category=d["labels"]["response_category"][:2]))
    with pytest.raises(ModelError, match="response_category"):
        _load_and_use(folder)


def _heads(path: Path, hidden: int, widths: dict[str, int], rank: int = 2) -> None:
    """A heads graph with the right names: one MatMul per output, of the given widths."""
    nodes, inits, outputs = [], [], []
    for name, width in widths.items():
        w = np.zeros((hidden, width), np.float32)
        inits.append(helper.make_tensor(f"w_{name}", TensorProto.FLOAT, w.shape, w.ravel()))
        if rank == 2:
            nodes.append(helper.make_node("MatMul", ["hidden_states", f"w_{name}"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", width]))
        else:
            nodes.append(helper.make_node("MatMul", ["hidden_states", f"w_{name}"], [f"{name}_2d"]))
            nodes.append(helper.make_node("Flatten", [f"{name}_2d"], [name], axis=0))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT,
                                                                             ["n", hidden])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


WIDTHS = {"response_risk": 3, "response_category": 8, "query_risk": 3, "query_category": 9}


@pytest.mark.parametrize("case", ["wrong hidden size", "risk of 5", "category of 50", "outputs not 2-D"])
def test_heads_that_do_not_fit_the_model_are_a_model_error(stream_folder, tmp_path, case):
    folder = _copy(stream_folder, tmp_path / "m")
    hidden = json.loads((folder / MANIFEST_NAME).read_text())["hidden_size"]
    widths = dict(WIDTHS)
    rank = 2
    if case == "wrong hidden size":
        hidden += 64
    elif case == "risk of 5":
        widths["response_risk"] = 5
    elif case == "category of 50":
        widths["query_category"] = 50
    else:
        rank = 1
    _heads(folder / "heads.onnx", hidden, widths, rank)
    _edit_manifest(folder, lambda d: None)
    with pytest.raises(ModelError, match="heads.onnx"):
        _load_and_use(folder)


def test_embedding_table_shorter_than_the_vocabulary_is_a_model_error(stream_folder, tmp_path):
    folder = _copy(stream_folder, tmp_path / "m")
    (table,) = folder.glob("*embeddings*.npy")
    np.save(table, np.load(table)[:100])
    _edit_manifest(folder, lambda d: None)
    with pytest.raises(ModelError, match="rows for a vocabulary"):
        _load_and_use(folder)


@pytest.mark.parametrize("template", [
    "{% for i in range(10**9) %}{% endfor %}",
    "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
])
def test_a_chat_template_that_fails_by_itself_is_a_model_error(template):
    from edgeguard.engines.template import ChatTemplate, Message

    with pytest.raises(ModelError, match="chat template"):
        ChatTemplate(template).render([Message("user", "hi")])
