"""The torch runner (`ir/torch_exec.py`) against ONNX Runtime, and `distill` against the torch
source model: distilling after pruning brings held-out outputs back toward the unpruned model's."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
import torch

import winnow
from tests.graphs import HEADER, parse
from tests.tiny_models import TinyTransformer
from winnow.errors import PassConfigError, PassFailedError
from winnow.ir.execute import run
from winnow.ir.torch_exec import TorchGraph, unsupported_ops
from winnow.passes.rewrite.distill import (DistillPass, cosine_lr, hidden_states, lookup_tables,
                                           regroup, training_batches)
from winnow.passes import PassContext, PassManager

RNG = np.random.default_rng(0)
CALIBRATION = [{"x": RNG.standard_normal((16, 6, 32)).astype(np.float32)} for _ in range(6)]
HELDOUT = np.random.default_rng(1).standard_normal((32, 6, 32)).astype(np.float32)

SHAPES = HEADER + """
agraph (float[2, 3, 4] x) => (float[2, 12] y, float[2, 1, 4] r, float[3, 2, 4] g, float[2, 2] s)
<int64[1] zero = {0}, int64[1] one = {1}, int64[1] minus = {-1}, int64[2] two = {2, 2},
 float[1] cst = {0.5}, int64[2] axes = {1, 2}> {
    sh = Shape (x)
    first = Slice (sh, zero, one)
    dims = Concat <axis = 0> (first, minus)
    y = Reshape (x, dims)
    r = ReduceL2 <keepdims = 1> (x, one)
    idx = Constant <value = int64[3] {2, 0, -1}> ()
    t = Transpose <perm = [1, 0, 2]> (x)
    g = Gather <axis = 0> (t, idx)
    e = Expand (cst, two)
    a, b = Split <axis = 1, num_outputs = 2> (x)
    m = ReduceMean <keepdims = 0> (a, axes)
    n = ReduceMax <keepdims = 0> (b, axes)
    mn = Min (m, n)
    s = Sub (e, mn)
}
"""

NUMERIC = '<ir_version: 9, opset_import: ["" : 20]>' + """
agraph (float[2, 3, 8] x, int64[2, 3] ids) => (float[2, 3, 8] y, float[2, 8] p)
<float[8] scale = {1.0, 0.5, 2.0, 1.5, 1.0, 0.25, 3.0, 1.0}, float[8] bias = {0, 1, 0, -1, 0, 2, 0, 1},
 float[8, 8] w = {""" + ", ".join(f"{v:.3f}" for v in np.random.default_rng(3).standard_normal(64)) + """},
 float[5, 8] table = {""" + ", ".join(f"{v:.3f}" for v in np.random.default_rng(4).standard_normal(40)) + """},
 float lo = {-0.5}, float hi = {0.5}, int64 start = {0}, int64 stop = {3}, int64 step = {1},
 int64[1] one = {1}> {
    ln = LayerNormalization <axis = -1, epsilon = 0.00001> (x, scale, bias)
    mm = MatMul (ln, w)
    ge = Gelu (mm)
    sm = Softmax <axis = -1> (ge)
    em = Gather (table, ids)
    cl = Clip (em, lo, hi)
    mk = GreaterOrEqual (cl, lo)
    ab = Abs (x)
    sq = Sqrt (ab)
    ng = Neg (sq)
    y = Where (mk, sm, ng)
    pos = Range (start, stop, step)
    cast = Cast <to = 1> (pos)
    col = Unsqueeze (cast, one)
    er = Erf (y)
    pr = Mul (er, col)
    p = ReduceSum <keepdims = 0> (pr, one)
}
"""

CONV = HEADER + """
agraph (float[2, 3, 9, 9] x) => (float[2, 4] y)
<float[4, 3, 3, 3] w = {""" + ", ".join(f"{v:.3f}" for v in np.random.default_rng(5).standard_normal(108)) + """},
 float[4] b = {0.1, -0.2, 0.3, 0.0}, float[4] s = {1.0, 0.5, 2.0, 1.5}, float[4] m = {0.1, 0.0, -0.1, 0.2},
 float[4] v = {1.0, 2.0, 0.5, 1.5}, float[4, 4] g = {""" + ", ".join(f"{v:.3f}" for v in np.random.default_rng(6).standard_normal(16)) + """}> {
    c = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w, b)
    n = BatchNormalization (c, s, b, m, v)
    h = HardSigmoid (n)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (h)
    a = GlobalAveragePool (p)
    f = Flatten (a)
    y = Gemm <transB = 1, alpha = 0.5> (f, g, b)
}
"""


def _feeds(model):
    rng = np.random.default_rng(2)
    feeds = {}
    for value in model.graph.inputs:
        shape = list(value.shape)
        feeds[value.name] = rng.integers(0, 5, shape).astype(np.int64) \
            if value.dtype == ir.DataType.INT64 else rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("text", [SHAPES, NUMERIC, CONV], ids=["shapes", "numeric", "conv"])
def test_torch_runner_matches_onnx_runtime(text):
    model = parse(text)
    feeds = _feeds(model)
    expected = run(model, feeds)
    with torch.no_grad():
        got = TorchGraph(model)({k: torch.from_numpy(v) for k, v in feeds.items()})
    assert [v.name for v in model.graph.outputs] == list(expected)
    for (name, want), out in zip(expected.items(), got):
        assert out.shape == want.shape, name
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_torch_runner_names_what_it_cannot_run():
    model = parse(HEADER + """
