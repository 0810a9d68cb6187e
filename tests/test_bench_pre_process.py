"""bench/peers.py's `pre_process`, which bench/peers.py and bench/quantize.py both run before
ORT's quantize_dynamic: symbolic shape inference first, then without it, then the export as is."""

from __future__ import annotations

import onnx

from tests.graphs import HEADER

MATMUL = HEADER + """
agraph (float[N, 4] x) => (float[N, 3] y) <float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> {
    y = MatMul (x, w)
}
"""


def test_a_model_is_pre_processed_with_symbolic_shapes(peers_script, tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(onnx.parser.parse_model(MATMUL), source)
    path, note = peers_script.pre_process("tiny", source, tmp_path / "pre.onnx")
    assert path == tmp_path / "pre.onnx" and note == "after quant_pre_process"
    assert [n.op_type for n in onnx.load(path).graph.node] == ["MatMul"]


def test_a_model_neither_step_can_read_is_quantized_as_it_is(peers_script, tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"not a model")
    path, note = peers_script.pre_process("broken", source, tmp_path / "pre.onnx")
    assert path == source and note.startswith("quant_pre_process failed")
    assert not (tmp_path / "pre.onnx").exists()


CUSTOM = """<ir_version: 8, opset_import: ["" : 17, "custom.domain" : 1]>
agraph (float[N, 4] x) => (float[N, 4] z) {
    y = custom.domain.Foo (x)
    z = Relu (y)
}
"""


def test_what_ort_leaves_when_symbolic_shapes_give_up_stays_out_of_the_working_folder(
        peers_script, tmp_path, monkeypatch):
    # symbolic shape inference cannot type the custom op: ORT saves the half-inferred model as
    # sym_shape_infer_temp.onnx (and its external data) in the working folder before raising
    work, models = tmp_path / "work", tmp_path / "models"
    work.mkdir()
    models.mkdir()
    onnx.save(onnx.parser.parse_model(CUSTOM), models / "model.onnx")
    monkeypatch.chdir(work)
    path, note = peers_script.pre_process("custom", models / "model.onnx", models / "pre.onnx")
    assert list(work.iterdir()) == []
    assert note != "after quant_pre_process"  # the symbolic step did fail, as the test needs
    assert sorted(p.name for p in models.iterdir()) in (["model.onnx"],
                                                         ["model.onnx", "pre.onnx"])
