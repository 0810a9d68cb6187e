"""Tests of the example plugin's passes, on tiny models from winnow.testing: each result is
compared with the model before the pass and with counts computed without the pass's code."""

import numpy as np
import onnx
import onnx_ir as ir

from winnow import testing
from winnow_plugin_example.dedup_weights import DedupWeightsPass
from winnow_plugin_example.fold_scales import FoldScalesPass


def shared_layer_model() -> tuple[ir.Model, int]:
    """A two-block transformer whose block 1 holds copies of block 0's tensors (a shared layer
    exported twice), and the number of copies."""
    model = testing.transformer_block(layers=2, seed=3)
    inits = model.graph.initializers
    copies = 0
    for name, value in list(inits.items()):
        twin = inits.get(name.replace("blocks.0.", "blocks.1.")) if name.startswith("blocks.0.") else None
        if twin is not None and not np.array_equal(twin.const_value.numpy(), value.const_value.numpy()):
            twin.const_value = ir.tensor(value.const_value.numpy().copy(), name=twin.name)
            copies += 1
    return model, copies


def scaled_conv_model(per_channel: bool) -> ir.Model:
    """Conv -> Mul(s) -> Relu with s a scalar or a [C, 1, 1] constant (on the left of the Mul)."""
    rng = np.random.default_rng(0)
    scale = (rng.random((4, 1, 1)) + 0.5) if per_channel else np.array([1.7])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         onnx.helper.make_node("Mul", ["s", "c"], ["m"]),
         onnx.helper.make_node("Relu", ["m"], ["y"])], "scaled-conv",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 6, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4, 6, 6])],
        initializer=[onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
            ("w", rng.standard_normal((4, 3, 3, 3))), ("b", rng.standard_normal(4)), ("s", scale))])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)],
                                   ir_version=8)
    return ir.serde.deserialize_model(proto)


def duplicate_count(model: ir.Model) -> int:
    """How many initializers repeat an earlier one's dtype, shape and bytes."""
    arrays = [v.const_value.numpy() for v in model.graph.initializers.values()]
    return len(arrays) - len({(a.dtype.str, a.shape, a.tobytes()) for a in arrays})


def test_dedup_weights_merges_the_copies_of_a_shared_layer():
    dedup = DedupWeightsPass
    model, copies = shared_layer_model()
    plain = testing.transformer_block(layers=2, seed=3)
    assert duplicate_count(model) - duplicate_count(plain) == copies > 0
    result = testing.run_pass(dedup(), model)
    assert result.report["dedup-weights"]["merged"] == duplicate_count(model)
    assert len(result.model.graph.initializers) == len(model.graph.initializers) - duplicate_count(model)
    assert duplicate_count(result.model) == 0
    testing.assert_equivalent(model, result.model, rtol=0, atol=0)
    bigger = testing.run_pass(dedup(min_elements=64), model)  # only the shared layer's weights
    assert bigger.report["dedup-weights"]["merged"] == sum(
        1 for v in model.graph.initializers.values() if v.name.startswith("blocks.1.")
        and v.const_value.size >= 64)


def test_fold_scales_folds_a_scalar_or_per_channel_mul_after_a_conv():
    for per_channel in (False, True):
        model = scaled_conv_model(per_channel)
        result = testing.run_pass(FoldScalesPass(), model)
        assert result.report["fold-scales"] == {"rewrites": 1, "by_rule": {"ConvScale": 1}}
        assert [n.op_type for n in result.model.graph] == ["Conv", "Relu"]
        testing.assert_equivalent(model, result.model, rtol=1e-5, atol=1e-5)
