"""The `lmul` and `bfp` rewrites: differential against winnow.numerics (the numpy references),
K-sort keeping attention scores, node marks, and bad input through the API and the CLI."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from winnow.errors import PassConfigError, PassFailedError, UnsupportedModelError
from winnow.ir.execute import run
from winnow.ir.pruning import weight_node
from winnow.numerics import bfp_quantize, lmul, lmul_matmul, marks
from winnow.passes import PassContext, PassManager
from winnow.passes.rewrite.bfp import attention_scores, bfp_graph, k_sort
from winnow.passes.rewrite.lmul import Emitter

EPS32 = 2.0 ** -24


def two_input_model(op: str, attributes: dict | None = None, inits=(), extra=(),
                    first=("x", "y")) -> ir.Model:
    """z = op(x, y, *extra) with x, y graph inputs of any shape (or initializers in `inits`)."""
    names = [*first, *extra]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
              if n not in {i.name for i in inits}]
    graph = helper.make_graph([helper.make_node(op, names, ["z"], name="node", **(attributes or {}))],
                              "g", inputs, [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              initializer=list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def rewrite(model: ir.Model, pipeline: str) -> PassContext:
    ctx = PassContext()
    PassManager(pipeline).run(model, ctx)
    return ctx


def refused(model: ir.Model, pipeline: str, error: type, match: str) -> None:
    """The pass refuses with `error` (wrapped by the manager, which names the pass)."""
    with pytest.raises(PassFailedError, match=match) as info:
        rewrite(model, pipeline)
    assert isinstance(info.value.__cause__, error)


def hard_values(n: int, seed: int) -> np.ndarray:
    """float32 over the whole exponent range (subnormals and overflows too) plus specials."""
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        x = (rng.standard_normal(n) * np.exp2(rng.integers(-140, 130, n))).astype(np.float32)
    x[:10] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.4e38, 1.5, 1.9375]
    return x


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 10])
def test_lmul_mul_is_bit_exact(m):
    model = two_input_model("Mul")
    rewrite(model, f"lmul{{m={m}}}")
    x, y = hard_values(6000, 0), hard_values(6000, 1)[::-1].copy()
    assert same_bits(run(model, {"x": x, "y": y})["z"], lmul(x, y, m))


def matmul_bound(a: np.ndarray, b: np.ndarray, m: int, terms: int) -> np.ndarray:
    """Float summation in another order: at most (terms) roundings of the absolute sum."""
    return 2 * terms * EPS32 * lmul_matmul(np.abs(a), np.abs(b), m) + 1e-30


@pytest.mark.parametrize("m", [2, 3, 4])
def test_lmul_matmul_matches_the_reference(m):
    rng = np.random.default_rng(m)
    a = rng.standard_normal((2, 3, 7, 40)).astype(np.float32)
    b = rng.standard_normal((3, 40, 5)).astype(np.float32)
    model = two_input_model("MatMul")
    ctx = rewrite(model, f"lmul{{m={m}}}")
    got, ref = run(model, {"x": a, "y": b})["z"], lmul_matmul(a, b, m)
    assert (np.abs(got - ref) <= matmul_bound(a, b, m, 40 + 2 ** m)).all()
    assert np.abs(ref - a @ b).max() > 100 * np.abs(got - ref).max()  # L-Mul, not float products
    assert ctx.report["lmul"]["rewritten"] == {"MatMul": 1}
    final = next(n for n in model.graph if n.outputs[0].name == "z")
    assert marks(final) == {"op": "lmul", "m": m, "bits": m + 9, "of": "node", "of_op": "MatMul",
                            "terms": 2 ** m}


def test_lmul_matmul_single_products_are_bit_exact():
    """With K = 1 every output is one product plus exact zeros: the bits of numerics.lmul."""
    a = hard_values(300, 2)[10:].reshape(-1, 1)
    a = np.where(np.abs(a) > 2.0 ** 100, 1.0, a).astype(np.float32)  # the documented far ends
    b = np.float32([[1.5, -0.75, 3.0, 1e-3, 0.0]])
    model = two_input_model("MatMul")
    rewrite(model, "lmul{m=3}")
    got, ref = run(model, {"x": a, "y": b})["z"], lmul_matmul(a, b, 3)
    big = np.abs(ref) >= 2.0 ** -126
    assert same_bits(got[big], ref[big]) and (np.abs(got[~big]) < 2.0 ** -126).all()


def test_lmul_gemm_with_transposes_alpha_beta_and_bias():
    rng = np.random.default_rng(5)
    a, w, c = (rng.standard_normal(s).astype(np.float32) for s in ((6, 24), (10, 24), (10,)))
    model = two_input_model("Gemm", {"transB": 1, "alpha": 0.5, "beta": 2.0},
                            inits=[numpy_helper.from_array(w, "y"), numpy_helper.from_array(c, "c")],
                            extra=["c"])
    rewrite(model, "lmul{m=3}")
    got = run(model, {"x": a})["z"]
    ref = 0.5 * lmul_matmul(a, w.T, 3) + 2.0 * c
    assert (np.abs(got - ref) <= matmul_bound(a, w.T, 3, 24 + 8) + 4 * EPS32 * np.abs(ref)).all()


def test_lmul_selectors_and_bad_input():
    refused(two_input_model("MatMul"), "lmul{nodes=[nope]}", PassConfigError,
            "'nope' matches no float MatMul")
    refused(two_input_model("MatMul"), "lmul{nodes=[attention]}", PassConfigError,
            "'attention' matches no")
    with pytest.raises(PassConfigError, match="m"):
        rewrite(two_input_model("MatMul"), "lmul{m=11}")
    refused(two_input_model("Add"), "lmul", UnsupportedModelError, "no MatMul, Gemm or Mul")
    model = two_input_model("Mul")
    assert rewrite(model, "lmul{nodes=[node]}").report["lmul"]["nodes"] == ["node"]


def test_bfp_weights_are_the_reference_rounding():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((40, 8)).astype(np.float32)  # 40: a padded last block of 8 at n=32
    model = two_input_model("MatMul", inits=[numpy_helper.from_array(w, "y")])
    ctx = rewrite(model, "bfp{format=bfp12,block=32}")
    node = next(iter(model.graph))
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(),
                                  bfp_quantize(w, "bfp12", 32, axis=0))
    assert marks(node) == {"format": "bfp12", "block": 32, "operand": "weight",
                           "significand_bits": 4, "exponent_bits": 8}
    assert ctx.report["bfp"]["weights"]["padded"] == ["y (40)"]
    assert list(model.graph.initializers) == ["y.bfp12"]  # the float weight is gone
    gemm = two_input_model("Gemm", {"transB": 1}, inits=[numpy_helper.from_array(w.T.copy(), "y")])
    rewrite(gemm, "bfp{format=bfp16,block=8}")
    np.testing.assert_array_equal(next(iter(gemm.graph)).inputs[1].const_value.numpy(),
                                  bfp_quantize(w, "bfp16", 8, axis=0).T)


@pytest.mark.parametrize("p,block,length", [(4, 8, 20), (8, 16, 16), (4, 32, 16)])
def test_bfp_graph_is_bit_exact(p, block, length):
    """The in-graph quantize-dequantize (axis -2, padded when needed) against numerics.bfp."""
    model = two_input_model("Identity", first=("x",))
    identity = next(iter(model.graph))
    x = identity.inputs[0]
    out = bfp_graph(Emitter(model.graph, identity), x, 4, length, p, block, 20)
    identity.replace_input_with(0, out)
    rng = np.random.default_rng(p + block)
    data = (rng.standard_normal((2, 3, length, 5)) * np.exp2(rng.integers(-30, 30, (2, 3, 1, 5))))
    data = data.astype(np.float32)
    data[0, 0, :3, 0] = [np.nan, np.inf, -0.0]
    data[1, 2, :, 4] = 1e-40
    fmt = {4: "bfp12", 8: "bfp16"}[p]
    assert same_bits(run(model, {"x": data})["z"], bfp_quantize(data, fmt, block, axis=-2))


def test_bfp_bad_options():
    with pytest.raises(PassConfigError, match="block"):
        rewrite(two_input_model("MatMul"), "bfp{block=24}")
    refused(two_input_model("MatMul"), "bfp{k_sort=true}", PassConfigError,
            "k_sort=true needs keys=true")
    refused(two_input_model("MatMul"), "bfp", UnsupportedModelError,
            "no MatMul or Gemm with a constant")
    refused(two_input_model("MatMul"), "bfp{weights=false,keys=true}", UnsupportedModelError,
            "no attention")


@pytest.fixture(scope="module")
def tiny_gqa():
    """Two pre-norm blocks (4 query heads sharing 2 K/V heads of 16 channels) and a batch."""
    from winnow.testing import random_inputs, transformer_block

    proto = ir.serde.serialize_model(transformer_block(dim=64, heads=4, kv_heads=2, layers=2,
                                                       seed=3))
    load = lambda: ir.serde.deserialize_model(proto)  # noqa: E731
    return load, random_inputs(load(), seed=0, batch=2, seq=12)


def test_k_sort_keeps_scores_and_sorts_each_head(tiny_gqa):
    load, feeds = tiny_gqa
    source, model = load(), load()
    scores = [s.outputs[0].name for _, s in attention_scores(model)]
    assert len(scores) == 2
    for region, _ in attention_scores(model):
        assert k_sort(model.graph, region)["channels_moved"] > 0
    before, after = run(source, feeds, capture=scores), run(model, feeds, capture=scores)
    for name in scores:
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=1e-5 * np.abs(before[name]).max())
    np.testing.assert_allclose(run(model, feeds)[model.graph.outputs[0].name],
                               run(source, feeds)[source.graph.outputs[0].name], atol=1e-5)
    region = attention_scores(model)[0][0]
    w = weight_node(region, region.heads.k).inputs[1].const_value.numpy()
    norms = np.linalg.norm(w, axis=0).reshape(2, 16)
    assert (np.diff(norms, axis=1) <= 0).all()  # largest first within each K head


def test_bfp_keys_in_a_model_match_the_reference(tiny_gqa):
    """K's quantize-dequantize inside a real attention equals numerics.bfp on the captured K."""
    load, feeds = tiny_gqa
    model = load()
    PassManager("bfp{format=bfp12,block=8,weights=false,keys=true,k_sort=true}").run(
        model, PassContext(calibration=[feeds]))
    _, score = attention_scores(model)[0]
    k_in, k_out = score.inputs[1].producer().inputs[0], score.inputs[1]
    # the Transpose feeding the emitted subgraph reads the original K^T
    original = k_out
    while original.producer() is not None and "bfp" in (original.producer().name or ""):
        original = original.producer().inputs[0]
    got = run(model, feeds, capture=[original.name, k_out.name])
    assert same_bits(got[k_out.name], bfp_quantize(got[original.name], "bfp12", 8, axis=-2))
    assert marks(score)["operand"] == "k" and k_in is not None


