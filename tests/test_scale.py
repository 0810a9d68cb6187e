"""Models with external data: `winnow compile` keeps the weights in files end to end (load,
check, passes, save), the outputs stay equal, drop-layers works on them within bounded memory,
and a model past the .ort limit is still written. The real >2 GB model (generated under tmp:
~4.5 GB of disk, minutes) runs with WINNOW_BIG_TEST=1; bench/scale.py goes up to 5 GB."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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
from winnow.ir.linear_adapter import fit_adapter, fit_and_apply
from winnow.ir.regions import find_regions
from winnow.passes.analysis import layer_similarity
from winnow.passes.analysis.layer_similarity import pair_groups, score_regions
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


def _zeroed_copy(path, folder, names):
    """A copy of the model whose external tensors `names` are all zeros (in a copied data file)."""
    folder.mkdir()
    proto = onnx.load(str(path), load_external_data=False)
    shutil.copy(path, folder / path.name)
    data = folder / (path.name + ".data")
    shutil.copy(path.with_name(path.name + ".data"), data)
    with open(data, "r+b") as f:
        for tensor in proto.graph.initializer:
            if tensor.name in names:
                fields = {e.key: e.value for e in tensor.external_data}
                f.seek(int(fields["offset"]))
                f.write(bytes(int(fields["length"])))
    return folder / path.name


def test_drop_layers_keeps_weights_in_files_and_equals_the_source_with_that_block_zeroed(
        llama_path, tmp_path):
    """Identity in place of block i is the source with block i's two output projections zeroed
    (x + 0 + 0): an oracle that needs no winnow."""
    model = load(llama_path)
    ctx = PassContext(calibration=[TOKENS])
    model = PassManager("drop-layers{count=1}").run(model, ctx).model
    (name,) = ctx.report["drop-layers"]["dropped"]
    layer = int(name.removeprefix("block"))
    names = {v.name: v.const_value for v in model.graph.initializers.values()}
    assert not [n for n in names if n.startswith(f"layers.{layer}.")]
    assert {f"layers.{1 - layer}.attn.q_proj", "embed_tokens", "lm_head"} <= set(names)
    assert all(isinstance(t, ir.ExternalTensor) for t in names.values() if t.nbytes >= 1024)
    oracle = _zeroed_copy(llama_path, tmp_path / "zeroed",
                          {f"layers.{layer}.attn.o_proj", f"layers.{layer}.mlp.down_proj"})
    np.testing.assert_allclose(run(model, TOKENS)["logits"], _source_outputs(oracle),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(_source_outputs(oracle), _source_outputs(llama_path), atol=1e-3)


def test_layer_similarity_of_a_large_model_is_measured_group_by_group(llama_path, monkeypatch):
    model = load(llama_path)
    regions = find_regions(model).all()
    batches = [TOKENS, {"input_ids": TOKENS["input_ids"][:, ::-1].copy()}]
    at_once = score_regions(model, regions, batches)
    pairs = sorted({(r.skip.name, r.exit.name) for r in regions if r.skip is not None})
    assert pair_groups(model, batches, pairs) == [pairs]  # a small model: one pass
    monkeypatch.setattr(layer_similarity, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setattr(layer_similarity, "ACTIVATION_BUDGET", 1)  # one pair per pass
    assert pair_groups(model, batches, pairs) == [[pair] for pair in pairs]
    grouped = score_regions(model, regions, batches)
    assert len(pairs) == 6 and list(grouped) == list(at_once)
    for name, row in at_once.items():
        assert row["measurable"] and grouped[name]["vectors"] == row["vectors"] == 16
        for key in ("cos", "angular", "linear_cos"):
            assert grouped[name][key] == pytest.approx(row[key], abs=1e-12)


@pytest.mark.parametrize("rows", [24, 400])
def test_adapter_fit_with_fewer_vectors_than_features_is_the_same_ridge_fit(rows):
    """Fewer calibration vectors than features (a 1B model's width) solve the n x n system;
    the weights, and the predictions made without forming them, are the textbook ridge
    solution's either way."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, 64))
    y = x + np.tanh(x @ rng.standard_normal((64, 64)) / 8)
    adapter = fit_adapter(x, y, ridge=1e-2)
    xc, dc = x - x.mean(0), (y - x) - (y - x).mean(0)
    lam = 1e-2 * np.trace(xc.T @ xc) / 64
    want = np.linalg.solve(xc.T @ xc + lam * np.eye(64), xc.T @ dc)
    np.testing.assert_allclose(adapter.weight, want, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(adapter.apply(x), x + xc @ want + (y - x).mean(0), atol=1e-9)
    new_x = rng.standard_normal((5, 64))
    np.testing.assert_allclose(fit_and_apply(x, y, new_x),
                               new_x + (new_x - x.mean(0)) @ want + (y - x).mean(0), atol=1e-9)


# A 2-layer decoder with a 256k vocabulary: 2.21 GB of weights (past the 2 GiB protobuf and .ort
# limits) in few nodes, so the compile's time is the weights' and not the graph's.
PAST_2GB = LlamaShape(hidden=1024, layers=2, heads=8, intermediate=2816, vocab=256_000,
                      max_seq=16)


def _compile_in_a_child(source, out, log, *options) -> tuple[int, int]:
    """`winnow compile` in a fresh process: its exit code and peak RSS in bytes (wait4)."""
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "winnow", "--quiet", "compile",
                                 str(source), "-o", str(out), *options],
                                stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("WINNOW_BIG_TEST") != "1",
                    reason="writes ~4.5 GB under tmp and takes minutes (WINNOW_BIG_TEST=1)")
def test_a_model_past_2gb_loads_compiles_and_emits_ort_artifacts(tmp_path):
    (tmp_path / "big").mkdir()
    source = build_llama(tmp_path / "big" / "model.onnx", PAST_2GB, seed=2)
    weights = PAST_2GB.weight_bytes()
    assert weights > 2**31
    model = load(source)
    assert sum(t.const_value.nbytes for t in model.graph.initializers.values()) >= weights
    del model
    want = _source_outputs(source)
    for pipeline, lossless in (("shape-inference,fold-constants,canonicalize,cse,dce", True),
                               ("drop-layers{count=1}", False)):
        out = tmp_path / "out"
        log = tmp_path / "log.txt"
        code, peak = _compile_in_a_child(source, out, log, "--pipeline", pipeline,
                                         "--max-drop", "1", "--force-overwrite")
        assert code == 0, log.read_text()
        assert peak <= 3 * weights, f"peak RSS {peak / 1e9:.2f} GB"
        manifest = json.loads((out / "manifest.json").read_text())
        assert "model.ort" not in manifest["files"] and not (out / "model.ort").exists()
        assert "2 GiB" in manifest["ort_format"]["error"]
        assert {"model.onnx", "model.onnx.data"} <= set(manifest["files"])
        assert (out / "model.onnx").stat().st_size < 1024**2
        got = run_artifact(out, TOKENS)["logits"]
        assert got.shape == want.shape == (1, 8, PAST_2GB.vocab)
        if lossless:
            assert manifest["fidelity"]["max_abs_error"] <= 1e-5
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert manifest["passes"][0]["report"]["count"] == 1
            assert (out / "model.onnx.data").stat().st_size < weights - 10 * 1024**2
