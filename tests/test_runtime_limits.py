"""Models from today's onnx package (IR version above what ONNX Runtime reads) and ONNX Runtime
errors that keep their gist (which input, which dimension) without C++ source locations."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import winnow
from winnow.backends.ort import run_artifact
from winnow.cli import cli
from winnow.errors import ExecutionError, UnsupportedModelError, runtime_detail
from winnow.ir.execute import run, runtime_limits

CPP = ("/onnxruntime_src", ".cc:", ".h:", "onnxruntime::")


def _relu_graph(shape=(2, 3)) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])


def _ort_loads(model: onnx.ModelProto) -> bool:
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001
        return False
    return True


def test_runtime_limits_are_where_ort_starts_refusing():
    max_ir, max_opset = runtime_limits()
    at = helper.make_model(_relu_graph(), opset_imports=[helper.make_opsetid("", max_opset)],
                           ir_version=max_ir)
    assert _ort_loads(at)
    above_ir = helper.make_model(_relu_graph(), opset_imports=[helper.make_opsetid("", 13)],
                                 ir_version=max_ir + 1)
    assert not _ort_loads(above_ir)
    above_opset = helper.make_model(_relu_graph(), ir_version=max_ir,
                                    opset_imports=[helper.make_opsetid("", max_opset + 1)])
    assert max_opset + 1 > onnx.defs.onnx_opset_version() or not _ort_loads(above_opset)


@pytest.fixture
def new_ir_path(tmp_path):
    """A one-node model from today's helper.make_model (its default IR version) at opset 17."""
    model = helper.make_model(_relu_graph(), opset_imports=[helper.make_opsetid("", 17)])
    if model.ir_version <= runtime_limits()[0]:
        pytest.skip("the installed onnxruntime reads the onnx package's IR version")
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    return path


def test_an_ir_version_ort_cannot_read_is_lowered_and_said(new_ir_path, tmp_path):
    out = tmp_path / "out"
    result = winnow.compile(new_ir_path, out)
    (note,) = result.fidelity["notes"]
    assert note.startswith(f"lowered the IR version from {onnx.IR_VERSION} to "
                           f"{runtime_limits()[0]}")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ir_version"] == runtime_limits()[0]
    assert manifest["fidelity"]["notes"] == [note]
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run_artifact(out, {"x": x})["y"], np.maximum(x, 0))
    cli_result = CliRunner().invoke(cli, ["--quiet", "compile", str(new_ir_path), "-o",
                                          str(tmp_path / "cli")])
    assert cli_result.exit_code == 0, cli_result.output
    notes = [line for line in cli_result.stdout.splitlines() if line.startswith("note ")]
    assert len(notes) == 1 and "lowered the IR version" in notes[0]


def test_an_opset_ort_does_not_support_is_one_sentence_without_cpp(tmp_path):
    model = helper.make_model(_relu_graph())  # today's defaults: newest IR and opset
    max_ir, max_opset = runtime_limits()
    if model.opset_import[0].version <= max_opset:
        pytest.skip("the installed onnxruntime supports the onnx package's newest opset")
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedModelError) as info:
        winnow.compile(path, tmp_path / "out")
    message = str(info.value)
    assert f"opset {model.opset_import[0].version}" in message
    assert f"opsets up to {max_opset}" in message
    if model.ir_version > max_ir:
        assert f"IR version {model.ir_version}" in message and f"up to {max_ir}" in message
    assert not any(marker in message for marker in CPP)
    assert message.count(". ") == 0 and message.endswith(".")
    result = CliRunner().invoke(cli, ["--quiet", "compile", str(path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_wrapped_ort_errors_keep_which_input_and_dimension():
    model = ir.serde.deserialize_model(helper.make_model(
        _relu_graph(), opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    with pytest.raises(ExecutionError) as info:
        run(model, {"x": np.zeros((1, 3), np.float32)})
    message = str(info.value)
    assert "input: x" in message and "index: 0 Got: 1 Expected: 2" in message
    assert not any(marker in message for marker in CPP)


def test_runtime_errors_lose_the_cpp_location_but_not_the_reason():
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"], name="add")], "add",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m"])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
    model = ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    with pytest.raises(ExecutionError) as info:
        run(model, {"a": np.zeros(3, np.float32), "b": np.zeros(4, np.float32)})
    message = str(info.value)
    assert "Name:'add'" in message and "broadcast" in message and "3 by 4" in message
    assert not any(marker in message for marker in CPP)


def test_runtime_detail_on_ort_s_own_message():
    raw = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:256 "
           "onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&, const "
           "onnxruntime::ModelOptions&) Unsupported model IR version: 14, max supported IR "
           "version: 13\n")
    assert runtime_detail(RuntimeError(raw)) == ("Unsupported model IR version: 14, max "
                                                 "supported IR version: 13")