@pytest.mark.parametrize("pipeline,message", [
    ("lmul{m=0}", "m"),
    ("lmul{m=11}", "m"),
    ("lmul{nodes=[nope]}", "'nope' matches no float MatMul"),
    ("bfp{block=24}", "block"),
    ("bfp{format=bfp8}", "format"),
    ("bfp{weights=false,keys=true}", "no attention"),
])
def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, pipeline, message):
    from click.testing import CliRunner

    from winnow.cli import cli

    source = tmp_path / "mm.onnx"
    rng = np.random.default_rng(0)
    proto = ir.serde.serialize_model(two_input_model(
        "MatMul", inits=[numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "y")]))
    source.write_bytes(proto.SerializeToString())
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["--quiet", "compile", str(source), "-o", str(out),
                                      "--pipeline", pipeline])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and not out.exists()


def test_cli_lmul_m0_on_a_zoo_model_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from winnow.cli import cli

    out = tmp_path / "X"
    result = CliRunner().invoke(cli, ["--quiet", "compile", "zoo:digits-cnn", "-o", str(out),
                                      "--pipeline", "lmul{m=0}"])
    assert result.exit_code == 2 and "lmul" in result.stderr and not out.exists()


@pytest.mark.slow
def test_lmul_attention_in_digits_vit_matches_the_reference():
    """Model level: every rewritten score/context MatMul of digits-vit equals numpy lmul_matmul
    of its own captured inputs (within the summation-order bound); the model stays close."""
    from winnow import models_zoo
    from winnow.measure.fidelity import evaluate_zoo
    from winnow.passes.rewrite.lmul import attention_matmuls
    from winnow.ir.regions import find_regions

    zm = models_zoo.get("digits-vit")
    model = zm.load_ir()
    targets = [(n.inputs[0].name, n.inputs[1].name, n.outputs[0].name)
               for n in attention_matmuls(find_regions(model).all())]
    assert len(targets) == 8
    ctx = rewrite(model, "lmul{m=3,nodes=[attention]}")
    assert ctx.report["lmul"]["rewritten"] == {"MatMul": 8}
    feeds = zm.heldout()[0]
    got = run(model, feeds, capture=[name for t in targets for name in t])
    for a, b, out in targets:
        ref = lmul_matmul(got[a], got[b], 3)
        terms = got[a].shape[-1] + 8
        assert (np.abs(got[out] - ref) <= matmul_bound(got[a], got[b], 3, terms)).all()
    assert evaluate_zoo(zm, model).cosine > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("name,rotary", [("minilm", False), ("tiny-gpt", True)])
