"""The analyses and drop-layers on foreign CNNs: projection shortcuts are measured through the
projection and never dropped, degenerate activations are not measurable, IR-3 models (every
initializer also a graph input) survive das-skip's gated suffix models; ResNet-50 and both
PP-OCR models end to end."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import winnow
from winnow.errors import WinnowError
from winnow.ir.activations import Degeneracy, one_direction
from winnow.ir.regions import find_regions
from winnow.passes.manager import PassContext, PassManager

# ---------------------------------------------------------------------------------------------
# A tiny ResNet: conv stem, an identity block, a projection block (stride 2, 4 -> 8 channels)
# and a second identity block; IR version 3, every initializer also listed as a graph input.


def _conv(rng, name, cin, cout, k):
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32) * math.sqrt(2.0 / (cin * k * k))
    return numpy_helper.from_array(w, name)


def tiny_resnet(scale: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """x * scale -> stem -> id block (4) -> projection block (4->8, /2) -> id block (8)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([scale], np.float32), "scale"),
             _conv(rng, "w_stem", 3, 4, 3),
             _conv(rng, "w_a1", 4, 4, 3), _conv(rng, "w_a2", 4, 4, 3),
             _conv(rng, "w_b1", 4, 8, 3), _conv(rng, "w_b2", 8, 8, 3), _conv(rng, "w_bs", 4, 8, 1),
             _conv(rng, "w_c1", 8, 8, 3), _conv(rng, "w_c2", 8, 8, 3)]
    same = {"pads": [1, 1, 1, 1]}
    n = helper.make_node
    nodes = [
        n("Mul", ["x", "scale"], ["xs"]),
        n("Conv", ["xs", "w_stem"], ["stem"], **same), n("Relu", ["stem"], ["s0"]),
        n("Conv", ["s0", "w_a1"], ["a1"], **same), n("Relu", ["a1"], ["a1r"]),
        n("Conv", ["a1r", "w_a2"], ["a2"], **same), n("Add", ["a2", "s0"], ["a_sum"]),
        n("Relu", ["a_sum"], ["s1"]),
        n("Conv", ["s1", "w_b1"], ["b1"], strides=[2, 2], **same), n("Relu", ["b1"], ["b1r"]),
        n("Conv", ["b1r", "w_b2"], ["b2"], **same),
        n("Conv", ["s1", "w_bs"], ["b_short"], strides=[2, 2]),
        n("Add", ["b2", "b_short"], ["b_sum"]), n("Relu", ["b_sum"], ["s2"]),
        n("Conv", ["s2", "w_c1"], ["c1"], **same), n("Relu", ["c1"], ["c1r"]),
        n("Conv", ["c1r", "w_c2"], ["c2"], **same), n("Add", ["c2", "s2"], ["c_sum"]),
        n("Relu", ["c_sum"], ["s3"]),
        n("GlobalAveragePool", ["s3"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "tiny_resnet", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 1, 1])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)


def _load(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def _feeds(n: int = 6, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)}]


def _ort_values(proto: onnx.ModelProto, feeds: dict, names: list[str]) -> dict[str, np.ndarray]:
    """The named intermediate values, computed by ONNX Runtime on the unmodified proto."""
    extended = onnx.ModelProto()
    extended.CopyFrom(proto)
    extended.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    session = ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feeds)))


def _position_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over batch and positions of the cosine of the channel vectors of two NCHW arrays (a
    position where either vector is zero counts as 0, winnow's convention)."""
    a = a.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, a.shape[1])
    b = b.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, b.shape[1])
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 0.0)
    return float(cos.mean())


def _similarity(model: ir.Model, batches: list[dict]) -> dict:
    ctx = PassContext(calibration=batches)
    PassManager("layer-similarity").run(model, ctx)
    return ctx.analyses["layer-similarity"]


def test_tiny_resnet_regions_name_the_projection_shortcut():
    regions = find_regions(_load(tiny_resnet()))
    assert [b.droppable for b in regions.blocks] == [True, False, True]
    projection = regions.blocks[1]
    assert projection.shortcut.name == "b_short" and projection.skip is projection.shortcut
    assert "projection" in projection.to_dict()["not_droppable"]
    assert regions.blocks[0].skip is regions.blocks[0].entry


