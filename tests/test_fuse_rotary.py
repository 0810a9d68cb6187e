"""fuse_rotary: rotary embeddings over constant half-split cos/sin tables become ONNX Runtime's
RotaryEmbedding (torch is the oracle); tables whose halves differ and the interleaved layout are
left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import nn

import winnow
from winnow.ir.execute import run
from winnow.passes import PassContext, PassManager
from winnow.passes.rewrite import fuse as fuse_module
from winnow.passes.rewrite.fuse_rotary import fuse_rotary_tables, is_half_split

DIM, HEADS, KV_HEADS, HEAD_DIM, MAX_SEQ = 32, 4, 2, 8, 24
SHAPES = [(1, 5), (3, 12)]  # (batch, seq) the fused model is checked at


def tables(half_split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [MAX_SEQ, HEAD_DIM]: rows [a, a] (half-split) or angles over the whole row."""
    steps = HEAD_DIM // 2 if half_split else HEAD_DIM
    inv = 1.0 / 100.0 ** (torch.arange(steps, dtype=torch.float32) / steps)
    angles = torch.outer(torch.arange(MAX_SEQ, dtype=torch.float32), inv)
    if half_split:
        angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


class RopeQK(nn.Module):
    """q [B, 4, S, 8] and k [B, 2, S, 8] projections of x, each rotated by table rows
    [start, start + S): two rotary applications."""

    def __init__(self, half_split: bool = True, interleaved: bool = False, start: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.rotate = rotate_interleaved if interleaved else rotate_half
        self.start = start
        cos, sin = tables(half_split)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        cos = self.cos[self.start:self.start + t]
        sin = self.sin[self.start:self.start + t]
        q = self.q(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(x).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        return q * cos + self.rotate(q) * sin, k * cos + self.rotate(k) * sin


def inputs(batch: int, seq: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, seq, DIM)).astype(np.float32)


def fused(net: RopeQK, pipeline: str):
    """The exported net after `pipeline`, and fuse's report."""
    model = winnow.load(net, (torch.randn(2, 7, DIM),),
                        dynamic_shapes=({0: "batch", 1: "seq"},))
    ctx = PassContext(calibration=[{"x": inputs(2, 9, 1)}, {"x": inputs(4, 6, 2)}])
    PassManager(pipeline).run(model, ctx)
    return model, ctx.report["fuse"]


def assert_matches_torch(net: RopeQK, model) -> None:
    for batch, seq in SHAPES:
        x = inputs(batch, seq, 10 + seq)
        with torch.no_grad():
            want = [t.numpy() for t in net(torch.from_numpy(x))]
        got = list(run(model, {"x": x}).values())
        assert len(got) == 2
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def op_count(model, op_type: str) -> int:
    return sum(n.op_type == op_type and n.domain == "com.microsoft" for n in model.graph)


@pytest.mark.parametrize("pipeline", ["fuse{attention=false}", "fuse"])
@pytest.mark.parametrize("start", [0, 3])
def test_half_split_tables_become_rotary_embedding(pipeline, start):
    net = RopeQK(start=start)
    model, report = fused(net, pipeline)
    assert op_count(model, "RotaryEmbedding") == 2
    assert report["fusions"]["rotary_embedding_tables"] == 2
    assert not {"Neg", "Sin", "Cos"} & {n.op_type for n in model.graph}
    assert_matches_torch(net, model)


@pytest.mark.parametrize("kind", ["halves-differ", "interleaved"])
def test_other_rotations_are_left_alone(kind):
    net = RopeQK(half_split=False) if kind == "halves-differ" else RopeQK(interleaved=True)
    model, report = fused(net, "fuse{attention=false}")
    assert "skipped" not in report  # not refused by fuse's output check: never rewritten
    assert op_count(model, "RotaryEmbedding") == 0
    assert "rotary_embedding_tables" not in report["fusions"]
    assert sum(n.op_type == "Neg" for n in model.graph) == 2  # the rotations are still there
    assert_matches_torch(net, model)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("kind,count", [("half-split", 2), ("halves-differ", 0)])
def test_the_rule_alone_checks_the_tables(kind, count, per_token):
    """Without fuse's output check behind it: the rule rewrites only half-split tables, with
    position_ids [start] or [batch, seq]."""
    net = RopeQK(half_split=kind == "half-split", start=2)
    model = winnow.load(net, (torch.randn(2, 7, DIM),), dynamic_shapes=({0: "batch", 1: "seq"},))
    assert fuse_rotary_tables(model, per_token) == count
    assert op_count(model, "RotaryEmbedding") == count
    assert_matches_torch(net, model)


def test_rotary_false_leaves_the_rotation_unfused():
    model, report = fused(RopeQK(), "fuse{attention=false,rotary=false}")
    assert op_count(model, "RotaryEmbedding") == 0


def test_a_fused_model_that_does_not_run_is_skipped(monkeypatch):
    """A fusion whose result ONNX Runtime refuses to load (onnxscript's GQA fusion did that with
    position_ids [start]) leaves the model unfused instead of failing the pass."""
    real = fuse_module.fuse_for_ort

    def unloadable(model, attention=True):
        counts = real(model, attention)
        out = model.graph.outputs[0]
        axes = ir.node("Constant", [], {"value": ir.tensor(np.array([7], np.int64))})
        bad = ir.node("ReduceMax", [out, axes.outputs[0]], {"keepdims": 0})
        model.graph.extend([axes, bad])
        model.graph.outputs[0] = bad.outputs[0]
        RemoveUnusedNodesPass()(model)
        return counts

    monkeypatch.setattr(fuse_module, "fuse_for_ort", unloadable)
    net = RopeQK()
    model, report = fused(net, "fuse{attention=false}")
    assert "does not run" in report["skipped"]
    assert op_count(model, "RotaryEmbedding") == 0
    assert_matches_torch(net, model)


def test_half_split_check():
    cos, _ = tables(True)
    assert is_half_split(cos.numpy())
    assert not is_half_split(tables(False)[0].numpy())
    nearly = cos.numpy().copy()
    nearly[5, -1] += 1e-6
    assert not is_half_split(nearly)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["fuse{attention=false}", "fuse"])
