"""Hand-written bad inputs (issue 10): broken model files, output folders that cannot be written,
an interrupt in the middle of a compile. Each is one sentence, exit 2 (1 for an interrupt),
nothing written at -o; the odd-but-valid models next to them compile with outputs equal."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from winnow.backends.ort import run_artifact
from winnow.cli import cli
from winnow.errors import SourceError, UnsupportedModelError

F = TensorProto.FLOAT


def invoke(*args):
    """Run the CLI in-process (quiet) and return click's Result."""
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def _vi(name, dtype=F, shape=(2,)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),)):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid(d, v)
                                                                 for d, v in opsets])


def _save_raw(folder: Path, model: onnx.ModelProto) -> Path:
    """Write the bytes as they are (onnx.save would not refuse, but keep it explicit)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _external(folder: Path, *, keep: int | None = None, offset: str | None = None) -> Path:
    """y = x + w with w (64 floats) in w.bin, cut to `keep` bytes (-1: removed) or given a bad
    `offset`."""
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32), "w")
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", shape=[64])],
                   [_vi("y", shape=[64])], [w])
    folder.mkdir(parents=True)
    path = folder / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    if keep == -1:
        os.remove(folder / "w.bin")
    elif keep is not None:
        os.truncate(folder / "w.bin", keep)
    if offset is not None:
        proto = onnx.load(path, load_external_data=False)
        entries = proto.graph.initializer[0].external_data
        kept = [(e.key, e.value) for e in entries if e.key not in ("offset", "length")]
        del entries[:]
        for key, value in [*kept, ("offset", offset)]:
            entries.add(key=key, value=value)
        path.write_bytes(proto.SerializeToString())
    return path


def _if_body_without_opset(folder: Path) -> Path:
    then = helper.make_graph([helper.make_node("Gelu", ["x"], ["t"], domain="com.microsoft")],
                             "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [], [_vi("e")])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    return _save_raw(folder, _model([node], [_vi("c", TensorProto.BOOL, []), _vi("x")],
                                    [_vi("y")]))


BROKEN_MODELS = {
    "external-data-shorter-than-its-tensor": (
        lambda d: _external(d, keep=100),
        "tensor 'w' needs 256 bytes at offset 0 of external data file 'w.bin', which has only "
        "100 bytes"),
    "external-data-offset-past-the-end": (
        lambda d: _external(d, offset="4096"), "needs 256 bytes at offset 4,096"),
    "external-data-offset-not-a-number": (
        lambda d: _external(d, offset="-8"), "has unreadable external data fields"),
    "duplicate-node-names": (
        lambda d: _save_raw(d, _model([helper.make_node("Relu", ["x"], ["a"], name="n"),
                                       helper.make_node("Relu", ["a"], ["y"], name="n")],
                                      [_vi("x")], [_vi("y")])),
        "two nodes with same node name (n)"),
    "duplicate-value-names": (
        lambda d: _save_raw(d, _model([helper.make_node("Relu", ["x"], ["a"], name="r"),
                                       helper.make_node("Sigmoid", ["x"], ["a"], name="s"),
                                       helper.make_node("Relu", ["a"], ["y"])],
                                      [_vi("x")], [_vi("y")])),
        "value 'a' in graph 'g' is produced by node 's' (Sigmoid) but is already the output of "
        "node 'r' (Relu)"),
    "node-output-named-as-an-input": (
        lambda d: _save_raw(d, _model([helper.make_node("Relu", ["x"], ["x"], name="r")],
                                      [_vi("x")], [_vi("x")])),
        "value 'x' in graph 'g' is produced by node 'r' (Relu) but is already a graph input"),
    "initializer-shadowing-an-input-with-another-type": (
        lambda d: _save_raw(d, _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")],
                                      [_vi("y")],
                                      [numpy_helper.from_array(np.array([1, 2]), "x")])),
        "Data in initializer 'x' has element type tensor(int64)"),
    "opset-import-missing-for-a-used-domain": (
        lambda d: _save_raw(d, _model([helper.make_node("Gelu", ["x"], ["y"], name="g",
                                                        domain="com.microsoft")],
                                      [_vi("x")], [_vi("y")])),
        "node 'g' (Gelu) uses the operator domain 'com.microsoft', for which the model imports "
        "no opset"),
    "opset-import-missing-inside-an-if-branch": (
        _if_body_without_opset, "an unnamed Gelu node uses the operator domain 'com.microsoft'"),
    "external-data-file-missing": (
        lambda d: _external(d, keep=-1), "needs external data file 'w.bin', which is missing"),
    "duplicate-graph-input-names": (
        lambda d: _save_raw(d, _model([helper.make_node("Relu", ["x"], ["y"])],
                                      [_vi("x"), _vi("x")], [_vi("y")])),
        "Duplicate definition-site for (x)"),
    "node-input-nothing-produces": (
        lambda d: _save_raw(d, _model([helper.make_node("Add", ["x", "ghost"], ["y"])],
                                      [_vi("x")], [_vi("y")])),
        "Node input 'ghost' is not a graph input, initializer, or output of a previous node"),
    "graph-output-nothing-produces": (
        lambda d: _save_raw(d, _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")],
                                      [_vi("y"), _vi("z")])),
        "Graph output (z) does not exist in the graph"),
    "cyclic-graph": (
        lambda d: _save_raw(d, _model([helper.make_node("Add", ["x", "b"], ["a"]),
                                       helper.make_node("Relu", ["a"], ["b"]),
                                       helper.make_node("Relu", ["a"], ["y"])],
                                      [_vi("x")], [_vi("y")])),
        "the graph is not acyclic"),
    "unknown-operator": (
        lambda d: _save_raw(d, _model([helper.make_node("FooBar", ["x"], ["y"])], [_vi("x")],
                                      [_vi("y")])),
        "No Op registered for FooBar with domain_version of 17"),
    "graph-without-outputs": (
        lambda d: _save_raw(d, _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [])),
        "does not hold an ONNX model graph"),
}


def _assert_one_clear_error(result, needle: str, out: Path) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and needle in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_broken_model_is_one_clear_error(case, tmp_path):
    build, needle = BROKEN_MODELS[case]
    path = build(tmp_path / "model")
    out = tmp_path / "out"
    _assert_one_clear_error(invoke("compile", path, "-o", out), needle, out)
    if case.startswith(("external", "duplicate-value", "opset", "node-output")):
        # refused by the loader itself, so every command that loads a model says the same
        report = tmp_path / "report"
        _assert_one_clear_error(invoke("analyze", path, "-o", report), needle, report)


def test_string_input_cannot_get_random_data_but_takes_example_strings(tmp_path):
    model = _model([helper.make_node("Identity", ["x"], ["y"])],
                   [_vi("x", TensorProto.STRING, ["n"])], [_vi("y", TensorProto.STRING, ["n"])])
    path = _save_raw(tmp_path / "model", model)
    out = tmp_path / "out"
    _assert_one_clear_error(invoke("compile", path, "-o", out, "--input-shapes", "x=3"),
                            "input 'x' is string, which winnow cannot make random data for; "
                            "give its values with --example-inputs.", out)
    np.savez(tmp_path / "words.npz", x=np.array(["a", "bc", "def"]))
    np.savez(tmp_path / "numbers.npz", x=np.arange(3.0))
    _assert_one_clear_error(invoke("compile", path, "-o", out, "--example-inputs",
                                   tmp_path / "numbers.npz"),
                            "gives input 'x' as float64, but the model takes string", out)
    done = invoke("compile", path, "-o", out, "--example-inputs", tmp_path / "words.npz",
                  "--json")
    assert done.exit_code == 0, done.output
    fidelity = json.loads(done.stdout)["fidelity"]
    assert fidelity["outputs"] == {"y": {"equal": True}}
    assert fidelity["check_inputs"]["shapes"] == {"x": [3]}


ODD_BUT_VALID = {
    "graph-output-that-is-also-an-input": (
        _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y"), _vi("x")]),
        lambda x: {"y": np.maximum(x, 0), "x": x}, (2,)),
    "zero-size-dim": (
        _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", shape=[0, 4])],
               [_vi("y", shape=[0, 4])]),
        lambda x: {"y": np.maximum(x, 0)}, (0, 4)),
    "rank-0-tensor": (
        _model([helper.make_node("Sigmoid", ["x"], ["y"])], [_vi("x", shape=[])],
               [_vi("y", shape=[])]),
        lambda x: {"y": 1 / (1 + np.exp(-x))}, ()),
}


@pytest.mark.parametrize("case", list(ODD_BUT_VALID))
def test_odd_but_valid_models_compile_with_outputs_equal(case, tmp_path):
    model, oracle, shape = ODD_BUT_VALID[case]
    path = _save_raw(tmp_path / "model", model)
    out = tmp_path / "out"
    result = invoke("compile", path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    fidelity = json.loads(result.stdout)["fidelity"]
    assert fidelity["max_abs_error"] == 0.0 and fidelity["nonfinite_mismatch"] == 0
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    got, want = run_artifact(out, {"x": x}), oracle(x)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)


def test_initializer_shadowing_an_input_stays_an_overridable_default(tmp_path):
    """An initializer named like a graph input (IR >= 4) is the input's default value: the
    artifact still takes the input and falls back on the default, as the source does in ONNX
    Runtime (nothing folds the default into the graph)."""
    import onnxruntime as ort

    default = np.array([-1.0, 2.0], np.float32)
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")],
                   [numpy_helper.from_array(default, "x")])
    path = _save_raw(tmp_path / "model", model)
    out = tmp_path / "out"
    result = invoke("compile", path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_overridable_initializers()] == ["x"]
    given = np.array([3.0, -4.0], np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": given})[0], np.maximum(given, 0))
    np.testing.assert_array_equal(session.run(None, {})[0], np.maximum(default, 0))


def _erofs(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def test_read_only_disk_is_one_clear_error_and_keeps_an_earlier_artifact(tiny_model_path,
                                                                          tmp_path, monkeypatch):
    import winnow.backends.manifest

    out = tmp_path / "out"
    assert invoke("compile", tiny_model_path, "-o", out).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    with monkeypatch.context() as patch:  # the disk went read-only: nothing can be created
        patch.setattr(Path, "mkdir", _erofs)
        fresh = tmp_path / "fresh"
        _assert_one_clear_error(invoke("compile", tiny_model_path, "-o", fresh),
                                f"cannot create output folder '{fresh}': Read-only file system",
                                fresh)
    with monkeypatch.context() as patch:  # ... or only renames fail: the old artifact stays
        patch.setattr(winnow.backends.manifest.os, "rename", _erofs)
        result = invoke("compile", tiny_model_path, "-o", out, "--force-overwrite")
    assert result.exit_code == 2 and "Read-only file system" in result.stderr, result.output
    assert (out / "manifest.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder


def test_permission_denied_while_writing_names_the_file(tiny_model_path, tmp_path, monkeypatch):
    import onnx_ir

    def denied(model, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(onnx_ir, "save", denied)
    out = tmp_path / "out"
    result = invoke("compile", tiny_model_path, "-o", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: cannot write output folder '{out}' (")
    assert "model.onnx): Permission denied" in result.stderr and "Traceback" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("target", ["folder", "file"])
def test_output_at_the_source_is_refused_and_the_source_kept(target, tmp_path):
    path = _save_raw(tmp_path / "model", _model([helper.make_node("Relu", ["x"], ["y"])],
                                                [_vi("x")], [_vi("y")]))
    before = path.read_bytes()
    out = path.parent if target == "folder" else path
    result = invoke("compile", path, "-o", out, "--force-overwrite")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("is not a winnow artifact" if target == "folder" else "is not a folder") \
        in result.stderr
    assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == ["m.onnx"]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["rename", "manifest"])
def test_full_disk_leaves_nothing_half_written(where, tiny_model_path, tmp_path, monkeypatch):
    import winnow.backends.manifest
    import winnow.backends.ort

    if where == "rename":  # the last step: moving the finished folder into place
        monkeypatch.setattr(winnow.backends.manifest.os, "rename", _enospc)
    else:  # the middle: model.onnx written, manifest.json fails
        monkeypatch.setattr(winnow.backends.ort, "write_manifest", _enospc)
    out = tmp_path / "deep" / "out"
    result = invoke("compile", tiny_model_path, "-o", out)
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: cannot write output folder '{out}': No space left on "
                             "device; free space or choose a folder you can write to.\n")
    assert not (tmp_path / "deep").exists()  # the parent it created is gone too


def test_read_only_locations_are_one_clear_error(tiny_model_path, tmp_path):
    (tmp_path / "file").write_text("x")
    under_file = tmp_path / "file" / "out"
    _assert_one_clear_error(invoke("analyze", tiny_model_path, "-o", under_file,
                                   "--passes", "layer-similarity"),
                            "is a file, not a folder", under_file)
    assert invoke("compile", tiny_model_path, "-o", tmp_path / "art").exit_code == 0
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 16), np.float32))
    result = invoke("run", tmp_path / "art", "--inputs", tmp_path / "in.npz", "-o",
                    tmp_path / "file" / "y.npz")
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot write '")
    assert "Traceback" not in result.output and (tmp_path / "file").read_text() == "x"


HOLD = """
import os, signal, sys, time
# A test run started in the background (`make test &`) inherits SIGINT ignored; a user's Ctrl-C
# reaches a foreground process, whose default handler this restores.
signal.signal(signal.SIGINT, signal.default_int_handler)
import winnow.{module} as target
real = target.{function}
def hold(*args, **kwargs):
    open(os.environ["WINNOW_TEST_MARK"], "w").close()
    time.sleep(120)
    return real(*args, **kwargs)