agraph (float[2, 4] x) => (float[2, 4] y) {
    t = Relu (x)
    y = LpNormalization (t)
}
""")
    assert unsupported_ops(model) == ["LpNormalization"]
    with pytest.raises(PassConfigError, match="LpNormalization"):
        TorchGraph(model)


def test_float_weights_are_parameters_and_write_back():
    model = parse(CONV)
    net = TorchGraph(model)
    assert {p.numel() for p in net.parameters()} == {108, 4, 16}
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    assert net.write_back() == 6
    np.testing.assert_allclose(model.graph.initializers["b"].const_value.numpy(),
                               [0.2, -0.4, 0.6, 0.0], rtol=1e-6)


@pytest.fixture(scope="module")
def pruned_pair():
    """The torch oracle's held-out output, and the exported IR (pruned later per test)."""
    net = TinyTransformer(layers=2, seed=4)
    with torch.no_grad():
        oracle = net(torch.from_numpy(HELDOUT)).numpy()
    model = winnow.load(net, (torch.randn(2, 6, 32),), dynamic_shapes=({0: "batch"},))
    return oracle, model


def _heldout_error(model, oracle):
    out = next(iter(run(model, {"x": HELDOUT}).values()))
    return float(((out - oracle) ** 2).mean() / (oracle**2).mean())


@pytest.mark.parametrize("batch,schedule", [(0, "plateau"), (48, "plateau"), (0, "cosine")])
def test_distill_recovers_what_pruning_lost(pruned_pair, batch, schedule):
    oracle, source = pruned_pair
    plain, distilled = source.clone(), source.clone()
    PassManager("prune-channels{ratio=0.5}").run(plain, PassContext(calibration=CALIBRATION))
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("prune-channels{ratio=0.5},"
                f"distill{{steps=200,lr=0.003,check_every=20,batch={batch},schedule={schedule}}}"
                ).run(distilled, ctx)
    before, after = _heldout_error(plain, oracle), _heldout_error(distilled, oracle)
    assert before > 1e-3  # pruning half the MLP channels did lose something
    assert after < 0.7 * before, (before, after)
    report = ctx.report["distill"]
    assert report["best_step"] > 0 and report["held_back_loss"][1] < report["held_back_loss"][0]
    # the structure is untouched: same node count and weight shapes as the pruned model
    assert len(list(distilled.graph)) == len(list(plain.graph))
    assert {n: v.shape for n, v in distilled.graph.initializers.items()} == \
        {n: v.shape for n, v in plain.graph.initializers.items()}


def test_hidden_states_are_the_normalization_outputs():
    assert hidden_states(parse(CONV)) == ["n"]
    assert hidden_states(parse(NUMERIC)) == ["ln"]
    assert hidden_states(parse(SHAPES)) == []


def test_feature_distillation_matches_the_shared_hidden_states(pruned_pair):
    oracle, source = pruned_pair
    norms = len(hidden_states(source))
    assert norms >= 5  # two pre-norm blocks of two LayerNorms each, then the final one
    plain, distilled = source.clone(), source.clone()
    PassManager("prune-channels{ratio=0.5}").run(plain, PassContext(calibration=CALIBRATION))
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("prune-channels{ratio=0.5},distill{steps=200,lr=0.003,check_every=20,hidden=1}"
                ).run(distilled, ctx)
    # width pruning keeps every hidden state's name and shape, so all of them are matched
    assert ctx.report["distill"]["hidden_states"] == norms
    before, after = _heldout_error(plain, oracle), _heldout_error(distilled, oracle)
    assert after < 0.7 * before, (before, after)