def test_tiny_gpt_rotary_embeddings_fuse_losslessly(pipeline):
    """tiny-gpt: 4 layers x (q, k) = 8 rotary applications lowered; with attention they are then
    folded into GroupQueryAttention (do_rotary). Outputs within 1e-4 of the unfused model."""
    from winnow import models_zoo

    zm = models_zoo.get("tiny-gpt")
    model = zm.load_ir()
    reference = model.clone()
    ctx = PassContext(calibration=zm.calibration())
    assert PassManager(pipeline).run(model, ctx).modified
    report = ctx.report["fuse"]
    assert report["fusions"]["rotary_embedding_tables"] == 8
    if pipeline == "fuse":
        gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
        assert len(gqa) == 4 and all(n.attributes["do_rotary"].value == 1 for n in gqa)
    else:
        assert op_count(model, "RotaryEmbedding") == 8
    assert not {"Neg", "Sin", "Cos"} & {n.op_type for n in model.graph}
    for feeds in zm.heldout()[:2]:
        for cut in (feeds["input_ids"][:1, :17], feeds["input_ids"]):
            data = {"input_ids": cut}
            np.testing.assert_allclose(run(model, data)["logits"],
                                       run(reference, data)["logits"], atol=1e-4, rtol=0)


def test_distill_leaves_rotary_tables_alone_so_fuse_still_lowers_them():
    # tiny-gpt pruned, distilled, then fused: distill had trained the cos / sin tables, their
    # halves differed, no RotaryEmbedding / GroupQueryAttention was made and the int8 model was
    # 1.05x slower than ORT fp32 instead of 1.24x faster
    from winnow.passes.rewrite.distill import DistillPass, lookup_tables

    net = RopeQK()
    teacher = winnow.load(net, (torch.randn(2, 7, DIM),), dynamic_shapes=({0: "batch", 1: "seq"},))
    student = teacher.clone()
    tables_before = {name: v.const_value.numpy().copy()
                     for name, v in teacher.graph.initializers.items()
                     if v.shape is not None and list(v.shape) == [MAX_SEQ, HEAD_DIM]}
    assert len(tables_before) == 2 and set(tables_before) <= lookup_tables(teacher)
    for name, value in student.graph.initializers.items():
        if name not in tables_before and value.const_value.numpy().ndim == 2:
            value.const_value = ir.tensor(value.const_value.numpy() * 0.5, name=name)
    calibration = [{"x": inputs(2, 9, s)} for s in range(4)]
    distill = DistillPass(steps=20, lr=0.01, check_every=1)
    with PassContext(calibration=calibration) as ctx:
        distill.see_pipeline_input(teacher)
        distill.call(student)
    assert ctx.report["distill"]["best_step"] > 0  # it trained the projections
    for name, table in tables_before.items():
        np.testing.assert_array_equal(student.graph.initializers[name].const_value.numpy(), table)
    PassManager("fuse{attention=false}").run(student, PassContext(calibration=calibration))
    assert op_count(student, "RotaryEmbedding") == 2
