"""Conv filter dependency groups (ir/conv_groups.py) and prune-channels on convs: the groups found
on a hand-built graph with BatchNorm, a residual Add, a depthwise conv and an SE gate; the OTO
oracle (removing channels = zeroing the weights that read them) on that graph and on every zoo
CNN including the two real PP-OCR files; the refit; the fixed groups and their reasons."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import winnow
from winnow.errors import PassConfigError, PassFailedError
from winnow.ir.conv_groups import channel_groups, prune_group, prune_groups, zero_group
from winnow.ir.execute import model_bytes, run
from winnow.passes import PassContext, PassManager

RNG = np.random.default_rng(0)


def _init(name, *shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.3, name)


def residual_se_model(concat: bool = False) -> ir.Model:
    """x -> conv1 -> BN -> Relu -+-> conv2 -> Add(+relu) -> depthwise -> SE gate Mul -> +c -> conv3.
    With `concat`, conv3 reads a Concat of the gated tensor and x instead."""
    bn = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
        (RNG.uniform(0.5, 1.5, 8), "g"), (RNG.standard_normal(8), "b"),
        (RNG.standard_normal(8) * 0.1, "mean"), (RNG.uniform(0.5, 2, 8), "var"))]
    inits = [_init("w1", 8, 3, 3, 3), _init("b1", 8), _init("w2", 8, 8, 3, 3),
             _init("wd", 8, 1, 3, 3), _init("bd", 8), _init("ws1", 4, 8, 1, 1),
             _init("bs1", 4), _init("ws2", 8, 4, 1, 1), _init("bs2", 8),
             _init("c", 1, 8, 1, 1), _init("w3", 6, 11 if concat else 8, 1, 1), *bn]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "mean", "var"], ["n1"], name="bn"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["a1"], name="residual"),
        helper.make_node("Conv", ["a1", "wd", "bd"], ["d1"], group=8, pads=[1, 1, 1, 1],
                         name="depthwise"),
        helper.make_node("GlobalAveragePool", ["d1"], ["p"], name="gap"),
        helper.make_node("Conv", ["p", "ws1", "bs1"], ["s1"], name="se1"),
        helper.make_node("Relu", ["s1"], ["s1r"], name="se_relu"),
        helper.make_node("Conv", ["s1r", "ws2", "bs2"], ["s2"], name="se2"),
        helper.make_node("HardSigmoid", ["s2"], ["gate"], name="gate"),
        helper.make_node("Mul", ["d1", "gate"], ["m"], name="scale"),
        helper.make_node("Add", ["m", "c"], ["m2"], name="shift"),
    ]
    if concat:
        nodes.append(helper.make_node("Concat", ["m2", "x"], ["cat"], axis=1, name="cat"))
    nodes.append(helper.make_node("Conv", ["cat" if concat else "m2", "w3"], ["y"], name="conv3"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    return ir.serde.deserialize_model(proto)


FEEDS = {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}


def _clone(m: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(model_bytes(m)))


def _members(group):
    return {(m.role, m.node.name) for m in group.members}


def test_groups_follow_bn_residual_depthwise_and_se_gate():
    groups = {g.name: g for g in channel_groups(residual_se_model())}
    main = groups["conv1"]
    assert main.prunable and main.channels == 8
    assert _members(main) == {
        ("source", "conv1"), ("source", "conv2"), ("source", "se2"), ("norm", "bn"),
        ("depthwise", "depthwise"), ("sink", "conv2"), ("sink", "se1"), ("sink", "conv3"),
        ("const", "shift")}
    se = groups["se1"]
    assert se.prunable and se.channels == 4 and _members(se) == {("source", "se1"), ("sink", "se2")}
    assert groups["conv3"].reason == "'y' is a graph output"


def test_a_concat_reader_maps_the_group_into_the_concat_output():
    groups = {g.name: g for g in channel_groups(residual_se_model(concat=True))}
    main = groups["conv1"]
    assert main.prunable and len(main.maps) == 1
    follower = main.maps[0].target
    assert follower.follows and not follower.prunable and follower.channels == 11
    assert main.maps[0].positions.tolist() == list(range(8))  # x holds positions 8..10
    assert ("sink", "conv3") in _members(follower)


def cut_model(kind: str) -> ir.Model:
    """Two convs a (4 filters) and b (6) cut or joined on the channel axis before the convs that
    read them: concat (a, b -> Relu -> conv), concat-bn (a, b -> BN -> conv, then a nested
    Concat with a), split (a Split of b's 6 channels as 2 + 4), split-equal (3 + 3, no sizes),
    slice (b[1:5]); every path ends in a conv whose output is a graph output."""
    inits = [_init("wa", 4, 3, 3, 3), _init("ba", 4), _init("wb", 6, 3, 1, 1)]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1], name="a"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="b")]
    outs = ["y"]
    if kind == "concat":
        inits.append(_init("wc", 5, 10, 3, 3))
        nodes += [helper.make_node("Concat", ["a", "b"], ["ab"], axis=1, name="cat"),
                  helper.make_node("Relu", ["ab"], ["r"], name="relu"),
                  helper.make_node("Conv", ["r", "wc"], ["y"], pads=[1, 1, 1, 1], name="c")]
    elif kind == "concat-bn":
        inits += [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
            (RNG.uniform(0.5, 1.5, 10), "g"), (RNG.standard_normal(10), "beta"),
            (RNG.standard_normal(10) * 0.1, "mean"), (RNG.uniform(0.5, 2, 10), "var"))]
        inits.append(_init("wc", 5, 14, 1, 1))
        nodes += [helper.make_node("Concat", ["a", "b"], ["ab"], axis=-3, name="cat"),
                  helper.make_node("BatchNormalization", ["ab", "g", "beta", "mean", "var"],
                                   ["n"], name="bn"),
                  helper.make_node("Concat", ["n", "a"], ["aba"], axis=1, name="cat2"),
                  helper.make_node("Conv", ["aba", "wc"], ["y"], name="c")]
    elif kind.startswith("split"):
        sizes = [2, 4] if kind == "split" else [3, 3]
        inits += [_init("w1", 5, sizes[0], 3, 3), _init("w2", 5, sizes[1], 1, 1),
                  _init("wa2", 5, 4, 1, 1)]
        if kind == "split":
            inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        nodes += [helper.make_node("Split", ["b", "sizes"] if kind == "split" else ["b"],
                                   ["s1", "s2"], axis=1, name="split"),
                  helper.make_node("Conv", ["s1", "w1"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
                  helper.make_node("Conv", ["s2", "w2"], ["c2"], name="c2"),
                  helper.make_node("Conv", ["a", "wa2"], ["ca"], name="ca"),
                  helper.make_node("Add", ["c1", "c2"], ["c12"], name="add"),
                  helper.make_node("Add", ["c12", "ca"], ["y"], name="add2")]
    else:  # slice
        inits += [_init("ws", 5, 4, 1, 1), _init("wa2", 5, 4, 1, 1)] + [
            numpy_helper.from_array(np.array([v], np.int64), n)
            for n, v in (("starts", 1), ("ends", 5), ("axes", 1))]
        nodes += [helper.make_node("Slice", ["b", "starts", "ends", "axes"], ["sl"], name="slice"),
                  helper.make_node("Conv", ["sl", "ws"], ["cs"], name="cs"),
                  helper.make_node("Conv", ["a", "wa2"], ["ca"], name="ca"),
                  helper.make_node("Add", ["cs", "ca"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 3, 8, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                               for o in outs], inits)
    proto = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    return ir.serde.deserialize_model(proto)


CUT_KEEPS = {"a": [0, 3], "b": [1, 2, 4]}


@pytest.mark.parametrize("kind,shapes", [
    ("concat", {"ab": 5, "r": 5}), ("concat-bn", {"ab": 5, "n": 5, "aba": 7}),
    ("split", {"s1": 1, "s2": 2}), ("split-equal", {"s1": 2, "s2": 1}), ("slice", {"sl": 3})])
def test_cut_groups_prune_exactly_like_zeroing(kind, shapes):
    """OTO through the index maps: removing channels of a and b equals zeroing every weight that
    reads them (at the mapped positions of the Concat / Split / Slice outputs); the cut tensors
    get the right channel counts and ORT runs the pruned graph."""
    source = cut_model(kind)
    pruned, zeroed = _clone(source), _clone(source)
    groups = {g.name: g for g in channel_groups(pruned)}
    assert groups["a"].prunable and groups["b"].prunable
    assert any(g.follows for g in groups.values())
    prune_groups([(groups[n], k) for n, k in CUT_KEEPS.items()], pruned.graph)
    for g in channel_groups(zeroed):
        if g.name in CUT_KEEPS:
            zero_group(g, np.setdiff1d(np.arange(g.channels), CUT_KEEPS[g.name]), zeroed.graph)
    want, got, full = (run(m, FEEDS)["y"] for m in (zeroed, pruned, source))
    assert np.abs(full - want).max() > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    proto = onnx.load_from_string(model_bytes(pruned))
    del proto.graph.value_info[:]  # ONNX's own inference from the edited weights is the oracle
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    dims = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in inferred.graph.value_info
            if len(v.type.tensor_type.shape.dim) > 1}
    assert {n: dims[n] for n in shapes} == shapes
    values = {v.name: v for n in pruned.graph for v in n.outputs}
    assert {n: values[n].shape[1] for n in shapes} == shapes


def test_a_concat_that_reaches_a_graph_output_fixes_its_inputs():
    m = cut_model("concat")
    m.graph.outputs.append(next(v for n in m.graph for v in n.outputs if v.name == "ab"))
    groups = {g.name: g for g in channel_groups(m)}
    assert "'ab' is a graph output (its channels reach 'ab'" in groups["a"].reason
    assert not groups["b"].prunable


def test_a_cut_that_would_empty_an_output_is_refused_before_any_edit():
    m = cut_model("split")
    b = next(g for g in channel_groups(m) if g.name == "b")
    before = model_bytes(m)
    with pytest.raises(ValueError, match=r"'s1' \(follows b through Split 'split'\) would keep no "
                       "channels"):
        prune_groups([(b, [2, 3, 4, 5])], m.graph)
    assert model_bytes(m) == before
    with pytest.raises(ValueError, match="group 'b' has 6 channels; cannot keep 0"):
        prune_groups([(b, [])], m.graph)


@pytest.mark.parametrize("name,keep", [("conv1", [0, 2, 5, 7]), ("se1", [1, 3])])
def test_removing_channels_equals_zeroing_their_readers(name, keep):
    source = residual_se_model()
    pruned, zeroed = _clone(source), _clone(source)
    group = next(g for g in channel_groups(pruned) if g.name == name)
    prune_group(group, keep, pruned.graph)
    group = next(g for g in channel_groups(zeroed) if g.name == name)
    zero_group(group, np.setdiff1d(np.arange(group.channels), keep), zeroed.graph)
    want, got = run(zeroed, FEEDS)["y"], run(pruned, FEEDS)["y"]
    full = run(source, FEEDS)["y"]
    assert np.abs(full - want).max() > 1e-2  # the zeroed channels did matter
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    params = sum(v.const_value.size for v in pruned.graph.initializers.values())
    assert params < sum(v.const_value.size for v in source.graph.initializers.values())


def test_pass_prunes_rounds_and_refits_convs():
    calibration = [{"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    errors, source = {}, residual_se_model()  # one set of weights for both runs and the oracle
    for refit in ("false", "true"):
        m, ctx = _clone(source), PassContext(calibration=calibration)
        m = PassManager(f"prune-channels{{ratio=0.3,refit={refit},kind=conv}}").run(m, ctx).model
        assert ctx.report["prune-channels"]["pruned"] == {"conv1": [8, 6], "se1": [4, 3]}
        errors[refit] = np.abs(run(m, FEEDS)["y"] - run(source, FEEDS)["y"]).mean()
    assert all(0 < r2 <= 1 for r2 in ctx.report["prune-channels"]["refit_r2"].values())
    assert errors["true"] < 0.9 * errors["false"]  # on held-out inputs, random weights


def test_a_group_name_that_does_not_exist_lists_the_valid_ones():
    with pytest.raises(PassFailedError, match="no prunable MLP or conv group named 'conv9'.*conv1"):
        PassManager("prune-channels{ratio=0.5,regions=[conv9]}").run(residual_se_model(),
                                                                      PassContext())


@pytest.mark.slow
@pytest.mark.parametrize("zoo,mapped", [("digits-cnn", 0), ("ppocr-det", 4), ("ppocr-rec", 0)])
def test_zoo_cnns_prune_exactly_like_zeroing(zoo, mapped):
    """The OTO check on real graphs (two of them foreign ONNX files nobody here exported): a
    quarter of every prunable group's channels removed equals their readers zeroed; on
    ppocr-det four FPN branches reach the head through the Concat's index map."""
    from winnow.models_zoo import get

    source = PassManager("shape-inference").run(winnow.load(f"zoo:{zoo}"), PassContext()).model
    feeds = {k: v[:1] for k, v in get(zoo).split("heldout")[0].items()}
    pruned, zeroed = _clone(source), _clone(source)
    groups = [g for g in channel_groups(source) if g.prunable]
    assert len(groups) >= 3 and sum(bool(g.maps) for g in groups) == mapped
    rng = np.random.default_rng(0)
    keeps = {g.name: np.sort(rng.choice(g.channels, g.channels - g.channels // 4, replace=False))
             for g in groups}
    prune_groups([(g, keeps[g.name]) for g in channel_groups(pruned) if g.prunable],
                 pruned.graph)
    for g in channel_groups(zeroed):
        if g.prunable:
            zero_group(g, np.setdiff1d(np.arange(g.channels), keeps[g.name]), zeroed.graph)
    full = run(source, feeds)
    for full_out, want, got in zip(full.values(), run(zeroed, feeds).values(),
                                   run(pruned, feeds).values()):
        scale = max(1.0, float(np.abs(full_out).max()))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_weight_scores_of_a_conv_group_match_the_filter_norms():
    from winnow.ir.pruning import const_array

    m, ctx = residual_se_model(), PassContext()
    PassManager("channel-importance{score=weight}").run(m, ctx)
    entry = next(g for g in ctx.analyses["channel-importance"]["conv_groups"] if g["group"] == "se1")
    nodes = {n.name: n for n in m.graph}
    ws1, ws2 = (const_array(nodes[n].inputs[1]) for n in ("se1", "se2"))
    want = np.linalg.norm(ws1.reshape(4, -1), axis=1) * np.linalg.norm(
        ws2.transpose(1, 0, 2, 3).reshape(4, -1), axis=1)
    np.testing.assert_allclose(entry["scores"], want, rtol=1e-6)
    fixed = next(g for g in ctx.analyses["channel-importance"]["conv_groups"]
                 if g["group"] == "conv3")
    assert fixed["scores"] is None and fixed["reason"] == "'y' is a graph output"


@pytest.mark.parametrize("op,attrs,wshape", [
    ("ConvTranspose", {"strides": [2, 2], "pads": [1, 1, 1, 1]}, (5, 4, 4, 4)),
    ("ConvTranspose", {"strides": [2, 2], "dilations": [1, 2], "output_padding": [1, 1]},
     (5, 4, 3, 2)),
    ("Conv", {"strides": [2, 1], "pads": [1, 0, 1, 2]}, (4, 5, 3, 3))])
def test_refit_features_reproduce_the_readers_output(op, attrs, wshape):
    """The refit's patches times the weight (in its fitted layout) give ORT's output at every
    sampled position, for Conv and ConvTranspose readers (the refit solves for exactly this)."""
    from winnow.ir.conv_refit import _features, _rows, _sample_positions, refittable

    w = RNG.standard_normal(wshape).astype(np.float32)
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"], **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 6, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    m = ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    x = RNG.standard_normal((2, 5, 6, 7)).astype(np.float32)
    y = run(m, {"x": x})["y"].astype(np.float64)
    node = next(iter(m.graph))
    assert refittable(node)
    pos = _sample_positions(y.shape, np.random.default_rng(0))
    matrix = w.transpose(0, 2, 3, 1).reshape(-1, w.shape[1]) if op == "ConvTranspose" \
        else w.reshape(w.shape[0], -1).T
    got = _features(node, x.astype(np.float64), pos) @ matrix
    np.testing.assert_allclose(got, _rows(y, pos), atol=1e-4)


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_a_conv_ratio_outside_zero_to_one_is_refused(ratio):
    with pytest.raises(PassConfigError, match="ratio"):
        PassManager(f"prune-channels{{ratio={ratio},kind=conv}}")


def test_refitting_an_unpruned_conv_transpose_gives_back_its_weights():
    """Fixed point of the refit: fitted to its own outputs, a ConvTranspose reader (written back
    in its [in, out, kh, kw] layout) keeps its weights and bias."""
    from winnow.ir.conv_refit import capture_targets, refit_readers
    from winnow.ir.pruning import const_array

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], name="a"),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["y"], strides=[2, 2],
                          pads=[1, 1, 1, 1], name="t")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("wa", 4, 3, 3, 3), _init("wt", 4, 3, 4, 4), _init("bt", 3)])
    m = ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    node = next(n for n in m.graph if n.name == "t")
    before = [const_array(node.inputs[k]).copy() for k in (1, 2)]
    batches = [{"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    r2 = refit_readers(m, capture_targets(m, [node], batches), batches, ridge=0.0)
    assert r2["t"] > 1 - 1e-9
    for want, k in zip(before, (1, 2)):
        np.testing.assert_allclose(const_array(node.inputs[k]), want, atol=1e-4)


def test_the_report_counts_prunable_following_and_fixed_channels():
    from winnow.driver.report_html import _conv_summary

    m, ctx = cut_model("concat"), PassContext()
    PassManager("channel-importance{score=weight}").run(m, ctx)
    entries = ctx.analyses["channel-importance"]["conv_groups"]
    assert [e["group"] for e in entries if e["follows"]] == ["ab"]
    assert _conv_summary(entries) == (
        "2 prunable groups (10 channels); 1 Concat/Split/Slice outputs follow them (10 channels "
        "pruned at the mapped positions); 1 kept whole (5 channels).")


def test_a_reader_with_fewer_rows_than_weights_is_not_refitted():
    """An SE conv reads one pooled pixel per image: with 2 images its fit would rest on 2 rows,
    so the refit leaves it as pruned (and still refits conv2: 128 rows, 54 weights)."""
    calibration = [{"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}]
    m, ctx = residual_se_model(), PassContext(calibration=calibration)
    m = PassManager("prune-channels{ratio=0.25,refit=true,kind=conv}").run(m, ctx).model
    fitted = ctx.report["prune-channels"]["refit_r2"]
    assert "conv2" in fitted and "se1" not in fitted and "se2" not in fitted


def test_the_pass_prunes_and_refits_through_a_concat():
    """prune-channels on Conv->Concat->Conv: both input groups pruned, the Concat's reader sliced
    to the kept positions and refitted (it is only a sink of the follower), error lowered."""
    calibration = [{"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    errors, source = {}, cut_model("concat")
    for refit in ("false", "true"):
        m, ctx = _clone(source), PassContext(calibration=calibration)
        m = PassManager(f"prune-channels{{ratio=0.5,refit={refit},kind=conv}}").run(m, ctx).model
        assert ctx.report["prune-channels"]["pruned"] == {"a": [4, 2], "b": [6, 3]}
        conv = next(n for n in m.graph if n.name == "c")
        assert conv.inputs[1].const_value.shape[1] == 5
        errors[refit] = np.abs(run(m, FEEDS)["y"] - run(source, FEEDS)["y"]).mean()
    assert "c" in ctx.report["prune-channels"]["refit_r2"]
    assert errors["true"] < 0.9 * errors["false"]  # on held-out inputs