def test_feature_distillation_skips_hidden_states_the_student_lost(pruned_pair):
    _, source = pruned_pair
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("drop-layers{count=1},distill{steps=3,hidden=1}").run(source.clone(), ctx)
    shared = ctx.report["distill"]["hidden_states"]
    assert 0 < shared < len(hidden_states(source))  # the dropped block's norms are gone


EMBED = '<ir_version: 9, opset_import: ["" : 20]>' + """
agraph (int64[4, 3] ids) => (float[4, 3, 8] y)
<float[5, 8] table = {""" + ", ".join(f"{v:.3f}" for v in np.random.default_rng(7).standard_normal(40)) + """},
 float[8, 8] w = {""" + ", ".join(f"{v:.3f}" for v in np.random.default_rng(8).standard_normal(64)) + """}> {
    em = Gather (table, ids)
    y = MatMul (em, w)
}
"""


def test_lookup_tables_stay_frozen_unless_asked():
    assert lookup_tables(parse(NUMERIC)) == {"table"}
    calibration = [_feeds(parse(EMBED)) for _ in range(2)]
    for embeddings in (False, True):
        teacher, student = parse(EMBED), parse(EMBED)
        table = teacher.graph.initializers["table"].const_value.numpy().copy()
        for name in ("w", "table"):  # both off, so training has a reason to move both
            value = student.graph.initializers[name]
            value.const_value = ir.tensor(value.const_value.numpy() * 0.5, name=name)
        distill = DistillPass(steps=20, lr=0.01, check_every=1, embeddings=embeddings)
        with PassContext(calibration=calibration) as ctx:
            distill.see_pipeline_input(teacher)
            distill.call(student)
        assert ctx.report["distill"]["best_step"] > 0
        moved = student.graph.initializers["table"].const_value.numpy()
        assert (not np.array_equal(moved, table * 0.5)) == embeddings


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA GPU")
def test_distill_on_cuda_without_a_gpu_is_a_clear_error(pruned_pair):
    with pytest.raises(PassFailedError, match="no CUDA GPU"):
        PassManager("distill{device=cuda}").run(pruned_pair[1].clone(),
                                                PassContext(calibration=CALIBRATION))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", [SHAPES, NUMERIC, CONV], ids=["shapes", "numeric", "conv"])
def test_torch_runner_on_cuda_matches_onnx_runtime(text):
    model = parse(text)
    feeds = _feeds(model)
    expected = run(model, feeds)
    got = TorchGraph(model, "cuda")({k: torch.from_numpy(v).cuda() for k, v in feeds.items()})
    for value, out in zip(model.graph.outputs, got):
        np.testing.assert_allclose(out.detach().cpu().numpy(), expected[value.name],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_distill_on_cuda_recovers_what_pruning_lost(pruned_pair):
    oracle, source = pruned_pair
    plain, distilled = source.clone(), source.clone()
    PassManager("prune-channels{ratio=0.5}").run(plain, PassContext(calibration=CALIBRATION))
    PassManager("prune-channels{ratio=0.5},distill{steps=200,lr=0.003,check_every=20,"
                "device=cuda,hidden=1}").run(distilled, PassContext(calibration=CALIBRATION))
    assert _heldout_error(distilled, oracle) < 0.7 * _heldout_error(plain, oracle)


def test_distill_trains_on_the_training_data_when_there_is_some(pruned_pair):
    _, source = pruned_pair
    extra = [{"x": b["x"] * 2} for b in CALIBRATION[:2]]
    assert training_batches(source, PassContext(calibration=CALIBRATION)) == CALIBRATION
    assert training_batches(source, PassContext(calibration=CALIBRATION, training=lambda: extra)) \
        is not CALIBRATION
    got = training_batches(source, PassContext(calibration=CALIBRATION, training=lambda: extra))
    assert [b["x"].tolist() for b in got] == [b["x"].tolist() for b in extra]
    ctx = PassContext(calibration=CALIBRATION, training=extra)
    PassManager("prune-channels{ratio=0.5},distill{steps=5,samples=1000}").run(source.clone(), ctx)
    # 2 batches of 16 rows: 2 of each held back, the rest trained on; calibration unused
    assert ctx.report["distill"]["samples"] == [28, 4]


def test_distill_keeps_the_input_when_training_only_hurts(pruned_pair):
    _, source = pruned_pair
    model = source.clone()
    PassManager("prune-channels{ratio=0.5}").run(model, PassContext(calibration=CALIBRATION))
    weights = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("distill{steps=5,lr=50.0,check_every=1}").run(model, ctx)
    assert ctx.report["distill"]["best_step"] == 0
    for name, value in model.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), weights[name])


