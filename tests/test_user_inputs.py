"""--input-shapes and --example-inputs: parsed once, checked against the model's inputs, used by
the differential check, calibration and the feeds of analyze / bench / run, recorded in the
manifest; bad text or inputs that do not fit are one sentence, exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from winnow.backends.ort import run_artifact
from winnow.cli import cli
from winnow.errors import InputsError
from winnow.ir.user_inputs import MAX_RANDOM_ELEMENTS, UserInputs, parse_input_shapes

PAD = 3  # reflect padding on each side of the samples axis: fails for fewer than PAD + 1 samples


def invoke(*args):
    """Run the CLI in-process (quiet) and return click's Result."""
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def make_pad_model() -> onnx.ModelProto:
    """y = Relu(reflect-pad(x)) over x[batch, samples] and a state[batch, 4] added to nothing
    but its own Identity: invented sizes (2 samples) make the model's own Pad fail."""
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, PAD, 0, PAD])
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
             helper.make_node("Relu", ["p"], ["y"]),
             helper.make_node("Identity", ["state"], ["state_out"])]
    graph = helper.make_graph(
        nodes, "pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["batch", 4])],
        initializer=[pads])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.fixture
def pad_model_path(tmp_path):
    """The reflect-pad model saved as `tmp/pad/pad.onnx`."""
    path = tmp_path / "pad" / "pad.onnx"
    path.parent.mkdir()
    onnx.save(make_pad_model(), path)
    return path


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_parse_input_shapes():
    assert parse_input_shapes("input=1,512;state=2,1,128") == {"input": (1, 512),
                                                               "state": (2, 1, 128)}
    assert parse_input_shapes(" x = [3, 4] ; t= ;") == {"x": (3, 4), "t": ()}
    assert parse_input_shapes("onnx::Gather_0=7") == {"onnx::Gather_0": (7,)}


@pytest.mark.parametrize("text, needle", [
    ("", "is empty"), (" ; ;", "names no input"), ("x", "is not NAME=D1,D2"),
    ("=1,2", "is not NAME=D1,D2"), ("x=1,,2", "the dim ''"), ("x=1,-2", "the dim '-2'"),
    ("x=0", "the dim '0'"), ("x=1.5", "the dim '1.5'"), ("x=1;x=2", "gives input 'x' twice"),
    ("x=²", "the dim '²'"),
])
def test_bad_input_shapes_text(text, needle):
    with pytest.raises(InputsError, match=None) as info:
        parse_input_shapes(text)
    assert needle in str(info.value) and str(info.value).endswith(".")
    assert "\n" not in str(info.value)


def test_invented_sizes_fail_the_models_own_pad_and_the_summary_says_how_to_fix_it(
        pad_model_path, tmp_path):
    out = tmp_path / "out"
    result = invoke("compile", pad_model_path, "-o", out)
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("fidelity")]
    assert "not measured" in line and "Pad" in line
    assert line.endswith("give inputs that fit it with --input-shapes or --example-inputs")
    fidelity = _manifest(out)["fidelity"]
    assert fidelity["measured"] is False and "--input-shapes" in fidelity["reason"]


def test_given_shapes_run_the_check_and_are_recorded(pad_model_path, tmp_path):
    out = tmp_path / "out"
    result = invoke("compile", pad_model_path, "-o", out, "--input-shapes", "x=2,512")
    assert result.exit_code == 0, result.output
    assert "max abs error 0, min cosine 1.000000 vs source (inputs: random data shaped by " \
           "--input-shapes 'x=2,512')" in result.stdout
    fidelity = _manifest(out)["fidelity"]
    assert "measured" not in fidelity and fidelity["max_abs_error"] == 0.0
    # state's 'batch' takes x's size; its fixed 4 stays
    assert fidelity["check_inputs"]["shapes"] == {"x": [2, 512], "state": [2, 4]}
    assert fidelity["outputs"]["y"]["cosine"] > 0.999999


