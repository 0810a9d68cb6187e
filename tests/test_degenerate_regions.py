"""Analyses that know when they cannot measure (issue 10): a region whose streams are degenerate
on the calibration data (zero, NaN) is reported as not measurable with the reason, never ranked,
and never acted on by drop-layers, prune-channels or prune-heads."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from winnow import testing
from winnow.errors import PassFailedError
from winnow.ir.execute import run

DIM, SEQ, ROWS = 32, 6, 4
ZERO_INPUT = ("block0", "block0.attn")  # on SPARSE: their input is zero at 4 of 6 tokens
LIVE_BLOCKS = {"block1", "block2", "block3"}


def _zero_block0_biases(model: ir.Model) -> ir.Model:
    """Every bias / LayerNorm shift of block 0 set to zero: on zero inputs its stream stays zero
    (LayerNorm(0) = 0, projections of 0 = 0, GELU(0) = 0), and so does block 1's input."""
    for name, value in model.graph.initializers.items():
        if name.startswith("blocks.0.") and name.endswith(".bias"):
            value.const_value = ir.tensor(np.zeros(value.const_value.shape.numpy(), np.float32),
                                          name=name)
    return model


@pytest.fixture(scope="module")
def model():
    """Four pre-norm blocks whose first one writes nothing on zero inputs."""
    return _zero_block0_biases(testing.transformer_block(dim=DIM, layers=4))


ZEROS = {"x": np.zeros((ROWS, SEQ, DIM), np.float32)}


def _sparse() -> dict[str, np.ndarray]:
    """Inputs whose first 4 of 6 tokens are zero vectors (the last 2 random)."""
    x = np.zeros((ROWS, SEQ, DIM), np.float32)
    x[:, 4:] = np.random.default_rng(0).standard_normal((ROWS, 2, DIM))
    return {"x": x}


SPARSE = _sparse()


def test_the_oracle_zero_streams_are_zero_and_the_others_are_not(model):
    names = ["blocks.0.attn/Residual", "blocks.0.mlp/Residual", "blocks.2.mlp/Residual"]
    zero = run(model, ZEROS, capture=names)
    assert np.abs(zero[names[0]]).max() == np.abs(zero[names[1]]).max() == 0
    assert np.abs(zero[names[2]]).max() > 1e-2
    sparse = run(model, SPARSE, capture=names)
    assert np.linalg.norm(sparse[names[0]], axis=-1).min() > 1e-2  # attention fills the zeros


def test_layer_similarity_never_ranks_a_zero_stream(model):
    done = testing.run_pass("layer-similarity", model, SPARSE)
    result = done.analyses["layer-similarity"]
    assert set(result["not_measurable"]) == set(ZERO_INPUT)
    assert all("its input is (near) zero (norm < 1e-06) for 67%" in result["not_measurable"][n]
               for n in ZERO_INPUT)
    assert set(result["ranking"]["block"]) == LIVE_BLOCKS
    ranked = {n for order in result["ranking"].values() for n in order}
    assert not ranked & set(ZERO_INPUT) and "block0.mlp" in ranked
    constant = testing.run_pass("layer-similarity", model, ZEROS).analyses["layer-similarity"]
    assert constant["ranking"]["block"] == [] and "nothing is ranked" in constant["note"]
    assert "points the same way" in constant["not_measurable"]["block3"]


def test_das_skip_leaves_degenerate_regions_out_of_the_bandit(model):
    done = testing.run_pass("das-skip{steps=10}", model, SPARSE)
    result = done.analyses["das-skip"]
    assert set(result["ranking"]) == LIVE_BLOCKS and result["selected"][0] in LIVE_BLOCKS
    assert set(result["not_measurable"]) == {"block0"}
    entries = {r["name"]: r for r in result["regions"]}
    assert entries["block0"]["measurable"] is False and "(near) zero" in entries["block0"]["reason"]
    assert "logit" in entries["block2"] and "logit" not in entries["block0"]
    attention = testing.run_pass("das-skip{steps=10,level=attention}", model, SPARSE)
    assert set(attention.analyses["das-skip"]["ranking"]) == {"block1.attn", "block2.attn",
                                                              "block3.attn"}
    none = testing.run_pass("das-skip{steps=10}", model, ZEROS).analyses["das-skip"]
    assert none["ranking"] == [] and "nothing is ranked" in none["note"]


