"""Shared fixtures: tiny hand-built ONNX models, shipped onnx test models and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

ONNX_TEST_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
SQUEEZENET = ONNX_TEST_DATA / "light" / "light_squeezenet.onnx"


def make_tiny_model() -> onnx.ModelProto:
    """y = Identity((x@w + x@w + b) * (1.5*1.5)) with a dead Relu: every built-in pass has work."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(1.5))),
        helper.make_node("Mul", ["c", "c"], ["c2"]),
        helper.make_node("MatMul", ["x", "w"], ["m1"]),
        helper.make_node("MatMul", ["x", "w"], ["m2"]),
        helper.make_node("Add", ["m1", "m2"], ["s"]),
        helper.make_node("Add", ["s", "b"], ["t"]),
        helper.make_node("Mul", ["t", "c2"], ["u"]),
        helper.make_node("Identity", ["u"], ["y"]),
        helper.make_node("Relu", ["x"], ["dead"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def make_unknown_op_model() -> onnx.ModelProto:
    """A valid model whose only node is a custom-domain op ONNX Runtime does not know."""
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node], "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, ir_version=8, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


@pytest.fixture
def tiny_model_path(tmp_path: Path) -> Path:
    """The tiny redundant model saved as `tmp/tiny/tiny.onnx`."""
    path = tmp_path / "tiny" / "tiny.onnx"
    path.parent.mkdir()
    onnx.save(make_tiny_model(), path)
    return path


@pytest.fixture
def tiny_external_model_path(tmp_path: Path) -> Path:
    """The tiny model with its weights in `tiny.data` next to `tmp/ext/tiny.onnx`."""
    path = tmp_path / "ext" / "tiny.onnx"
    path.parent.mkdir()
    onnx.save(make_tiny_model(), path, save_as_external_data=True, location="tiny.data",
              size_threshold=0)
    return path


@pytest.fixture
def tiny_model() -> ir.Model:
    """The tiny redundant model in the IR."""
    return ir.serde.deserialize_model(make_tiny_model())


@pytest.fixture
def unknown_op_model_path(tmp_path: Path) -> Path:
    """A valid model with an op ONNX Runtime does not know, saved as `tmp/custom.onnx`."""
    path = tmp_path / "custom.onnx"
    onnx.save(make_unknown_op_model(), path)
    return path


@pytest.fixture
def unknown_op_model() -> ir.Model:
    """A valid model with an op ONNX Runtime does not know, in the IR."""
    return ir.serde.deserialize_model(make_unknown_op_model())


@pytest.fixture
def onnx_test_data() -> Path:
    """The folder of test models shipped with the onnx package."""
    return ONNX_TEST_DATA


@pytest.fixture
def squeezenet_path() -> Path:
    """A real model shipped with the onnx package (105 nodes, opset 9)."""
    assert SQUEEZENET.is_file(), f"onnx test model missing: {SQUEEZENET}"
    return SQUEEZENET


@pytest.fixture
def truncated_model_path(tmp_path: Path) -> Path:
    """The first half of a real model's bytes."""
    data = SQUEEZENET.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def text_onnx_path(tmp_path: Path) -> Path:
    """A text file named .onnx."""
    path = tmp_path / "notes.onnx"
    path.write_text("these are my notes, not a model\n")
    return path


@pytest.fixture
def escaping_model_path(tmp_path: Path) -> Path:
    """A model whose initializer's external data sits at '../evil.bin', outside its folder."""
    (tmp_path / "evil.bin").write_bytes(np.ones(4, np.float32).tobytes())
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../evil.bin"), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "evil",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "model" / "evil.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    return path


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the ONNX round-trip counts (passed / skipped with reason) at the end of the run."""
    from tests.onnx_corpus import OUTCOMES, SKIP_REASONS

    if not OUTCOMES:
        return
    passed = {k: v for k, v in OUTCOMES.items() if k.startswith("passed")}
    terminalreporter.write_sep("-", "onnx-shipped model round trip (default pipeline + ORT backend)")
    terminalreporter.write_line(
        f"attempted {OUTCOMES['attempted']}, passed {sum(passed.values())} "
        f"({', '.join(f'{v} {k}' for k, v in sorted(passed.items()))}), skipped {OUTCOMES['skipped']}")
    for reason, count in SKIP_REASONS.most_common():
        terminalreporter.write_line(f"  skipped {count}: {reason}")


@pytest.fixture
def peers_script():
    """bench/peers.py as a module (bench/ on the path while it imports its siblings)."""
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench"
    spec = importlib.util.spec_from_file_location("peers_script", bench / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    sys.path.insert(0, str(bench))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module
