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
    assert json.loads(again.stdout)["pipeline"] == winnow.passes.LOSSLESS_PIPELINE


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
    assert wrong.exit_code == 2 and "unknown input(s) z; the model takes x" in wrong.stderr
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
                     "unknown pass 'nope'; registered passes are: "),
    "bad-value": (lambda p: ["compile", p["tiny"], "--pipeline", "cse{size_limit=abc}"],
                  "option 'size_limit' expects int; got 'abc'"),
    "bad-option": (lambda p: ["compile", p["tiny"], "--pipeline", "cse{nope=1}"],
                   "has no option 'nope'; its options are: size_limit"),
    "bad-backend": (lambda p: ["compile", p["tiny"], "--backend", "coreml"],
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
    for extra in ((), ("--force-overwrite",)):  # no advice that the flag would then refuse
        result = invoke("compile", tiny_model_path, "-o", out, *extra)
        assert result.exit_code == 2 and "is not a winnow artifact" in result.stderr
        assert "--force-overwrite" not in result.stderr and "overwrite=True" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_debug_shows_traceback_and_internal_errors_exit_1(tmp_path, monkeypatch):
    result = invoke("--debug", "compile", tmp_path / "nope.onnx", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "Traceback" in result.stderr
    import winnow.driver.compile

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(winnow.driver.compile, "compile_model", broken)
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
    assert again.returncode == 2 and again.stderr == ""  # --json: the error is JSON on stdout
    assert "already exists" in json.loads(again.stdout)["error"]["message"]


def test_existing_artifact_names_the_flag_not_the_python_argument(tiny_model_path, tmp_path):
    out = tmp_path / "out"
    assert invoke("compile", tiny_model_path, "-o", out).exit_code == 0
    again = invoke("compile", tiny_model_path, "-o", out)
    assert again.exit_code == 2
    assert again.stderr == (f"error: output folder '{out}' already exists (an earlier winnow "
                            "compile artifact); pass --force-overwrite to replace it, or choose "
                            "another path.\n")
    from winnow.errors import OutputError

    with pytest.raises(OutputError, match=r"pass overwrite=True \(--force-overwrite"):
        winnow.compile(tiny_model_path, out)


def test_existing_file_is_refused_without_advice(tiny_model_path, tmp_path):
    (tmp_path / "out").write_text("mine")
    for extra in ((), ("--force-overwrite",)):
        result = invoke("compile", tiny_model_path, "-o", tmp_path / "out", *extra)
        assert result.exit_code == 2 and "exists and is not a folder" in result.stderr
        assert "--force-overwrite" not in result.stderr
    assert (tmp_path / "out").read_text() == "mine"


def test_force_overwrite_replaces_only_an_output_of_the_same_kind(tiny_model_path, tmp_path):
    report, artifact = tmp_path / "report", tmp_path / "artifact"
    assert invoke("analyze", tiny_model_path, "-o", report, "--passes",
                  "layer-similarity").exit_code == 0
    assert invoke("compile", tiny_model_path, "-o", artifact).exit_code == 0
    before = sorted(p.name for p in report.iterdir())
    result = invoke("compile", tiny_model_path, "-o", report, "--force-overwrite")
    assert result.exit_code == 2
    assert "holds a winnow analyze report, not a winnow compile artifact" in result.stderr
    assert sorted(p.name for p in report.iterdir()) == before
    result = invoke("analyze", tiny_model_path, "-o", artifact, "--force-overwrite")
    assert result.exit_code == 2
    assert "holds a winnow compile artifact, not a winnow analyze report" in result.stderr
    assert (artifact / "model.onnx").is_file()


def test_dump_ir_replaces_an_earlier_runs_dumps_and_refuses_other_files(tiny_model_path,
                                                                       tmp_path):
    dumps = tmp_path / "ir"
    first = invoke("compile", tiny_model_path, "-o", tmp_path / "a", "--dump-ir", dumps,
                   "--pipeline", "cse,dce,fold-constants")
    assert first.exit_code == 0, first.output
    assert len(list(dumps.iterdir())) == 6
    second = invoke("compile", tiny_model_path, "-o", tmp_path / "b", "--dump-ir", dumps,
                    "--pipeline", "dce")
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in dumps.iterdir()) == ["00-dce.after.txt", "00-dce.before.txt"]
    (dumps / "notes.md").write_text("mine")
    third = invoke("compile", tiny_model_path, "-o", tmp_path / "c", "--dump-ir", dumps)
    assert third.exit_code == 2 and "holds files that are not IR dumps (notes.md)" in third.stderr
    assert (dumps / "notes.md").read_text() == "mine" and not (tmp_path / "c").exists()


def test_debug_and_quiet_after_the_subcommand_and_version(tmp_path):
    runner = CliRunner()
    late = runner.invoke(cli, ["compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o"),
                               "--quiet", "--debug"])
    assert late.exit_code == 2 and "Traceback" in late.stderr and "does not exist" in late.stderr
    version = runner.invoke(cli, ["--version"])
    assert version.exit_code == 0 and version.stdout == f"winnow {winnow.__version__}\n"