def test_projection_block_is_measured_through_its_shortcut():
    proto = tiny_resnet()
    batches = _feeds()
    result = _similarity(_load(proto), batches)
    rows = {r["name"]: r for r in result["regions"]}
    want = _ort_values(proto, batches[0], ["s0", "a_sum", "b_short", "b_sum", "s2", "c_sum"])
    assert rows["block1"]["measured_from"] == "shortcut" and rows["block1"]["measurable"]
    assert rows["block1"]["cos"] == pytest.approx(_position_cosine(want["b_short"], want["b_sum"]),
                                                  abs=1e-6)
    assert rows["block0"]["cos"] == pytest.approx(_position_cosine(want["s0"], want["a_sum"]), abs=1e-6)
    assert rows["block2"]["cos"] == pytest.approx(_position_cosine(want["s2"], want["c_sum"]), abs=1e-6)
    assert all(-1.0 <= r["cos"] <= 1.0 and math.isfinite(r["linear_cos"]) for r in rows.values())
    # The projection block is scored but never ranked: it cannot be dropped.
    assert sorted(result["ranking"]["block"]) == ["block0", "block2"]


def test_drop_layers_never_picks_the_projection_block():
    proto = tiny_resnet()
    model = _load(proto)
    ctx = PassContext(calibration=_feeds())
    PassManager("drop-layers{count=2}").run(model, ctx)
    assert sorted(ctx.report["drop-layers"]["dropped"]) == ["block0", "block2"]
    assert any(node.op_type == "Conv" and node.inputs[1].name == "w_bs" for node in model.graph)
    used = {v.name for node in model.graph for v in node.inputs if v is not None}
    assert not {"w_a1", "w_a2", "w_c1", "w_c2"} & used and {"w_b1", "w_bs"} <= used
    with pytest.raises(WinnowError, match="count=3 is more than the 2"):
        PassManager("drop-layers{count=3}").run(_load(proto), PassContext(calibration=_feeds()))
    with pytest.raises(WinnowError, match="projection shortcut"):
        PassManager("drop-layers{regions=[block1]}").run(_load(proto),
                                                        PassContext(calibration=_feeds()))


@pytest.mark.parametrize("scale, words", [(0.0, "(near) zero"), (float("nan"), "NaN or Inf")])
def test_degenerate_activations_are_not_measurable_and_never_dropped(scale, words):
    proto = tiny_resnet(scale=scale)
    result = _similarity(_load(proto), _feeds())
    assert all(r["measurable"] is False and words in r["reason"] and r["cos"] is None
               for r in result["regions"])
    assert result["ranking"]["block"] == [] and result["ranking_linear"]["block"] == []
    assert set(result["not_measurable"]) == {"block0", "block1", "block2"}
    assert result["note"].startswith("none of the 3 regions is measurable")
    with pytest.raises(WinnowError, match="not measurable on the calibration data"):
        PassManager("drop-layers{count=1}").run(_load(proto), PassContext(calibration=_feeds()))


def test_degeneracy_reasons_against_hand_made_vectors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6))

    def reason(a, b):
        watch = Degeneracy()
        watch.update(a, b)
        return watch.reason((a, b))

    assert reason(x, x + 0.1) is None
    assert "(near) zero" in reason(x, np.zeros_like(x))
    zeros = x.copy()
    zeros[:30] = 0.0
    assert "60%" in reason(zeros, x)  # more than half the input vectors are zero
    assert reason(np.where(np.arange(50)[:, None] < 20, 0.0, x), x) is None  # 40%: still measured
    nan = x.copy()
    nan[3, 2] = np.nan
    assert "NaN" in reason(x, nan)
    line = rng.standard_normal((50, 1)) * np.arange(1, 7)  # every row a multiple of one vector
    assert one_direction(line) and not one_direction(x)
    assert "same way" in reason(line, x)
    assert "same way" in reason(np.ones_like(x), x)  # constant


def test_das_skip_and_drop_on_an_ir3_model_keep_the_initializers():
    proto = tiny_resnet()
    ctx = PassContext(calibration=_feeds())
    model = _load(proto)
    PassManager("das-skip{steps=4,batch_size=2},drop-layers{count=1,source=das-skip}").run(model, ctx)
    das = ctx.analyses.get("das-skip") or ctx.report["das-skip"]
    assert sorted(das["ranking"]) == ["block0", "block2"]
    assert all(math.isfinite(r["logit"]) for r in das["regions"])
    assert ctx.report["drop-layers"]["dropped"] == das["ranking"][:1]
    feeds = _feeds(seed=5)[0]
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (out,) = session.run(None, feeds)
    (ref,) = ort.InferenceSession(proto.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, feeds)
    assert out.shape == ref.shape and np.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# The README's foreign example (ResNet-50) and both PP-OCR models, end to end.