def test_example_inputs_are_the_check_inputs(pad_model_path, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 9)).astype(np.float32)
    state = rng.standard_normal((3, 4)).astype(np.float32)
    np.savez(tmp_path / "feeds.npz", x=x, state=state)
    out = tmp_path / "out"
    result = invoke("compile", pad_model_path, "-o", out, "--example-inputs",
                    tmp_path / "feeds.npz", "--json")
    assert result.exit_code == 0, result.output
    fidelity = json.loads(result.stdout)["fidelity"]
    assert fidelity["feeds"] == f"--example-inputs {tmp_path / 'feeds.npz'}"
    assert fidelity["check_inputs"]["shapes"] == {"x": [3, 9], "state": [3, 4]}
    assert fidelity["max_abs_error"] == 0.0
    want = np.maximum(np.pad(x, ((0, 0), (PAD, PAD)), mode="reflect"), 0)  # numpy oracle
    np.testing.assert_array_equal(run_artifact(out, {"x": x, "state": state})["y"], want)


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def _f32(*shape):
    return np.zeros(shape, np.float32)


BAD_FITS = {
    "unknown-name": (lambda t: ["--input-shapes", "z=1,8"],
                     "names 'z', which is not an input of the model; its inputs are: x, state."),
    "rank": (lambda t: ["--input-shapes", "x=1,8,2"],
             "gives input 'x' 3 dims [1, 8, 2], but the model's input has rank 2 "
             "[batch, samples]."),
    "fixed-dim": (lambda t: ["--input-shapes", "state=1,5;x=1,8"],
                  "gives input 'state' size 5 at axis 1, which the model fixes at 4"),
    "shared-dim": (lambda t: ["--input-shapes", "x=1,8;state=2,4"],
                   "gives dim 'batch' size 2 in input 'state' but 1 in input 'x'"),
    "unsized-dim": (lambda t: ["--input-shapes", "state=1,4"],
                    "input 'x' [batch, samples] has dims (samples) that random data shaped by "
                    "--input-shapes 'state=1,4' does not size; add 'x=D1,D2,...'."),
    "too-big": (lambda t: ["--input-shapes", f"x=1,{MAX_RANDOM_ELEMENTS + 1}"],
                "more than the 134,217,728 winnow makes random data for"),
    "both": (lambda t: ["--input-shapes", "x=1,8", "--example-inputs", t / "f.npz"],
             "give either --input-shapes or --example-inputs, not both"),
    "npz-dtype": (lambda t: ["--example-inputs", _save(t / "f64.npz", x=np.zeros((1, 8)),
                                                       state=_f32(1, 4))],
                  "gives input 'x' as float64, but the model takes float32; save it as float32"),
    "npz-missing": (lambda t: ["--example-inputs", _save(t / "one.npz", x=_f32(1, 8))],
                    "has no array for input 'state'; give one array per input (x, state)."),
    "npz-rank": (lambda t: ["--example-inputs", _save(t / "r.npz", x=_f32(8), state=_f32(1, 4))],
                 "gives input 'x' 1 dims [8], but the model's input has rank 2"),
    "npz-absent": (lambda t: ["--example-inputs", t / "absent.npz"],
                   "does not exist; give an .npz file."),
    "npz-garbage": (lambda t: ["--example-inputs", _write(t / "g.npz", b"PK\x03\x04garbage")],
                    "is not a readable .npz of arrays"),
    "npz-objects": (lambda t: ["--example-inputs", _save(t / "o.npz", x=np.array([{}, 1], object),
                                                         state=_f32(1, 4))],
                    "has an array --example-inputs cannot read"),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD_FITS))