def test_regroup_keeps_every_row_in_order_and_groups_by_shape():
    rng = np.random.default_rng(7)
    long = [{"x": rng.standard_normal((n, 6, 2)).astype(np.float32)} for n in (16, 16, 5)]
    short = {"x": rng.standard_normal((4, 3, 2)).astype(np.float32)}
    got = regroup([long[0], short, *long[1:]], 24)
    assert [b["x"].shape for b in got] == [(24, 6, 2), (13, 6, 2), (4, 3, 2)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got[:2]]),
                                  np.concatenate([b["x"] for b in long]))
    np.testing.assert_array_equal(got[2]["x"], short["x"])


def test_distill_batch_regroups_the_rows_before_holding_back(pruned_pair):
    _, source = pruned_pair
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("prune-channels{ratio=0.5},distill{steps=5,batch=3}").run(source.clone(), ctx)
    # 96 rows in 32 batches of 3: one of each held back (6 batches of 16 would hold back 12)
    assert ctx.report["distill"]["samples"] == [64, 32]


def test_distill_batch_on_a_fixed_batch_model_is_a_clear_error():
    model = parse(SHAPES)
    ctx = PassContext(calibration=[_feeds(model) for _ in range(4)])
    with pytest.raises((PassConfigError, PassFailedError), match="batch size is fixed"):
        PassManager("distill{batch=4}").run(model, ctx)


@pytest.mark.parametrize("patience", [1, 3])
def test_the_rate_halves_after_patience_checks_without_improvement(pruned_pair, patience):
    _, source = pruned_pair
    ctx = PassContext(calibration=CALIBRATION)
    PassManager(f"distill{{steps=1000,lr=50.0,check_every=1,patience={patience}}}").run(
        source.clone(), ctx)
    # every check is worse: halved once per `patience` steps, stopped below lr / 1024 (11 halvings)
    assert ctx.report["distill"]["best_step"] == 0
    assert ctx.report["distill"]["steps"] == 11 * patience


def test_cosine_lr_warms_up_then_decays_to_zero():
    assert cosine_lr(0.5, 0.0) == 0.0
    assert cosine_lr(0.5, 0.01) == pytest.approx(0.25)  # half-way through the 2% warm-up
    assert cosine_lr(0.5, 0.02) == pytest.approx(0.5)
    assert cosine_lr(0.5, 0.51) == pytest.approx(0.25)  # half-way through the decay
    assert cosine_lr(0.5, 0.755) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)) / 2)
    assert cosine_lr(0.5, 1.0) == pytest.approx(0.0)
    assert cosine_lr(0.5, 3.0) == pytest.approx(0.0)


def test_the_cosine_schedule_runs_every_step_without_halving(pruned_pair):
    _, source = pruned_pair
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("distill{steps=40,lr=50.0,check_every=1,schedule=cosine}").run(source.clone(), ctx)
    # the plateau schedule stops this run after 11 steps (see above); cosine goes to the end and
    # still keeps the best held-back weights, here the ones it received
    assert ctx.report["distill"]["steps"] == 40
    assert ctx.report["distill"]["best_step"] == 0


def test_distill_leaves_the_matmul_precision_as_it_found_it(pruned_pair):
    _, source = pruned_pair
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        PassManager("distill{steps=3,tf32=true}").run(source.clone(),
                                                      PassContext(calibration=CALIBRATION))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_distill_refuses_calibration_of_single_samples(pruned_pair):
    _, source = pruned_pair
    single = [{"x": b["x"][:1]} for b in CALIBRATION]
    with pytest.raises(PassFailedError, match="at least 2 samples"):
        PassManager("distill").run(source.clone(), PassContext(calibration=single))


def test_contrib_ops_are_named_with_their_domain():
    model = parse(SHAPES)
    next(n for n in model.graph if n.op_type == "Transpose").domain = "com.microsoft"
    assert unsupported_ops(model) == ["com.microsoft.Transpose"]
    with pytest.raises(PassConfigError, match="before fuse / quantize"):
        TorchGraph(model)