target.{function} = hold
from winnow.cli import main
sys.argv = ["winnow", *sys.argv[1:]]
main()
"""


def test_sigint_in_the_middle_of_a_compile_leaves_nothing(tiny_model_path, tmp_path):
    """Interrupted while the artifact is half written (model.onnx there, no manifest yet): no
    OUT, no staging folder, no parent folder it made."""
    mark, out = tmp_path / "mark", tmp_path / "made" / "out"
    code = HOLD.format(module="backends.ort", function="write_manifest")
    proc = subprocess.Popen([sys.executable, "-c", code, "--quiet", "compile",
                             str(tiny_model_path), "-o", str(out)],
                            env={**os.environ, "WINNOW_TEST_MARK": str(mark)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):
            if mark.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert mark.exists(), proc.communicate()[1]
        (staged,) = (tmp_path / "made").glob(".out.*.partial")
        assert (staged / "model.onnx").is_file()  # really in the middle of writing
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Aborted!" in err and "Traceback" not in err
    assert not (tmp_path / "made").exists()


# --- bugs the fuzzer found (tests/test_fuzz.py, bench/fuzz.py), each as a regular test --------

def _untyped_attribute(folder: Path) -> Path:
    node = helper.make_node("Constant", [], ["y"], name="c",
                            value=numpy_helper.from_array(np.ones(2, np.float32)))
    node.attribute[0].ClearField("type")  # a byte edit had dropped the field
    return _save_raw(folder, _model([node], [], [_vi("y")]))


def _undefined_input_type(folder: Path) -> Path:
    return _save_raw(folder, _model([helper.make_node("Relu", ["x"], ["y"])],
                                    [_vi("x", TensorProto.UNDEFINED)], [_vi("y")]))


FUZZ_FOUND = {
    "attribute-without-a-type": (
        lambda t: ["compile", _untyped_attribute(t / "model")],
        "node 'c' (Constant) has attribute 'value' without a type"),
    "input-without-an-element-type": (
        lambda t: ["compile", _undefined_input_type(t / "model")],
        "graph input 'x' is a tensor without an element type (UNDEFINED)"),
    "yaml-with-a-control-character": (
        lambda t: ["compile", _tiny(t), "--config", _write(t / "p.yaml", b"\x1f")],
        "is not valid YAML: unacceptable character #x001f: special characters are not allowed."),
    "yaml-that-is-not-utf8": (
        lambda t: ["compile", _tiny(t), "--config", _write(t / "p.yaml", b"pipeline: [\xff]")],
        "is not UTF-8 text (byte 11)"),
    "yaml-entry-with-a-line-break": (
        lambda t: ["compile", _tiny(t), "--config",
                   _write(t / "p.yaml", b'pipeline: ["cse\\nx"]')],
        "holds the control character '\\n' at position 3"),
    "input-too-large-for-random-check-data": (
        lambda t: ["compile", _save_raw(t / "model", _model(
            [helper.make_node("Relu", ["x"], ["y"])], [_vi("x", shape=[2**20, 2**20])],
            [_vi("y", shape=[2**20, 2**20])]))],
        "input 'x' of shape [1048576, 1048576] has 1,099,511,627,776 elements, too many for "
        "random check data"),
    "input-with-a-negative-dim": (
        lambda t: ["compile", _save_raw(t / "model", _model(
            [helper.make_node("Relu", ["x"], ["y"])], [_vi("x", shape=[2, -3])],
            [_vi("y", shape=[2, 3])]))],
        "input 'x' declares the negative dims [2, -3]"),
    "op-type-that-is-not-utf8": (
        lambda t: ["compile", _write(t / "bad.onnx", _model(
            [helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")])
            .SerializeToString().replace(b"Relu", b"R\xffl\xfe"))],
        "holds a name or op type that is not UTF-8 text (b'R\\xffl\\xfe')"),
    "input-shapes-with-a-line-break": (
        lambda t: ["compile", _tiny(t), "--input-shapes", "x\n=1,16"],
        "--input-shapes holds the control character '\\n'"),
    "pipeline-text-with-a-line-break": (
        lambda t: ["compile", _tiny(t), "--pipeline", "cse,\nx"],
        "the pipeline text holds the control character '\\n' at position 4"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _tiny(folder: Path) -> Path:
    from winnow.tests.conftest import make_tiny_model

    path = folder / "tiny.onnx"
    onnx.save(make_tiny_model(), path)
    return path


@pytest.mark.parametrize("case", list(FUZZ_FOUND))
def test_fuzzer_findings_are_one_clear_error(case, tmp_path):
    build, needle = FUZZ_FOUND[case]
    out = tmp_path / "out"
    _assert_one_clear_error(invoke(*build(tmp_path), "-o", out), needle, out)


def test_hf_config_with_a_wrongly_typed_field_is_one_sentence(tmp_path):
    pytest.importorskip("transformers")
    from winnow.errors import ModelFormatError
    from winnow.frontend.huggingface import read_hf_folder
    from winnow.tests.fuzz_targets import build_hf_folder

    folder = build_hf_folder(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    for key, value in (("hidden_size", None), ("model_type", ["bert"])):
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(Exception) as info:
            read_hf_folder(folder)
        assert isinstance(info.value, (ModelFormatError, SourceError, UnsupportedModelError))
        assert "\n" not in str(info.value) and str(info.value).startswith(f"'{folder}")