def test_k_sort_keeps_scores_on_zoo_models(name, rotary):
    """MiniLM (12 heads, biases) and tiny-gpt (GQA, half-split rotary: pairs move together and
    the cos/sin tables are permuted per head): scores and outputs unchanged up to float order."""
    from winnow import models_zoo

    zm = models_zoo.get(name)
    source, model = zm.load_ir(), zm.load_ir()
    matmuls = [(s.outputs[0].name, s.inputs[0].name, s.inputs[1].name)
               for _, s in attention_scores(model)]
    report = [k_sort(model.graph, region) for region, _ in attention_scores(model)]
    assert all(r["rotary"] == rotary and r["channels_moved"] > 0 for r in report)
    feeds = zm.heldout()[0]
    names = [name for triple in matmuls for name in triple]
    before, after = run(source, feeds, capture=names), run(model, feeds, capture=names)
    for score, q, k in matmuls:
        # The exact scores agree up to what reached Q and K (float64 of the captured operands:
        # a permutation does not change an exact sum); each float score is within
        # gamma_d * sum |q_i k_i| of its exact one (Higham's bound, u = 2^-24).
        d = before[q].shape[-1]
        gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
        exact = {}
        slack = 0.0
        for name, got in (("before", before), ("after", after)):
            a, b = got[q].astype(np.float64), got[k].astype(np.float64)
            exact[name] = a @ b
            slack = slack + gamma * (np.abs(a) @ np.abs(b))
        bound = np.abs(exact["after"] - exact["before"]) + slack
        assert (np.abs(after[score] - before[score]) <= bound + 1e-7).all(), score
        assert np.abs(exact["after"] - exact["before"]).max() <= 1e-4 * np.abs(exact["before"]).max()
    out = source.graph.outputs[0].name
    np.testing.assert_allclose(after[out], before[out], rtol=0, atol=1e-4 * np.abs(before[out]).max())
