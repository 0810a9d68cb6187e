"""The ORT backend (emit, manifest, atomic writes, run_artifact) and the compile API."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import winnow
from winnow.backends import ort as ort_backend
from winnow.backends.ort import emit, load_artifact, run_artifact
from winnow.driver.compile import compare_outputs, compile_model
from winnow.errors import (
    ExecutionError,
    ModelFormatError,
    OutputError,
    PipelineError,
    SourceError,
    WinnowError,
)
from winnow.ir.execute import run
from winnow.ir.inputs import random_feeds
from winnow.passes import PassSpec


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _feeds(batch: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).standard_normal((batch, 16)).astype(np.float32)}


def test_emit_writes_files_and_manifest(tiny_model, tmp_path):
    fidelity = {"max_abs_error": 0.0}
    art = emit(tiny_model, tmp_path / "out", pipeline_text="cse,dce", fidelity=fidelity,
               source="tiny.onnx")
    assert art.path == tmp_path / "out"
    assert sorted(p.name for p in art.path.iterdir()) == sorted(art.files)
    assert {"model.onnx", "model.ort", "manifest.json"} <= set(art.files)
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest == art.manifest
    assert manifest["format"] == "winnow-artifact" and manifest["backend"] == "ort"
    assert manifest["pipeline"] == "cse,dce" and manifest["source"] == "tiny.onnx"
    assert manifest["winnow_version"] == winnow.__version__
    assert manifest["onnxruntime_version"] == ort.__version__
    assert manifest["fidelity"] == fidelity
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    assert manifest["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 8]}]
    assert manifest["params"] == {"count": 16 * 8 + 8, "bytes": (16 * 8 + 8) * 4}
    assert manifest["ort_format"]["file"] == "model.ort" and manifest["ort_format"]["error"] is None
    assert "manifest.json" not in manifest["files"]
    for name, entry in manifest["files"].items():
        data = (art.path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert _leftovers(tmp_path) == []


def test_run_artifact_equals_ir_outputs(tiny_model, tmp_path):
    art = emit(tiny_model, tmp_path / "out", pipeline_text="")
    feeds = _feeds()
    got = run_artifact(art.path, feeds)
    want = run(tiny_model, feeds)
    assert list(got) == ["y"] and got["y"].shape == (3, 8)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-6)


def test_ort_file_loads_and_runs(tiny_model, tmp_path):
    art = emit(tiny_model, tmp_path / "out", pipeline_text="")
    session = ort.InferenceSession(str(art.path / "model.ort"), providers=["CPUExecutionProvider"])
    feeds = _feeds(2)
    (y,) = session.run(None, feeds)
    np.testing.assert_allclose(y, run(tiny_model, feeds)["y"], rtol=1e-5, atol=1e-6)


def test_external_data_file_is_written_and_used(tiny_model, tmp_path):
    art = emit(tiny_model, tmp_path / "out", pipeline_text="", external_data=True)
    assert "model.onnx.data" in art.manifest["files"]
    assert (art.path / "model.onnx.data").stat().st_size >= 16 * 8 * 4
    feeds = _feeds()
    np.testing.assert_allclose(run_artifact(art.path, feeds)["y"], run(tiny_model, feeds)["y"],
                               rtol=1e-5, atol=1e-6)


def test_ort_conversion_failure_is_recorded_not_raised(unknown_op_model, tmp_path):
    art = emit(unknown_op_model, tmp_path / "out", pipeline_text="")
    assert art.manifest["ort_format"]["file"] is None
    assert "Frobnicate" in art.manifest["ort_format"]["error"]
    assert not (art.path / "model.ort").exists()
    assert set(art.manifest["files"]) == {"model.onnx"}


def _unsaveable_model(tiny_model: ir.Model, tmp_path: Path) -> ir.Model:
    tensor = ir.ExternalTensor("missing.bin", 0, 8, ir.DataType.FLOAT, shape=ir.Shape([2]),
                               name="w", base_dir=tmp_path)
    tiny_model.graph.initializers["w"].const_value = tensor
    return tiny_model


def test_failed_emit_leaves_nothing_behind(tiny_model, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(Exception, match="missing.bin|No such file"):
        emit(_unsaveable_model(tiny_model, tmp_path), out, pipeline_text="")
    assert not out.exists() and not (tmp_path / "a").exists()
    assert _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_previous_artifact(tiny_model, tmp_path):
    out = tmp_path / "out"
    first = emit(tiny_model, out, pipeline_text="first")
    with pytest.raises(Exception, match="missing.bin|No such file"):
        emit(_unsaveable_model(tiny_model, tmp_path), out, pipeline_text="second", overwrite=True)
    assert load_artifact(out).manifest == first.manifest
    assert _leftovers(tmp_path) == []


def test_converter_bug_propagates_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("unexpected keyword argument")

    import onnxruntime.tools.convert_onnx_models_to_ort as converter  # the backend imports it late

    monkeypatch.setattr(converter, "convert_onnx_models_to_ort", broken)
    with pytest.raises(TypeError):
        emit(tiny_model, tmp_path / "out", pipeline_text="")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_model, tmp_path):
    out = tmp_path / "out"
    emit(tiny_model, out, pipeline_text="first")
    with pytest.raises(OutputError, match="already exists.*--force-overwrite"):
        emit(tiny_model, out, pipeline_text="second")
    emit(tiny_model, out, pipeline_text="second", overwrite=True)
    assert load_artifact(out).manifest["pipeline"] == "second"
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_folders_that_are_not_artifacts(tiny_model, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not a winnow artifact"):
        emit(tiny_model, tmp_path / "home", pipeline_text="", overwrite=True)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_output_under_a_regular_file(tiny_model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="'.*file' is a file, not a folder"):
        emit(tiny_model, tmp_path / "file" / "out", pipeline_text="")


def test_load_artifact_errors(tiny_model, tmp_path):
    with pytest.raises(SourceError, match="manifest.json is missing"):
        load_artifact(tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        run_artifact(tmp_path / "nowhere", {})
    art = emit(tiny_model, tmp_path / "out", pipeline_text="")
    with pytest.raises(ExecutionError, match="missing input.*x"):
        run_artifact(art.path, {})
    with pytest.raises(ExecutionError, match="unknown input.*z"):
        run_artifact(art.path, {**_feeds(), "z": np.zeros(1)})
    with open(art.path / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelFormatError, match="'model.onnx'.*does not match its manifest checksum"):
        run_artifact(art.path, _feeds())


def test_compile_removes_redundancy_and_keeps_outputs(tiny_model_path, tmp_path):
    result = compile_model(tiny_model_path, tmp_path / "out", timings=True)
    assert result.nodes_before == 9 and result.nodes_after < 6
    assert result.fidelity["max_abs_error"] <= 1e-5 and result.fidelity["min_cosine"] > 0.99999
    assert result.artifact.manifest["fidelity"] == result.fidelity
    assert [r[0] for r in result.timings] == result.pipeline.split(",")
    assert "total" in result.timing_table()
    feeds = random_feeds(winnow.load(tiny_model_path), seed=3)
    np.testing.assert_allclose(run_artifact(result.artifact.path, feeds)["y"],
                               run(winnow.load(tiny_model_path), feeds)["y"], rtol=1e-5, atol=1e-5)


def test_compile_pipeline_forms(tiny_model_path, tmp_path):
    specs = [PassSpec("cse", (("size_limit", "4"),)), PassSpec("dce")]
    assert compile_model(tiny_model_path, tmp_path / "a", pipeline=specs).pipeline == \
        "cse{size_limit=4},dce"
    config = tmp_path / "p.yaml"
    config.write_text("pipeline:\n  - fold-constants\n  - cse: {size_limit: 2}\n")
    result = compile_model(tiny_model_path, tmp_path / "b", config=config, dump_ir=tmp_path / "ir",
                           verify_each=True)
    assert result.pipeline == "fold-constants,cse{size_limit=2}"
    assert sorted(p.name for p in (tmp_path / "ir").iterdir())[0] == "00-fold-constants.after.txt"
    with pytest.raises(PipelineError, match="either a pipeline or a pipeline config"):
        compile_model(tiny_model_path, tmp_path / "c", pipeline="cse", config=config)
    assert not (tmp_path / "c").exists()


def test_compile_unknown_backend_lists_valid_ones(tiny_model_path, tmp_path):
    with pytest.raises(WinnowError, match="unknown backend 'coreml'; valid backends are: ort, tvm"):
        compile_model(tiny_model_path, tmp_path / "out", backend="coreml")
    assert not (tmp_path / "out").exists()


def test_compile_without_check_and_unloadable_source(unknown_op_model_path, tmp_path):
    path = unknown_op_model_path
    with pytest.raises(ExecutionError, match="source model does not load.*--no-check"):
        compile_model(path, tmp_path / "out", pipeline="dce")
    assert not (tmp_path / "out").exists()
    result = compile_model(path, tmp_path / "out", pipeline="dce", check=False)
    assert result.fidelity is None and result.artifact.manifest["fidelity"] is None


def test_compile_records_unmeasurable_fidelity(onnx_test_data, tmp_path):
    # Its input is the target shape of an Expand: random values are not a valid shape.
    path = onnx_test_data / "simple" / "test_expand_shape_model1" / "model.onnx"
    result = compile_model(path, tmp_path / "out")
    assert result.fidelity["measured"] is False
    assert "does not run on the generated check inputs" in result.fidelity["reason"]
    assert result.artifact.manifest["fidelity"] == result.fidelity


def test_compare_outputs_measures_differences():
    ref = {"a": np.array([1.0, 2.0, np.nan], np.float32), "b": np.array([[1, 0]]),
           "c": np.array(["x"]), "d": np.array([np.inf, 1.0])}
    got = {"renamed": np.array([1.0, 2.5, np.nan], np.float32), "b": np.array([[0, 1]]),
           "c": np.array(["x"]), "d": np.array([np.inf, np.nan])}
    fid = compare_outputs(ref, got)
    a, b, c, d = (fid["outputs"][k] for k in "abcd")
    assert a["max_abs_error"] == pytest.approx(0.5)
    assert a["cosine"] == pytest.approx(6 / np.sqrt(5 * 7.25))
    assert b == {"max_abs_error": 1.0, "cosine": 0.0}
    assert c == {"equal": True}
    assert d["max_abs_error"] == float("inf")
    assert fid["max_abs_error"] == float("inf") and fid["min_cosine"] == 0.0
    assert "shape [2] after the passes, [3] before" in compare_outputs(
        {"a": np.zeros(3)}, {"a": np.zeros(2)})["outputs"]["a"]["error"]
    assert "1 outputs after the passes, 2 before" in compare_outputs(
        {"a": np.zeros(1), "b": np.zeros(1)}, {"a": np.zeros(1)})["error"]


@pytest.mark.slow
def test_compile_torch_module_checks_on_its_example_inputs(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                 torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    result = compile_model(module, tmp_path / "out", example_inputs=(x,))
    assert result.fidelity["feeds"] == "example" and result.fidelity["max_abs_error"] <= 1e-5
    (name,) = [v["name"] for v in result.artifact.manifest["inputs"]]
    (y,) = run_artifact(result.artifact.path, {name: x.numpy()}).values()
    np.testing.assert_allclose(y, module(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert result.to_dict()["files"]["manifest.json"] > 0
