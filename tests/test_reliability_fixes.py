"""Reliability fixes of issue 10: nodes out of topological order, overridable initializers given
to `winnow run`, and ONNX Runtime messages without their C++ internals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from winnow.backends.ort import run_artifact
from winnow.cli import cli
from winnow.errors import ExecutionError, runtime_detail

F = TensorProto.FLOAT


def invoke(*args):
    """Run the CLI in-process (quiet) and return click's Result."""
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def _vi(name, shape=(2, 3)):
    return helper.make_tensor_value_info(name, F, list(shape))


def _save(path, nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def test_nodes_out_of_topological_order_are_sorted_and_compile(tmp_path):
    # y = Relu(t) is listed before t = Neg(x), which produces its input
    path = _save(tmp_path / "m.onnx", [helper.make_node("Relu", ["t"], ["y"]),
                                       helper.make_node("Neg", ["x"], ["t"])],
                 [_vi("x")], [_vi("y")])
    out = tmp_path / "out"
    result = invoke("compile", path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fidelity"]["max_abs_error"] == 0.0
    x = np.array([[-2.0, -0.5, 0.0], [0.5, 1.0, 3.0]], np.float32)
    np.testing.assert_array_equal(run_artifact(out, {"x": x})["y"], np.maximum(-x, 0))


def test_a_cycle_is_one_sentence_from_the_loader(tmp_path):
    path = _save(tmp_path / "m.onnx", [helper.make_node("Add", ["x", "b"], ["a"]),
                                       helper.make_node("Relu", ["a"], ["b"]),
                                       helper.make_node("Relu", ["a"], ["y"])],
                 [_vi("x")], [_vi("y")])
    out = tmp_path / "out"
    result = invoke("analyze", path, "-o", out)  # analyze runs no ORT check: the loader refuses
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "the graph is not acyclic" in result.stderr
    assert not out.exists()


def test_run_accepts_an_overridable_initializer_as_an_optional_input(tmp_path):
    default = np.array([[1.0, -2.0, 3.0]] * 2, np.float32)
    path = _save(tmp_path / "m.onnx", [helper.make_node("Mul", ["x", "w"], ["y"])],
                 [_vi("x"), _vi("w")], [_vi("y")], [numpy_helper.from_array(default, "w")])
    out = tmp_path / "out"
    assert invoke("compile", path, "-o", out).exit_code == 0
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    w = np.full((2, 3), -0.5, np.float32)
    np.testing.assert_array_equal(run_artifact(out, {"x": x, "w": w})["y"], x * w)
    np.testing.assert_array_equal(run_artifact(out, {"x": x})["y"], x * default)
    np.savez(tmp_path / "feeds.npz", x=x, w=w)
    result = invoke("run", out, "--inputs", tmp_path / "feeds.npz", "-o", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["y"], x * w)
    with pytest.raises(ExecutionError, match=r"unknown input\(s\) v; the model takes x and "
                                             r"optionally w\."):
        run_artifact(out, {"x": x, "v": w})


RAW_ORT_MESSAGES = {
    "node-signature": (
        '[ONNXRuntimeError] : 10 : INVALID_GRAPH : This is an invalid model. In Node, ("f", '
        'FooBar, "", -1) : ("x": tensor(float),) -> ("y": tensor(float),) , Error No Op '
        'registered for FooBar with domain_version of 17',
        "This is an invalid model. In node 'f' (FooBar): No Op registered for FooBar with "
        "domain_version of 17"),
    "unnamed-node-signature": (
        'This is an invalid model. In Node, ("", FooBar, "", -1) : ("x": tensor(float),) -> '
        '("y": tensor(float),) , Error No Op registered for FooBar with domain_version of 17',
        "This is an invalid model. In an unnamed FooBar node: No Op registered for FooBar with "
        "domain_version of 17"),
    "template-and-failed-check": (
        "[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: /onnxruntime_src/"
        "onnxruntime/core/providers/cpu/math/element_wise_ops.h:256 onnxruntime::Div<T>::Div("
        "const onnxruntime::OpKernelInfo&) [with T = long int] b_data[i] != T{0} was false. "
        "Integer division by zero\n",
        "Exception during initialization: Integer division by zero"),
    "failed-check-without-message": (
        "/onnxruntime_src/onnxruntime/core/framework/x.cc:12 void onnxruntime::F<T>::g() "
        "[with T = float] shape.size() == 2 was false.\n",
        "an internal check of ONNX Runtime failed"),
    "file-without-folder-and-bare-function": (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Mod node. "
        "Name:'m' Status Message: element_wise_ops.cc:2256 operator() Integer modulo by zero",
        "Non-zero status code returned while running Mod node. Name:'m' Status Message: "
        "Integer modulo by zero"),
}


@pytest.mark.parametrize("case", list(RAW_ORT_MESSAGES))
def test_runtime_detail_keeps_the_gist_of_ort_messages(case):
    raw, cleaned = RAW_ORT_MESSAGES[case]
    assert runtime_detail(RuntimeError(raw)) == cleaned
