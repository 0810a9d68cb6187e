"""layer-similarity and drop-layers on a tiny transformer with one exactly-redundant block."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import winnow
from tests.graphs import DUPLICATED, model
from tests.tiny_models import TinyTransformer, linearize_block, scale_block, zero_block_branches
from winnow.errors import PassConfigError, PassFailedError
from winnow.ir.execute import run
from winnow.ir.verify import verify
from winnow.passes import PassContext, PassManager
from winnow.ir.linear_adapter import fit_adapter, fit_region_adapters
from winnow.ir.gates import gate_feeds, gated_copy
from winnow.ir.regions import find_regions
from winnow.passes.analysis.layer_similarity import linear_adapter_cosine

RNG = np.random.default_rng(0)
CALIBRATION = [{"x": RNG.standard_normal((8, 6, 32)).astype(np.float32)} for _ in range(4)]
HELDOUT = {"x": np.random.default_rng(1).standard_normal((16, 6, 32)).astype(np.float32)}


@pytest.fixture(scope="module")
def redundant_net():
    net = TinyTransformer(layers=4, seed=3)
    zero_block_branches(net, 2)
    return net


def load(net):
    return winnow.load(net, (torch.randn(2, 6, 32),), dynamic_shapes=({0: "batch"},))


@pytest.fixture()
def tiny(redundant_net):
    return load(redundant_net)


def output(m, feeds=HELDOUT):
    return next(iter(run(m, feeds).values()))


def test_layer_similarity_scores_identity_block_as_one(tiny):
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("layer-similarity{samples=16}").run(tiny, ctx)
    result = ctx.analyses["layer-similarity"]
    scores = {r["name"]: r for r in result["regions"]}
    assert scores["blocks.2"]["cos"] == pytest.approx(1.0, abs=1e-6)
    assert scores["blocks.2"]["block_influence"] == pytest.approx(0.0, abs=1e-6)
    assert scores["blocks.2"]["angular"] == pytest.approx(0.0, abs=1e-3)
    assert scores["blocks.0"]["cos"] < 0.999
    assert result["ranking"]["block"][0] == "blocks.2"
    assert set(result["ranking"]["sublayer"][:2]) == {"blocks.2.attn", "blocks.2.mlp"}
    assert result["samples"] == 16 and scores["blocks.0"]["vectors"] == 16 * 6


def test_dropping_the_redundant_block_is_exact_and_shrinks_the_graph(tiny):
    before = output(tiny)
    nodes, params = len(list(tiny.graph)), len(tiny.graph.initializers)
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("drop-layers{count=1}").run(tiny, ctx)
    verify(tiny)
    assert ctx.report["drop-layers"]["dropped"] == ["blocks.2"]
    np.testing.assert_allclose(output(tiny), before, atol=1e-5)
    assert len(list(tiny.graph)) < nodes and len(tiny.graph.initializers) < params
    assert not any("blocks.2" in n.metadata_props.get("pkg.torch.onnx.name_scopes", "")
                   for n in tiny.graph)


def test_drop_by_name_and_the_adapter_beats_identity_on_heldout(redundant_net):
    reference = output(load(redundant_net))
    errors = {}
    for replacement in ("identity", "linear"):
        m = load(redundant_net)
        PassManager(f"drop-layers{{regions=[blocks.1.mlp,blocks.3.attn],replacement={replacement}}}"
                    ).run(m, PassContext(calibration=CALIBRATION))
        verify(m)
        errors[replacement] = float(np.abs(output(m) - reference).mean())
    assert errors["identity"] > 1e-3
    assert errors["linear"] < errors["identity"]


def test_dropping_a_graph_output_region_keeps_the_output_name():
    net = TinyTransformer(layers=2, seed=1)
    m = winnow.load(net, (torch.randn(1, 4, 32),))
    names = [v.name for v in m.graph.outputs]
    PassManager("drop-layers{regions=[blocks.1]}").run(m, PassContext())
    assert [v.name for v in m.graph.outputs] == names
    verify(m)


def test_unknown_region_error_lists_valid_ones(tiny):
    with pytest.raises(PassFailedError, match="no region named 'blocks.9'.*blocks.0, blocks.0.attn"):
        PassManager("drop-layers{regions=[blocks.9]}").run(tiny, PassContext())


def test_count_larger_than_candidates_is_refused(tiny):
    with pytest.raises(PassFailedError, match="count=5 is more than the 4 droppable block regions"):
        PassManager("drop-layers{count=5}").run(tiny, PassContext(calibration=CALIBRATION))


def test_bad_level_is_refused_when_built():
    with pytest.raises(PassConfigError, match="'level' must be one of"):
        PassManager("drop-layers{level=heads}")


def test_model_without_blocks_is_left_alone():
    m = model(DUPLICATED)
    ctx = PassContext()
    result = PassManager("layer-similarity,drop-layers{count=1}").run(m, ctx)
    assert not result.modified
    assert "no residual blocks" in ctx.analyses["layer-similarity"]["note"]
    assert "nothing was rewritten" in ctx.report["drop-layers"]["note"]


def test_adapter_fit_recovers_a_linear_map_and_rank_limits_it():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16))
    true = rng.standard_normal((16, 2)) @ rng.standard_normal((2, 16))
    y = x + x @ true + 0.5
    full = fit_adapter(x, y, ridge=1e-6)
    assert full.r2 > 0.999
    np.testing.assert_allclose(full.apply(x), y, atol=1e-3)
    low = fit_adapter(x, y, ridge=1e-6, rank=2)
    assert np.linalg.matrix_rank(low.weight, tol=1e-6) == 2 and low.r2 > 0.999
    assert fit_adapter(x, y, ridge=1e-6, rank=1).r2 < 0.99


@pytest.fixture(scope="module")
def linear_net():
    """Block 1 changes the stream a lot but almost linearly; block 2 a little, non-linearly."""
    net = TinyTransformer(layers=4, seed=3)
    linearize_block(net, 1)
    scale_block(net, 2, 0.5)
    return net


def test_the_linear_score_ranks_for_the_adapter_and_cos_for_identity(linear_net):
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("layer-similarity").run(load(linear_net), ctx)
    result = ctx.analyses["layer-similarity"]
    scores = {r["name"]: r for r in result["regions"]}
    assert scores["blocks.1"]["linear_cos"] > 0.998 > scores["blocks.1"]["cos"]
    assert result["ranking"]["block"][0] == "blocks.2"
    assert result["ranking_linear"]["block"][0] == "blocks.1"


def test_drop_layers_chooses_by_the_replacement_it_will_use(linear_net):
    errors = {}
    for replacement, source in itertools.product(("identity", "linear"),
                                                 ("layer-similarity", "das-skip")):
        model, ctx = load(linear_net), PassContext(calibration=CALIBRATION)
        PassManager(f"drop-layers{{count=1,source={source},replacement={replacement}}}").run(model, ctx)
        dropped = ctx.report["drop-layers"]["dropped"]
        assert dropped == (["blocks.2"] if replacement == "identity" else ["blocks.1"]), source
        errors[replacement] = np.abs(output(model) - output(load(linear_net))).mean()
    assert errors["linear"] < errors["identity"]


def test_linear_adapter_cosine_is_cross_fitted():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8))
    linear = x + x @ rng.standard_normal((8, 8)) + 1.0
    assert linear_adapter_cosine(x, linear) == pytest.approx(1.0, abs=1e-4)  # ridge shrinks a little
    noise = x + 3 * rng.standard_normal((400, 8))  # nothing to learn: out-of-sample cos stays low
    assert linear_adapter_cosine(x, noise) < 0.5
    assert np.isnan(linear_adapter_cosine(x[:3], linear[:3]))


def test_a_closed_gate_gives_entry_plus_the_adapter(tiny):
    regions = find_regions(tiny).candidates("block")
    adapters = fit_region_adapters(tiny, regions, CALIBRATION)
    gated, gates = gated_copy(tiny, regions, adapters)
    verify(gated)
    index = [r.name for r in regions].index("blocks.1")
    captured = run(tiny, HELDOUT, capture=[regions[index].entry.name])
    skipped = run(gated, {**HELDOUT, **gate_feeds(len(gates), [index])},
                  capture=[regions[index].exit.name])
    entry = captured[regions[index].entry.name]
    np.testing.assert_allclose(skipped[regions[index].exit.name],
                               adapters["blocks.1"].apply(entry.reshape(-1, 32)).reshape(entry.shape),
                               atol=1e-4)
    opened = run(gated, {**HELDOUT, **gate_feeds(len(gates))})
    np.testing.assert_allclose(next(iter(opened.values())), output(tiny), atol=1e-6)