def test_json_errors_are_a_json_object_with_the_same_exit_code(tmp_path, monkeypatch):
    result = invoke("compile", tmp_path / "nope.onnx", "-o", tmp_path / "o", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "SourceError" and "does not exist" in error["message"]
    assert error["exit_code"] == 2 and error["internal"] is False
    usage = invoke("inspect", "--json")
    assert usage.exit_code == 2 and json.loads(usage.stdout)["error"]["message"] == (
        "Missing argument 'SRC'.")
    import winnow.driver.compile

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(winnow.driver.compile, "compile_model", broken)
    internal = invoke("compile", tmp_path / "x.onnx", "-o", tmp_path / "o", "--json")
    assert internal.exit_code == 1 and json.loads(internal.stdout)["error"]["internal"] is True


def test_a_closed_pipe_ends_quietly(squeezenet_path):
    proc = subprocess.Popen([sys.executable, "-m", "winnow", "inspect", str(squeezenet_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` that has read enough
    _, err = proc.communicate(timeout=300)
    assert err.decode() == "" and proc.returncode == 1


def test_bench_on_a_file_says_what_it_is_and_what_bench_expects(tiny_model_path):
    result = invoke("bench", tiny_model_path)
    assert result.exit_code == 2
    assert f"'{tiny_model_path}' is a file, not an artifact folder" in result.stderr
    assert f"winnow compile {tiny_model_path} -o OUT" in result.stderr


def test_run_with_a_wrong_shape_keeps_which_input_and_dimension(tiny_model_path, tmp_path):
    assert invoke("compile", tiny_model_path, "-o", tmp_path / "out").exit_code == 0
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 15), np.float32))
    result = invoke("run", tmp_path / "out", "--inputs", tmp_path / "in.npz")
    assert result.exit_code == 2
    assert "input: x" in result.stderr and "index: 1 Got: 15 Expected: 16" in result.stderr


def test_run_output_and_zoo_export_have_the_usual_file_mode(tiny_model_path, tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        assert invoke("compile", tiny_model_path, "-o", tmp_path / "out").exit_code == 0
        np.savez(tmp_path / "in.npz", x=np.zeros((2, 16), np.float32))
        assert invoke("run", tmp_path / "out", "--inputs", tmp_path / "in.npz", "-o",
                      tmp_path / "y.npz").exit_code == 0
        export = invoke("zoo", "export", "onnx:light_squeezenet", "-o", tmp_path / "sq.onnx")
    finally:
        os.umask(mask)
    assert export.exit_code == 0, export.output
    assert "inputs data_0 [1, 3, 224, 224])" in export.stdout
    assert (tmp_path / "y.npz").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "sq.onnx").stat().st_mode & 0o777 == 0o644


def test_zoo_export_prints_symbolic_dims_by_name():
    from onnx_ir import Shape, SymbolicDim

    from winnow.models_zoo.cli import shape_text

    assert shape_text(Shape([SymbolicDim("batch"), 1, 8, 8])) == "[batch, 1, 8, 8]"
    assert shape_text(Shape([None, 3])) == "[?, 3]" and shape_text(None) == "?"


def test_pipelines_print_back_every_option_given():
    from winnow.passes import PassManager

    text = "das-skip{steps=200},drop-layers{count=1,replacement=identity},cse"
    assert PassManager(text).text == text
    assert PassManager("canonicalize{max_iterations=10}").text == "canonicalize{max_iterations=10}"


def test_pass_manager_honours_a_surrounding_context_and_mixed_lists(tiny_model_path):
    from winnow.passes import Pass, PassContext, PassManager, PassResult
    from winnow.passes.base import get_pass_class

    seen = []

    class Probe(Pass):
        """Records the context it runs under."""

        name = "probe"

        def call(self, model):
            seen.append(PassContext.current())
            return PassResult(model, modified=False)

    manager = PassManager(["cse", Probe(), get_pass_class("dce")(), "fold-constants,dce"])
    assert manager.text == "cse,probe,dce,fold-constants,dce"
    ctx = PassContext(options={"mine": 1})
    with ctx:
        manager.run(winnow.load(tiny_model_path))
    assert seen == [ctx]
    manager.run(winnow.load(tiny_model_path))
    assert seen[1] is not ctx
