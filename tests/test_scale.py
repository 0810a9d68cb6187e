"""Models with external data: `winnow compile` keeps the weights in files end to end (load,
check, passes, save), the outputs stay equal, and a model past the .ort limit is still written.
The >2 GB case is bench/scale.py's (it needs GBs of disk and minutes)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from winnow.backends import ort as ort_backend
from winnow.backends.ort import run_artifact
from winnow.cli import cli
from winnow.frontend import load
from winnow.ir import execute
from winnow.ir.execute import external_folder, run
from winnow.passes.manager import DEFAULT_PIPELINE, PassContext, PassManager
from winnow.tests.llama_like import LlamaShape, build_llama

SMALL = LlamaShape(hidden=128, layers=2, heads=4, intermediate=352, vocab=1024, max_seq=16)
TOKENS = {"input_ids": np.array([[3, 141, 59, 26, 535, 89, 79, 323]], dtype=np.int64)}


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """A ~2.7 MB decoder whose tensors of 1 kB and more lie in model.onnx.data."""
    return build_llama(tmp_path_factory.mktemp("llama") / "model.onnx", SMALL, seed=1)


def _source_outputs(path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, TOKENS)[0]


def _external_names(path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {t.name for t in proto.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def test_external_data_model_round_trips_through_compile(llama_path, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["--quiet", "compile", str(llama_path), "-o", str(out),
                                      "--verify-each"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "model.onnx.data" in manifest["files"]
    weights = {f"layers.{i}.{n}" for i in range(SMALL.layers)
               for n in ("attn.q_proj", "mlp.down_proj")} | {"embed_tokens", "lm_head"}
    assert weights <= _external_names(out / "model.onnx")
    assert (out / "model.onnx").stat().st_size < 64 * 1024  # the graph only, no weights inline
    assert manifest["fidelity"]["max_abs_error"] <= 1e-5
    got = run_artifact(out, TOKENS)["logits"]
    want = _source_outputs(llama_path)
    assert got.shape == (1, 8, SMALL.vocab)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_check_and_passes_leave_weights_in_their_files(llama_path):
    model = load(llama_path)
    before = run(model, TOKENS)["logits"]
    model = PassManager(DEFAULT_PIPELINE).run(model, PassContext()).model
    after = run(model, TOKENS)["logits"]
    big = [v.const_value for v in model.graph.initializers.values()
           if v.const_value is not None and v.const_value.nbytes >= 1024]
    assert big and all(isinstance(t, ir.ExternalTensor) for t in big)
    assert external_folder(model) == str(llama_path.parent)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(before, _source_outputs(llama_path), rtol=1e-5, atol=1e-5)


def _transposed_weight_model(path, external: bool):
    """y = x @ w.T with w (128 x 128, above fold-constants' input limit) as an initializer."""
    weight = np.arange(128 * 128, dtype=np.float32).reshape(128, 128) / 1e4
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         onnx.helper.make_node("MatMul", ["x", "wt"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 128])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 128])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)],
                                   ir_version=10)
    onnx.save(model, path, save_as_external_data=external, location="t.data", size_threshold=1024)
    return weight


@pytest.mark.parametrize("external", [True, False])
def test_fold_constants_keeps_a_large_external_weight_on_disk(tmp_path, external):
    weight = _transposed_weight_model(tmp_path / "t.onnx", external)
    model = PassManager(DEFAULT_PIPELINE).run(load(tmp_path / "t.onnx"), PassContext()).model
    ops = [n.op_type for n in model.graph]
    if external:  # folding would pull the weight into memory: it stays a file-backed input
        assert ops == ["Transpose", "MatMul"]
        assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    else:  # in memory already: onnxscript folds the single-use Transpose
        assert ops == ["MatMul"]
    x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(2, 128)
    np.testing.assert_allclose(run(model, {"x": x})["y"], x @ weight.T, rtol=1e-5, atol=1e-5)


def test_a_model_past_the_ort_format_limit_is_written_without_model_ort(llama_path, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(ort_backend, "ORT_FORMAT_LIMIT", 1024**2)  # the 2.7 MB model is "past" it
    model = load(llama_path)
    art = ort_backend.emit(model, tmp_path / "out", pipeline_text="")
    assert "model.ort" not in art.manifest["files"] and not (art.path / "model.ort").exists()
    assert "2 GiB" in art.manifest["ort_format"]["error"]
    np.testing.assert_allclose(run_artifact(art.path, TOKENS)["logits"],
                               _source_outputs(llama_path), rtol=1e-5, atol=1e-5)


def test_large_in_memory_weights_go_to_ort_as_arrays(llama_path, monkeypatch):
    monkeypatch.setattr(execute, "LARGE_MODEL_BYTES", 0)  # treat the 2.7 MB model as large
    monkeypatch.setattr(execute, "HAND_OVER_BYTES", 64 * 1024)
    model = load(llama_path)
    ir.external_data.load_to_model(model)  # every weight in memory, as from a torch source
    head = model.graph.initializers["lm_head"]
    tensor = head.const_value
    assert {"embed_tokens", "lm_head"} <= set(execute._handed_over(model))
    want = _source_outputs(llama_path)
    np.testing.assert_allclose(run(model, TOKENS)["logits"], want, rtol=1e-5, atol=1e-5)
    assert head.const_value is tensor  # the placeholders are gone again
    head.const_value = ir.tensor(tensor.numpy() * 2, name="lm_head")  # same graph, new weights
    np.testing.assert_allclose(run(model, TOKENS)["logits"], 2 * want, rtol=1e-5, atol=1e-5)
