"""winnow.testing (builders checked against numpy, the assertions, run_pass), RulePass, and the
registry's refusals of malformed pass classes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest
from onnxscript.rewriter import RewriteRule

from winnow import testing
from winnow.errors import PassFailedError, PassRegistrationError
from winnow.ir.execute import run
from winnow.ir.regions import find_regions
from winnow.passes import Pass, PassContext, PassManager, PassResult, RulePass, option, register_pass


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def np_layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):
    from math import erf, sqrt

    return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_attention(x, w, p, heads, kv_heads):
    """Reference multi-head attention with KV heads repeated for GQA (numpy, float64)."""
    b, s, dim = x.shape
    hd = dim // heads

    def proj(name, n):
        y = x @ w[f"{p}.{name}.weight"] + w[f"{p}.{name}.bias"]
        return y.reshape(b, s, n, hd).transpose(0, 2, 1, 3)

    q, k, v = proj("q", heads), proj("k", kv_heads), proj("v", kv_heads)
    k, v = np.repeat(k, heads // kv_heads, axis=1), np.repeat(v, heads // kv_heads, axis=1)
    att = np_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd))
    out = (att @ v).transpose(0, 2, 1, 3).reshape(b, s, dim)
    return out @ w[f"{p}.out.weight"] + w[f"{p}.out.bias"]


def np_transformer(x, w, heads, kv_heads, norm, layers):
    """Reference pre-norm x + f(ln(x)) or post-norm ln(x + f(x)) blocks."""
    for i in range(layers):
        p = f"blocks.{i}"
        parts = (("ln1", lambda t: np_attention(t, w, f"{p}.attn", heads, kv_heads)),
                 ("ln2", lambda t: np_gelu(t @ w[f"{p}.mlp.0.weight"] + w[f"{p}.mlp.0.bias"])
                  @ w[f"{p}.mlp.2.weight"] + w[f"{p}.mlp.2.bias"]))
        for ln, f in parts:
            ln_w = (w[f"{p}.{ln}.weight"], w[f"{p}.{ln}.bias"])
            x = x + f(np_layer_norm(x, *ln_w)) if norm == "pre" else np_layer_norm(x + f(x), *ln_w)
    return x


@pytest.mark.parametrize("norm,heads,kv_heads,layers", [("pre", 4, None, 2), ("post", 4, None, 1),
                                                         ("pre", 8, 2, 1)])
def test_transformer_block_computes_the_numpy_reference(norm, heads, kv_heads, layers):
    model = testing.transformer_block(dim=32, heads=heads, kv_heads=kv_heads, norm=norm, layers=layers)
    testing.assert_valid(model)
    feeds = testing.random_inputs(model, seed=1, batch=3, seq=7)
    expected = np_transformer(feeds["x"].astype(np.float64), weights(model), heads,
                              kv_heads or heads, norm, layers)
    got = run(model, feeds)["y"]
    assert got.shape == (3, 7, 32)
    assert np.max(np.abs(got - expected)) < 1e-4 * max(1.0, np.max(np.abs(expected)))


def test_builders_have_the_regions_and_heads_they_claim():
    pre = find_regions(testing.transformer_block(layers=2))
    assert [[(p.kind, p.layout) for p in b.parts] for b in pre.blocks] == \
        [[("attention", "pre"), ("mlp", "pre")]] * 2
    post = find_regions(testing.transformer_block(norm="post"))
    assert [(p.kind, p.layout) for p in post.blocks[0].parts] == [("attention", "post"), ("mlp", "post")]
    gqa = find_regions(testing.transformer_block(heads=8, kv_heads=2)).blocks[0].parts[0].heads
    assert (gqa.num_heads, gqa.head_dim, gqa.num_kv_heads) == (8, 4, 2)
    assert gqa.q == "blocks.0.attn.q.weight" and gqa.o == "blocks.0.attn.out.weight"
    assert len(find_regions(testing.conv_block()).blocks) == 1


def test_mlp_gqa_and_conv_builders_compute_their_references():
    model = testing.mlp((6, 10, 3))
    x = testing.random_inputs(model, seed=2)["x"]
    w = weights(model)
    hidden = np.maximum(x @ w["layers.0.weight"] + w["layers.0.bias"], 0)
    np.testing.assert_allclose(run(model, {"x": x})["y"], hidden @ w["layers.1.weight"] + w["layers.1.bias"],
                               rtol=1e-5, atol=1e-5)

    model = testing.gqa_attention(dim=16, heads=4, kv_heads=2)
    x = testing.random_inputs(model, seed=3)["x"].astype(np.float64)
    w = weights(model)
    expected = x + np_attention(np_layer_norm(x, w["ln.weight"], w["ln.bias"]), w, "attn", 4, 2)
    np.testing.assert_allclose(run(model, {"x": x.astype(np.float32)})["y"], expected, rtol=1e-4, atol=1e-4)

    model = testing.conv_block(channels=2, size=4)
    testing.assert_valid(model)
    x = testing.random_inputs(model)["x"]
    assert run(model, {"x": x})["y"].shape == (2, 2, 4, 4) and (run(model, {"x": x})["y"] >= 0).all()


def test_assert_equivalent_catches_a_small_change_and_allows_its_tolerance():
    model = testing.mlp()
    testing.assert_equivalent(model, testing.mlp(), rtol=0, atol=0)
    changed = testing.mlp()
    bias = changed.graph.initializers["layers.1.bias"]
    bias.const_value = ir.tensor(bias.const_value.numpy() + 1e-3, name=bias.name)
    with pytest.raises(AssertionError, match="output 'y' differs on feeds #0"):
        testing.assert_equivalent(model, changed)
    testing.assert_equivalent(model, changed, atol=2e-3)
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_equivalent(testing.mlp((16, 8)), testing.mlp((16, 4)))


def test_assert_valid_names_the_problem():
    model = testing.mlp()
    model.graph.append(ir.node("Relu", [ir.Value(name="orphan")]))
    with pytest.raises(AssertionError, match="orphan"):
        testing.assert_valid(model)


class RecordCalibration(Pass):
    """Records the calibration data and options it saw; zeroes layers.0.bias."""

    name = "test-record-calibration"
    seen: list = []

    def call(self, model):
        ctx = PassContext.current()
        type(self).seen.append((ctx.calibration, dict(ctx.options)))
        bias = model.graph.initializers["layers.0.bias"]
        bias.const_value = ir.tensor(np.zeros_like(bias.const_value.numpy()), name=bias.name)
        ctx.report[self.name] = {"done": True}
        return PassResult(model, modified=True)


class BreakGraph(Pass):
    """Leaves a node that reads a value nobody produces."""

    name = "test-break"

    def call(self, model):
        model.graph.append(ir.node("Relu", [ir.Value(name="orphan")]))
        return PassResult(model, modified=True)


def test_run_pass_copies_the_model_and_fills_a_fresh_context():
    model = testing.mlp()
    before = weights(model)["layers.0.bias"].copy()
    calibration = [testing.random_inputs(model)]
    result = testing.run_pass(["cse", RecordCalibration(), "dce"], model, calibration,
                              options={"task": 1})
    assert RecordCalibration.seen[-1] == (calibration, {"task": 1})
    assert result.modified and result.report["test-record-calibration"] == {"done": True}
    np.testing.assert_array_equal(weights(model)["layers.0.bias"], before)  # input untouched
    assert not weights(result.model)["layers.0.bias"].any()
    with pytest.raises(PassFailedError, match="pass 'test-break' failed .*orphan"):
        testing.run_pass(BreakGraph(), model)


def test_pass_manager_uses_the_surrounding_context_and_mixed_lists():
    ctx = PassContext(options={"mine": 1})
    with ctx:
        PassManager(["fold-constants,cse", RecordCalibration(), "dce"]).run(testing.mlp())
    assert RecordCalibration.seen[-1][1] == {"mine": 1} and "test-record-calibration" in ctx.report


def double_neg(op, x):
    return op.Neg(op.Neg(x))


def identity(op, x):
    return op.Identity(x)


class DropDoubleNeg(RulePass):
    """Neg(Neg(x)) -> x."""

    name = "test-drop-double-neg"
    description = "Neg(Neg(x)) -> x"
    rules = [RewriteRule(double_neg, identity, name="double-neg")]


def neg_chain(count: int) -> ir.Model:
    model = testing.mlp((4, 4))
    y = model.graph.outputs[0]
    value = y
    for _ in range(count):
        node = ir.node("Neg", [value])
        model.graph.append(node)
        value = node.outputs[0]
    value.name, value.shape, value.type = "z", y.shape, y.type
    y.name = "y_inner"
    model.graph.outputs[0] = value
    return model


@pytest.mark.parametrize("count", [1, 4, 5])
def test_rule_pass_rewrites_until_no_rule_matches_and_counts(count):
    model = neg_chain(count)
    result = testing.run_pass([DropDoubleNeg(), "canonicalize", "dce"], model)
    assert result.report["test-drop-double-neg"] == {"rewrites": count // 2,
                                                    "by_rule": {"double-neg": count // 2}}
    assert sum(n.op_type == "Neg" for n in result.model.graph) == count % 2
    testing.assert_equivalent(model, result.model, rtol=0, atol=0)


def test_rule_pass_registers_from_its_rules():
    try:
        assert register_pass(DropDoubleNeg) is DropDoubleNeg
        result = testing.run_pass("test-drop-double-neg{max_iterations=1}", neg_chain(4))
        assert result.report["test-drop-double-neg"]["rewrites"] == 2  # one round finds both
    finally:
        from winnow.passes import base

        base._REGISTRY.pop("test-drop-double-neg", None)
        base._ORIGINS.pop("test-drop-double-neg", None)

    class NoRules(RulePass):
        name = "test-no-rules"

    class NotRules(RulePass):
        name = "test-not-rules"
        rules = ["Neg(Neg(x)) -> x"]

    with pytest.raises(PassRegistrationError, match="`rules` is empty"):
        register_pass(NoRules)
    with pytest.raises(PassRegistrationError, match="is not an onnxscript RewriteRule"):
        register_pass(NotRules)


def test_malformed_pass_classes_are_refused_with_one_sentence():
    class NoDefault(Pass):
        name = "test-no-default"

        @dataclass(frozen=True)
        class Config:
            threshold: float

    class Mutable(Pass):
        name = "test-mutable"

        @dataclass
        class Config:
            threshold: float = option(0.5, "a threshold")

    class NotAPass:
        name = "test-not-a-pass"

    with pytest.raises(PassRegistrationError, match="option 'threshold' of pass 'test-no-default' .* "
                                                    "has no default"):
        register_pass(NoDefault)
    with pytest.raises(PassRegistrationError, match="Config must be a frozen dataclass"):
        register_pass(Mutable)
    with pytest.raises(PassRegistrationError, match="is not a subclass of winnow.passes.Pass"):
        register_pass(NotAPass)


def test_public_api_is_listed_in_one_place_and_documented():
    import importlib

    from winnow.public_api import PUBLIC_API, missing_public_names

    assert missing_public_names() == []
    for module_name in ("winnow", "winnow.passes", "winnow.testing"):
        assert set(importlib.import_module(module_name).__all__) == set(PUBLIC_API[module_name])
    for module_name, names in PUBLIC_API.items():
        module = importlib.import_module(module_name)
        for name in names:
            obj = getattr(module, name)
            if callable(obj):
                assert (obj.__doc__ or "").strip(), f"{module_name}.{name} has no docstring"


def test_a_private_name_read_from_outside_winnow_warns():
    from winnow.public_api import PrivateNameWarning

    outside = compile("from winnow.testing import _Builder\n", "<a plugin>", "exec")
    with pytest.warns(PrivateNameWarning, match="winnow.testing._Builder is private"):
        exec(outside, {})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile("from winnow.testing import mlp, run_pass\nfrom winnow.passes import RulePass\n",
                     "<a plugin>", "exec"), {})
        from winnow.testing import _Builder  # noqa: F401  (winnow's own tests are inside winnow)


def test_builders_carry_shapes_so_structural_passes_run_on_them():
    model = testing.transformer_block(heads=8, kv_heads=2, layers=2)
    assert all(v.shape is not None for node in model.graph for v in node.outputs)
    calibration = [testing.random_inputs(model, seed, batch=4, seq=6) for seed in range(2)]
    result = testing.run_pass("prune-heads{ratio=0.5,source=proxy},prune-channels{ratio=0.5,"
                              "source=weight}", model, calibration)
    parts = [p for b in find_regions(result.model).blocks for p in b.parts]
    assert [(p.heads.num_heads, p.heads.num_kv_heads) for p in parts if p.kind == "attention"] == \
        [(4, 2), (4, 2)]
    widths = [result.model.graph.initializers[f"blocks.{i}.mlp.2.weight"].const_value.shape[0]
              for i in range(2)]
    assert widths == [64, 64]
    feeds = calibration[0]
    assert run(result.model, feeds)["y"].shape == run(model, feeds)["y"].shape