def test_drop_layers_never_drops_what_could_not_be_measured(model):
    dropped = testing.run_pass("drop-layers{count=1,source=das-skip}", model, SPARSE)
    assert dropped.report["drop-layers"]["dropped"][0] in LIVE_BLOCKS
    with pytest.raises(PassFailedError, match=r"not measurable on the calibration data \(e.g. "
                                              r"block0: its input is \(near\) zero"):
        testing.run_pass("drop-layers{count=3,source=das-skip}", model, SPARSE)
    with pytest.raises(PassFailedError, match="could rank only 3 of the 4 droppable block "
                                              "regions; 1 are not measurable"):
        testing.run_pass("drop-layers{count=4}", model, SPARSE)


def test_channel_importance_reports_a_silent_mlp_and_prune_channels_refuses_it(model):
    done = testing.run_pass(["shape-inference", "channel-importance"], model, ZEROS)
    layers = {layer["region"]: layer for layer in done.analyses["channel-importance"]["layers"]}
    assert layers["block0.mlp"]["measurable"] is False and layers["block0.mlp"]["scores"] is None
    assert "activation is (near) zero" in layers["block0.mlp"]["reason"]
    assert layers["block2.mlp"]["measurable"] is True
    assert min(layers["block2.mlp"]["scores"]) > 0  # every channel carries something there
    with pytest.raises(PassFailedError, match="cannot rank the channels of 'block0.mlp'"):
        testing.run_pass(["shape-inference", "prune-channels{ratio=0.5}"], model, ZEROS)
    pruned = testing.run_pass(["shape-inference", "prune-channels{ratio=0.5,regions=[block2.mlp]}"],
                              model, ZEROS)
    assert pruned.report["prune-channels"]["pruned"] == {"block2.mlp": [4 * DIM, 2 * DIM]}


def test_head_entropy_reports_nan_attention_and_prune_heads_says_why(model):
    nan = {"x": np.full((ROWS, SEQ, DIM), np.nan, np.float32)}
    done = testing.run_pass("head-entropy", model, nan)
    result = done.analyses["head-entropy"]
    assert result["layers"] == [] and result["heads"] == {}
    assert set(result["not_measurable"]) == {f"block{i}.attn" for i in range(4)}
    assert all("NaN or Inf" in why for why in result["not_measurable"].values())
    with pytest.raises(PassFailedError, match=r"no scores for .*\(block0.attn: its attention "
                                              r"probabilities hold NaN"):
        testing.run_pass("prune-heads{ratio=0.25,source=entropy}", model, nan)
    rng = np.random.default_rng(0)
    fine = testing.run_pass("head-entropy", model,
                            {"x": rng.standard_normal((ROWS, SEQ, DIM)).astype(np.float32)})
    assert fine.analyses["head-entropy"]["not_measurable"] == {}
    assert len(fine.analyses["head-entropy"]["heads"]) == 16


def test_dropping_the_last_block_whose_exit_is_the_graph_output(model):
    """Found on the way (onnx-ir 1.1 refuses to move a graph output's uses): the dropped exit's
    name stays the graph output's, fed by the block's entry."""
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, SEQ, DIM)).astype(np.float32)}
    dropped = testing.run_pass("drop-layers{regions=[block3]}", model, feeds)
    assert [v.name for v in dropped.model.graph.outputs] == ["y"]
    want = run(model, feeds, capture=["blocks.2.mlp/Residual"])["blocks.2.mlp/Residual"]
    np.testing.assert_array_equal(run(dropped.model, feeds)["y"], want)