def _analyze_then_drop(src: str, drop: str, samples: int = 4) -> tuple[PassContext, ir.Model, ir.Model, dict]:
    """layer-similarity, a short das-skip and `drop` on `src` in one context (analyses reused);
    returns the context, the source, the dropped model and a calibration batch."""
    from winnow.passes.analysis.calibration import pick_calibration

    model = winnow.load(src)
    source = model.clone()
    batches, _ = pick_calibration(src, model, None)
    ctx = PassContext(calibration=batches)
    PassManager(f"layer-similarity{{samples={samples}}},"
                "das-skip{steps=3,samples_per_step=2,batch_size=2}").run(model, ctx)
    analyses = dict(ctx.analyses)
    PassManager(drop).run(model, ctx)
    ctx.analyses.update(analyses)
    return ctx, source, model, batches[0]


def _outputs(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v[:2] for k, v in feeds.items() if k in names})


def _check_drop(ctx: PassContext, source: ir.Model, model: ir.Model, feeds: dict) -> None:
    """The dropped region is droppable and gone from the graph, and the model runs with the
    source's output shapes and finite values."""
    dropped = ctx.report["drop-layers"]["dropped"]
    region = find_regions(source).get(dropped[0])
    assert len(dropped) == 1 and region.droppable
    gone = {v.name for n in region.nodes for v in n.outputs} - {region.exit.name}
    assert gone and not gone & {v.name for n in model.graph for v in n.outputs}
    ref, out = _outputs(source, feeds), _outputs(model, feeds)
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert all(np.isfinite(o).all() for o in out if o.dtype.kind == "f")


@pytest.mark.slow
def test_resnet50_analyses_and_a_drop():
    ctx, source, model, feeds = _analyze_then_drop("onnx:light_resnet50",
                                                   "drop-layers{regions=[block1]}")
    similarity = ctx.analyses["layer-similarity"]["regions"]
    assert len(similarity) == 16
    assert [r["name"] for r in similarity if r["measured_from"] == "shortcut"] == \
        ["block0", "block3", "block7", "block13"]
    # onnx's light_resnet50 has every weight 0.02: all channels alike, nothing to measure.
    assert all(not r["measurable"] and "same way" in r["reason"] for r in similarity)
    # das-skip sees the same: its 12 droppable blocks are not measurable and none is ranked, so
    # a drop chosen by it is refused with the reason, and a named drop still works.
    das = ctx.analyses["das-skip"]
    assert das["ranking"] == [] and len(das["not_measurable"]) == 12
    assert not {"block0", "block3", "block7", "block13"} & set(das["not_measurable"])
    with pytest.raises(WinnowError, match="not measurable on the calibration data"):
        PassManager("drop-layers{count=1,source=das-skip}").run(source.clone(), ctx)
    assert ctx.report["drop-layers"]["dropped"] == ["block1"]
    _check_drop(ctx, source, model, feeds)


@pytest.mark.slow
@pytest.mark.parametrize("src", ["zoo:ppocr-det", "zoo:ppocr-rec"])
def test_ppocr_analyses_and_a_drop(src):
    ctx, source, model, feeds = _analyze_then_drop(src, "drop-layers{count=1}")
    similarity = ctx.analyses["layer-similarity"]
    rows = similarity["regions"]
    assert rows and all(r["measurable"] for r in rows)
    assert all(-1.0 <= r["cos"] <= 1.0 and -1.0 <= r["linear_cos"] <= 1.0 for r in rows)
    regions = find_regions(source)
    fixed = {r.name for r in regions.all() if not r.droppable}
    assert not fixed & {n for order in similarity["ranking"].values() for n in order}
    assert not fixed & set(ctx.analyses["das-skip"]["ranking"])
    assert all(math.isfinite(r["logit"]) for r in ctx.analyses["das-skip"]["regions"])
    assert ctx.report["drop-layers"]["dropped"] == similarity["ranking"]["block"][:1]
    _check_drop(ctx, source, model, feeds)
