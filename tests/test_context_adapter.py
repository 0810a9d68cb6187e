"""The context adapter: its graph nodes equal the numpy twin for every context form, causality
is measured, and as a drop-layers replacement it beats the per-token adapter on attention."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

import winnow
from tests.graphs import HEADER, parse
from tests.tiny_models import TinyTransformer
from winnow.errors import PassConfigError
from winnow.ir.execute import run
from winnow.ir.linear_adapter import (ContextSpec, LinearAdapter, context_of, context_spec,
                                      fit_adapter, insert_adapter, is_causal)
from winnow.ir.verify import verify
from winnow.passes import PassContext, PassManager

D = 6
RNG = np.random.default_rng(0)

SEQUENCE = HEADER + f"""
agraph (float[B, S, {D}] x, int64[B, S] attention_mask) => (float[B, S, {D}] y) {{
    y = Identity (x)
}}
"""

IMAGE = HEADER + f"""
agraph (float[B, {D}, H, W] x) => (float[B, {D}, H, W] y) {{
    y = Identity (x)
}}
"""

CAUSAL = HEADER + f"""
agraph (float[B, S, {D}] x) => (float[B, S, {D}] y) {{
    axis = Constant <value = int64 {{1}}> ()
    y = CumSum (x, axis)
}}
"""

GLOBAL = HEADER + f"""
agraph (float[B, S, {D}] x) => (float[B, S, {D}] y) {{
    axes = Constant <value = int64[1] {{1}}> ()
    m = ReduceMean <keepdims = 1> (x, axes)
    y = Add (x, m)
}}
"""


def _adapter(spec: ContextSpec | None) -> LinearAdapter:
    return LinearAdapter(RNG.standard_normal((D, D)), RNG.standard_normal(D), 1.0,
                         RNG.standard_normal((D, D)) if spec else None, spec)


def _with_adapter(text: str, adapter: LinearAdapter) -> ir.Model:
    model = parse(text)
    x = model.graph.inputs[0]
    out = insert_adapter(model.graph, x, adapter, "winnow.adapter.test")
    model.graph.outputs[0] = out
    verify(model)
    return model


def _feeds(shape, mask=True):
    feeds = {"x": RNG.standard_normal(shape).astype(np.float32)}
    if mask:
        lengths = [shape[1], 2, 1]
        feeds["attention_mask"] = (np.arange(shape[1])[None] < np.array(lengths)[:, None]).astype(np.int64)
    return feeds


def _numpy(adapter: LinearAdapter, feeds, nchw=False) -> np.ndarray:
    x = feeds["x"].astype(np.float64)
    ctx = context_of(x, adapter.context, feeds) if adapter.context else None
    if nchw:
        x = x.transpose(0, 2, 3, 1)
        ctx = ctx.transpose(0, 2, 3, 1) if ctx is not None else None
    out = adapter.apply(x.reshape(-1, D), None if ctx is None else ctx.reshape(-1, D)).reshape(x.shape)
    return out.transpose(0, 3, 1, 2) if nchw else out


@pytest.mark.parametrize("spec", [None, ContextSpec("sequence"),
                                  ContextSpec("sequence", "attention_mask"),
                                  ContextSpec("sequence", "attention_mask", causal=True),
                                  ContextSpec("sequence", causal=True)],
                         ids=["per-token", "mean", "masked", "masked-causal", "causal"])
def test_sequence_adapter_graph_equals_its_numpy_twin(spec):
    adapter = _adapter(spec)
    feeds = _feeds((3, 5, D))
    got = next(iter(run(_with_adapter(SEQUENCE, adapter), feeds).values()))
    np.testing.assert_allclose(got, _numpy(adapter, feeds), rtol=1e-4, atol=1e-4)


def test_spatial_adapter_graph_equals_its_numpy_twin():
    adapter = _adapter(ContextSpec("spatial"))
    feeds = {"x": RNG.standard_normal((2, D, 3, 4)).astype(np.float32)}
    got = next(iter(run(_with_adapter(IMAGE, adapter), feeds).values()))
    np.testing.assert_allclose(got, _numpy(adapter, feeds, nchw=True), rtol=1e-4, atol=1e-4)


def test_causality_is_measured_not_assumed():
    feeds = {"x": RNG.standard_normal((2, 5, D)).astype(np.float32)}
    assert is_causal(parse(CAUSAL), "y", feeds, None)
    assert not is_causal(parse(GLOBAL), "y", feeds, None)
    causal = parse(CAUSAL)
    assert context_spec(causal, causal.graph.outputs[0], feeds) == ContextSpec("sequence", None, True)
    seq = parse(SEQUENCE)
    assert context_spec(seq, seq.graph.outputs[0], _feeds((3, 5, D))).mask_input == "attention_mask"


def test_context_needs_sequence_or_image_activations():
    flat = parse(HEADER + "agraph (float[B, 4] x) => (float[B, 4] y) { y = Relu (x) }")
    with pytest.raises(PassConfigError, match="needs \\[batch, seq, dim\\] or NCHW"):
        context_spec(flat, flat.graph.outputs[0], {"x": np.zeros((2, 4), np.float32)})


def test_fit_recovers_a_map_with_a_context_term():
    x = RNG.standard_normal((3000, D))
    ctx = RNG.standard_normal((3000, D))
    a, b = RNG.standard_normal((D, D)), RNG.standard_normal((D, D))
    y = x + x @ a + ctx @ b + 0.3
    fit = fit_adapter(x, y, ridge=1e-8, ctx=ctx, context=ContextSpec("sequence"))
    assert fit.r2 > 0.9999
    np.testing.assert_allclose(fit.apply(x, ctx), y, atol=1e-3)
    assert fit_adapter(x, y, ridge=1e-8).r2 < 0.9


def test_context_replacement_beats_the_per_token_adapter_on_heldout_attention():
    net = TinyTransformer(layers=3, seed=5)
    example = (torch.randn(2, 8, 32),)
    calibration = [{"x": np.random.default_rng(i).standard_normal((16, 8, 32)).astype(np.float32)}
                   for i in range(4)]
    heldout = {"x": np.random.default_rng(9).standard_normal((32, 8, 32)).astype(np.float32)}
    reference = next(iter(run(winnow.load(net, example, dynamic_shapes=({0: "batch"},)),
                              heldout).values()))
    errors = {}
    for replacement in ("identity", "linear", "context"):
        model = winnow.load(net, example, dynamic_shapes=({0: "batch"},))
        PassManager(f"drop-layers{{regions=[blocks.1.attn],replacement={replacement}}}").run(
            model, PassContext(calibration=calibration))
        verify(model)
        errors[replacement] = float(np.abs(next(iter(run(model, heldout).values())) - reference).mean())
    assert errors["context"] < errors["linear"] < errors["identity"]
