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
