"""The cost model prices what search trials make: a graph whose nodes are out of file order
(ORT's fp16 converter appends the input Casts at the end) is priced in full, not timed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from winnow.cost_model import predict


def _unsorted_model() -> ir.Model:
    w = numpy_helper.from_array(np.ones((4, 3), np.float16), "w")
    nodes = [helper.make_node("MatMul", ["xc", "w"], ["m"], name="matmul"),
             helper.make_node("Cast", ["m"], ["y"], name="cast_out", to=TensorProto.FLOAT),
             helper.make_node("Cast", ["x"], ["xc"], name="cast_in", to=TensorProto.FLOAT16)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def test_nodes_out_of_file_order_are_priced_with_their_shapes():
    model = _unsorted_model()
    report = predict(model, "x86-avx2", {"x": [5, 4]})
    assert report.unpriced == []
    matmul = next(n for n in report.nodes if n.op_type == "MatMul")
    assert matmul.flops == 2 * 5 * 4 * 3  # hand count: 2 * M * K * N
    cast_out = next(n for n in report.nodes if n.name == "cast_out")
    assert cast_out.act_write == 5 * 3 * 4  # fp32 [5, 3]
    assert [n.name for n in model.graph] == ["matmul", "cast_out", "cast_in"]  # left as it was