def test_inputs_that_do_not_fit_are_one_sentence_and_nothing_is_written(case, pad_model_path,
                                                                        tmp_path):
    build, needle = BAD_FITS[case]
    out = tmp_path / "out"
    result = invoke("compile", pad_model_path, "-o", out, *build(tmp_path))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and needle in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_analyze_calibrates_on_the_given_shapes(pad_model_path, tmp_path):
    out = tmp_path / "report"
    result = invoke("analyze", pad_model_path, "-o", out, "--passes", "layer-similarity",
                    "--input-shapes", "x=2,16", "--json")
    assert result.exit_code == 0, result.output
    calibration = json.loads(result.stdout)["calibration"]
    assert calibration["source"] == "random data shaped by --input-shapes 'x=2,16'"
    assert calibration["shapes"] == {"x": [2, 16], "state": [2, 4]}
    assert calibration["samples"] == 2
    bad = invoke("analyze", pad_model_path, "-o", tmp_path / "r2", "--input-shapes", "x=2")
    assert bad.exit_code == 2 and "rank 2" in bad.stderr and not (tmp_path / "r2").exists()


def test_bench_and_run_take_the_given_inputs(pad_model_path, tmp_path):
    out = tmp_path / "out"
    assert invoke("compile", pad_model_path, "-o", out, "--input-shapes", "x=1,8").exit_code == 0
    result = invoke("bench", out, "--input-shapes", "x=3,40", "--repeats", "2", "--warmup", "0",
                    "--no-rss", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": [3, 40]},
                              {"name": "state", "dtype": "float32", "shape": [3, 4]}]
    assert info["settings"]["feeds"] == "random data shaped by --input-shapes 'x=3,40'"
    x = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32)
    np.savez(tmp_path / "feeds.npz", x=x, state=_f32(2, 4))
    timed = invoke("bench", out, "--example-inputs", tmp_path / "feeds.npz", "--repeats", "2",
                   "--warmup", "0", "--no-rss", "--json")
    assert timed.exit_code == 0, timed.output
    assert json.loads(timed.stdout)["inputs"][0]["shape"] == [2, 6]
    ran = invoke("run", out, "--input-shapes", "x=2,7", "-o", tmp_path / "y.npz")
    assert ran.exit_code == 0, ran.output
    assert "y  float32  [2, 13]" in ran.stdout
    by_alias = invoke("run", out, "--example-inputs", tmp_path / "feeds.npz")
    assert by_alias.exit_code == 0 and "y  float32  [2, 12]" in by_alias.stdout
    neither = invoke("run", out)
    assert neither.exit_code == 2 and "give the inputs to run on" in neither.stderr
    wrong = invoke("bench", out, "--input-shapes", "x=1,8,8", "--no-rss")
    assert wrong.exit_code == 2 and "rank 2" in wrong.stderr


def test_user_inputs_from_a_feed_dict_in_python(pad_model_path):
    import winnow

    model = winnow.load(pad_model_path)
    given = UserInputs.from_options(example_inputs={"x": np.ones((1, 5), np.float32),
                                                    "state": np.ones((1, 4), np.float32)})
    record = given.attach(model)
    assert record["origin"] == "the given example inputs"
    assert record["shapes"] == {"x": [1, 5], "state": [1, 4]}
    assert UserInputs.from_options() is None


def test_target_search_checks_on_the_given_inputs(pad_model_path, tmp_path):
    out = tmp_path / "o"
    result = invoke("compile", pad_model_path, "-o", out, "--target", "host", "--trials", "2",
                    "--input-shapes", "x=1,8")
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    assert manifest["fidelity"]["check_inputs"]["shapes"] == {"x": [1, 8], "state": [1, 4]}
    assert manifest["fidelity"]["max_abs_error"] <= 1e-6  # the check ran (invented sizes fail)
    assert "--input-shapes" in manifest["search"]["judged_on"]["trials"]
    x = np.arange(-8, 8, dtype=np.float32).reshape(2, 8)
    state = np.ones((2, 4), np.float32)
    got = run_artifact(out, {"x": x, "state": state})
    np.testing.assert_allclose(got["y"], np.maximum(np.pad(x, ((0, 0), (PAD, PAD)), "reflect"), 0))