def test_distill_stops_at_its_time_limit(pruned_pair):
    _, source = pruned_pair
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("prune-channels{ratio=0.5},distill{steps=1000000,lr=0.001,max_seconds=1}").run(
        source.clone(), ctx)
    assert 1 <= ctx.report["distill"]["steps"] < 1000000


@pytest.mark.parametrize("rows,pipeline,message", [
    ("4", "distill{steps=0}", "steps"),
    ("4", "distill{lr=-1}", "lr"),
    ("4", "distill", "at least 2 batches for a model of fixed batch size"),
    ("N", "distill", "cannot execute LpNormalization"),
    ("4", "distill{device=tpu}", "device"),
    ("4", "distill{batch=2}", "batch size is fixed"),
    ("4", "distill{batch=-1}", "batch"),
    ("4", "distill{schedule=linear}", "must be one of plateau, cosine"),
    ("4", "distill{tf32=maybe}", "tf32"),
    pytest.param("N", "distill{device=cuda}", "no CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this host has a CUDA GPU")),
])
def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, rows, pipeline, message):
    from click.testing import CliRunner

    from winnow.cli import cli

    source = tmp_path / "lp.onnx"
    model = parse(HEADER + """
agraph (float[""" + rows + """, 8] x) => (float[""" + rows + """, 8] y)
<float[8, 8] w = {""" + ", ".join("0.1" for _ in range(64)) + """}> {
    t = MatMul (x, w)
    y = LpNormalization (t)
}
""")
    source.write_bytes(ir.serde.serialize_model(model).SerializeToString())
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["--quiet", "compile", str(source), "-o", str(out),
                                      "--pipeline", pipeline])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and not out.exists()


def test_kl_loss_is_the_softmax_divergence_computed_by_hand():
    from winnow.passes.rewrite.distill import _batch_kl

    rng = np.random.default_rng(5)
    teacher, student = rng.standard_normal((2, 3, 7)), rng.standard_normal((2, 3, 7))

    def softmax(a):
        e = np.exp(a - a.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher), softmax(student)
    want = float(np.mean(np.sum(p * np.log(p / q), axis=-1)))
    got = _batch_kl([torch.from_numpy(student)], {"y": torch.from_numpy(teacher)}, ["y"])
    assert float(got) == pytest.approx(want, rel=1e-9)
    shifted = _batch_kl([torch.from_numpy(teacher + 3.0)], {"y": torch.from_numpy(teacher)}, ["y"])
    assert abs(float(shifted)) < 1e-12  # logits up to a constant are the same distribution


@pytest.mark.parametrize("choice,kind,want", [("auto", "causal-lm", "kl"),
                                              ("auto", "image-classifier", "mse"),
                                              ("auto", None, "mse"), ("mse", "causal-lm", "mse"),
                                              ("kl", None, "kl")])
def test_auto_loss_follows_the_kind_of_model(choice, kind, want):
    from winnow.passes.rewrite.distill import output_loss

    assert output_loss(choice, {} if kind is None else {"model_kind": kind}) == want


def test_distill_of_logits_trains_on_kl_and_lowers_it(pruned_pair):
    from winnow.passes.rewrite.distill import _batch_kl

    source = pruned_pair[1]
    drop = "drop-layers{count=1,level=block,replacement=identity}"
    runs = {}
    for pipeline in (drop, drop + ",distill{steps=30,lr=0.001,check_every=5}"):
        ctx = PassContext(calibration=CALIBRATION, options={"model_kind": "causal-lm"})
        runs[pipeline] = PassManager(pipeline).run(source.clone(), ctx).model
    assert ctx.report["distill"]["loss"] == "kl" and ctx.report["distill"]["best_step"] > 0
    names = [v.name for v in source.graph.outputs]

    def kl(model):  # on rows distill never saw
        feeds = {"x": HELDOUT}
        return float(_batch_kl([torch.from_numpy(run(model, feeds)[n]) for n in names],
                               {n: torch.from_numpy(v) for n, v in run(source, feeds).items()},
                               names))

    dropped, distilled = (kl(m) for m in runs.values())
    assert distilled < 0.9 * dropped


def test_an_unknown_loss_is_a_clear_error():
    with pytest.raises(PassConfigError, match="'loss' must be one of auto, mse, kl; got 'foo'"):
        PassManager("distill{loss=foo}")
