"""The `winnow` CLI end to end: compile, passes, inspect, run, and every bad-input path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import winnow
from winnow.backends.ort import run_artifact
from winnow.cli import cli
from winnow.ir.execute import run
from winnow.ir.inputs import random_feeds

BUILTIN_PASSES = {"shape-inference", "fold-constants", "canonicalize", "cse", "dce"}


def invoke(*args: str):
    """Run the CLI in-process (quiet) and return click's Result."""
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def test_compile_writes_an_artifact_matching_the_source(squeezenet_path, tmp_path):
    out = tmp_path / "out"
    result = invoke("compile", squeezenet_path, "-o", out, "--timings")
    assert result.exit_code == 0, result.output
    assert {"model.onnx", "model.ort", "manifest.json"} <= {p.name for p in out.iterdir()}
    text = result.stdout
    for needle in ("source", "pipeline  shape-inference,fold-constants", "nodes     105 -> ",
                   "params", "model.onnx", "model.ort", "manifest.json", "max abs error",
                   "seconds", "canonicalize"):
        assert needle in text
    source = winnow.load(squeezenet_path)
    feeds = random_feeds(source, seed=5)
    got, want = run_artifact(out, feeds), run(source, feeds)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_compile_json_and_overwrite(tiny_model_path, tmp_path):
    out = tmp_path / "out"
    first = invoke("compile", tiny_model_path, "-o", out, "--json", "--pipeline", "cse,dce")
    assert first.exit_code == 0, first.output
    info = json.loads(first.stdout)
    assert info["pipeline"] == "cse,dce" and info["nodes"]["before"] == 9
    assert info["nodes"]["after"] == 7 and info["fidelity"]["max_abs_error"] <= 1e-5
    assert info["files"]["model.onnx"] == (out / "model.onnx").stat().st_size
    again = invoke("compile", tiny_model_path, "-o", out, "--json", "--force-overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["pipeline"] == winnow.passes.DEFAULT_PIPELINE


def test_compile_with_config_file(tiny_external_model_path, tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text("pipeline: [fold-constants, {cse: {size_limit: 3}}, dce]\n")
    result = invoke("compile", tiny_external_model_path, "-o", tmp_path / "out", "--config",
                    config, "--dump-ir", tmp_path / "ir", "--verify-each")
    assert result.exit_code == 0, result.output
    assert "fold-constants,cse{size_limit=3},dce" in result.stdout
    assert (tmp_path / "ir" / "02-dce.after.txt").is_file()


def test_passes_lists_builtins_with_fields():
    result = invoke("passes", "--json")
    assert result.exit_code == 0, result.output
    info = {p["name"]: p for p in json.loads(result.stdout)}
    assert BUILTIN_PASSES <= set(info)
    assert all(info[name]["description"] for name in BUILTIN_PASSES)
    (field,) = info["cse"]["fields"]
    assert field["name"] == "size_limit" and field["type"] == "int" and field["default"] == 10
    assert field["help"]
    assert info["dce"]["fields"] == []
    text = invoke("passes").stdout
    assert "fold-constants" in text and "input_size_limit: int = 8192" in text


def test_inspect_reports_model_facts(squeezenet_path):
    result = invoke("inspect", squeezenet_path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["opset_imports"] == {"": 9}
    assert info["nodes"] == 105 and info["ops"]["Conv"] == 26
    assert info["outputs"] == [{"name": "softmaxout_1", "dtype": "float32",
                                "shape": [1, 1000, 1, 1]}]
    assert info["params"]["count"] > 0 and info["params"]["bytes"] >= 4 * info["params"]["count"]
    assert info["regions"]["blocks"] == []  # no residual adds in SqueezeNet
    text = invoke("inspect", squeezenet_path).stdout
    assert "ai.onnx:9" in text and "Conv" in text and "regions   0 blocks" in text


def test_inspect_lists_residual_blocks(onnx_test_data):
    resnet = onnx_test_data / "light" / "light_resnet50.onnx"
    info = json.loads(invoke("inspect", resnet, "--json").stdout)
    assert info["ops"]["Sum"] == 16 and len(info["regions"]["blocks"]) == 16
    assert "regions   16 blocks" in invoke("inspect", resnet).stdout


def test_run_prints_and_writes_outputs(tiny_model_path, tmp_path):
    out = tmp_path / "out"
    assert invoke("compile", tiny_model_path, "-o", out).exit_code == 0
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = invoke("run", out, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    assert "y  float32  [5, 8]" in result.stdout
    with np.load(tmp_path / "y.npz") as saved:
        np.testing.assert_array_equal(saved["y"], run_artifact(out, {"x": x})["y"])


def test_run_errors(tiny_model_path, tmp_path):
    np.savez(tmp_path / "wrong.npz", z=np.zeros(2, np.float32))
    missing = invoke("run", tmp_path, "--inputs", tmp_path / "wrong.npz")
    assert missing.exit_code == 2 and "manifest.json is missing" in missing.stderr
    assert invoke("compile", tiny_model_path, "-o", tmp_path / "out").exit_code == 0
    wrong = invoke("run", tmp_path / "out", "--inputs", tmp_path / "wrong.npz")
    assert wrong.exit_code == 2 and "missing input(s) x" in wrong.stderr
    (tmp_path / "bad.npz").write_text("not an npz")
    bad = invoke("run", tmp_path / "out", "--inputs", tmp_path / "bad.npz")
    assert bad.exit_code == 2 and "is not a readable .npz" in bad.stderr
    (tmp_path / "empty.npz").write_bytes(b"")
    empty = invoke("run", tmp_path / "out", "--inputs", tmp_path / "empty.npz", "-o", tmp_path / "y.npz")
    assert empty.exit_code == 2 and "is empty or truncated" in empty.stderr
    with open(tmp_path / "one.npz", "wb") as f:
        np.save(f, np.zeros((5, 16), np.float32))
    single = invoke("run", tmp_path / "out", "--inputs", tmp_path / "one.npz", "-o", tmp_path / "y.npz")
    assert single.exit_code == 2 and "holds a single array" in single.stderr
    assert not (tmp_path / "y.npz").exists()


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """Where a failing compile must not leave anything."""
    return tmp_path / "result"


BAD_INPUTS = {
    "missing": (lambda p: ["compile", p["tmp"] / "nope.onnx"], "does not exist"),
    "empty-folder": (lambda p: ["compile", p["empty"]], "is empty"),
    "truncated": (lambda p: ["compile", p["truncated"]], "is not a readable ONNX model"),
    "text-file": (lambda p: ["compile", p["text"]], "is not a readable ONNX model"),
    "escaping-data": (lambda p: ["compile", p["escaping"]], "outside the model's folder"),
    "unknown-pass": (lambda p: ["compile", p["tiny"], "--pipeline", "cse,nope"],
                     "unknown pass 'nope'; registered passes are: canonicalize, cse, "),
    "bad-value": (lambda p: ["compile", p["tiny"], "--pipeline", "cse{size_limit=abc}"],
                  "option 'size_limit' expects int; got 'abc'"),
    "bad-option": (lambda p: ["compile", p["tiny"], "--pipeline", "cse{nope=1}"],
                   "has no option 'nope'; its options are: size_limit"),
    "bad-backend": (lambda p: ["compile", p["tiny"], "--backend", "tvm"],
                    "valid backends are: ort"),
    "dump-in-out": (lambda p: ["compile", p["tiny"], "--dump-ir", p["tmp"] / "result" / "ir"],
                    "is inside the output folder"),
    "pipeline-and-config": (lambda p: ["compile", p["tiny"], "--pipeline", "cse", "--config",
                                       p["tmp"] / "p.yaml"], "either a pipeline or a pipeline"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_error(case, tmp_path, out_dir, tiny_model_path,
                                      truncated_model_path, text_onnx_path, escaping_model_path):
    (tmp_path / "empty").mkdir()
    paths = {"tmp": tmp_path, "empty": tmp_path / "empty", "truncated": truncated_model_path,
             "text": text_onnx_path, "escaping": escaping_model_path, "tiny": tiny_model_path}
    build, message = BAD_INPUTS[case]
    result = invoke(*build(paths), "-o", out_dir)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output
    assert not out_dir.exists()
    if case == "unknown-pass":
        assert all(name in result.stderr for name in BUILTIN_PASSES)


def test_unwritable_output_under_a_file(tiny_model_path, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / "out"
    result = invoke("compile", tiny_model_path, "-o", out)
    assert result.exit_code == 2
    assert "cannot create output folder" in result.stderr and "is a file, not a folder" in result.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_existing_output_without_force(tiny_model_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("compile", tiny_model_path, "-o", out)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert "--force-overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_debug_shows_traceback_and_internal_errors_exit_1(tmp_path, monkeypatch):
    result = invoke("--debug", "compile", tmp_path / "nope.onnx", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "Traceback" in result.stderr
    import winnow.compiler

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(winnow.compiler, "compile_model", broken)
    result = invoke("compile", tmp_path / "x.onnx", "-o", tmp_path / "o")
    assert result.exit_code == 1
    assert "internal error: RuntimeError: boom" in result.stderr and "Traceback" not in result.stderr


def test_python_dash_m_winnow(squeezenet_path, tmp_path):
    cmd = [sys.executable, "-m", "winnow", "--quiet", "compile", str(squeezenet_path), "-o",
           str(tmp_path / "out"), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"]["model.ort"] > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    assert "already exists" in again.stderr
