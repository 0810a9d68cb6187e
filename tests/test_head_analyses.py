"""head-entropy and head-importance on the tiny transformer, against torch-side oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import winnow
from tests.graphs import DUPLICATED, model
from tests.tiny_models import TinyTransformer
from winnow.passes import PassContext, PassManager
from winnow.passes.analysis.calibration import fidelity_loss
from winnow.passes.analysis.head_entropy import normalized_entropy

RNG = np.random.default_rng(0)
CALIBRATION = [{"x": RNG.standard_normal((8, 6, 32)).astype(np.float32)} for _ in range(2)]


@pytest.fixture(scope="module")
def net():
    return TinyTransformer(layers=2, seed=5)


@pytest.fixture(scope="module")
def analysed(net):
    m = winnow.load(net, (torch.randn(2, 6, 32),), dynamic_shapes=({0: "batch"},))
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("head-entropy,head-importance{batch_size=8}").run(m, ctx)
    return ctx.analyses


def test_entropy_is_normalised_by_visible_keys():
    uniform = np.full((1, 1, 3, 4), 0.25)
    one_hot = np.zeros((1, 1, 3, 4))
    one_hot[..., 0] = 1.0
    causal = np.tril(np.ones((4, 4)))
    causal = (causal / causal.sum(-1, keepdims=True))[None, None]
    for probs, expected, queries in ((uniform, 1.0, 3), (causal, 1.0, 3)):
        sums, counts = normalized_entropy(probs, None)
        assert counts[0] == queries  # the causal first query sees one key: skipped
        assert sums[0] / counts[0] == pytest.approx(expected)
    # Two heads: the second attends to one key, the first uniformly; 0 log 0 = 0 (no NaN).
    both = np.concatenate([uniform, one_hot], axis=1)
    sums, counts = normalized_entropy(both, None)
    np.testing.assert_allclose(sums / counts, [1.0, 0.0])
    # Padding keys (probability 0 in every head) and padding queries drop out.
    padded = np.zeros((1, 1, 3, 6))
    padded[..., :4] = 0.25
    sums, counts = normalized_entropy(padded, np.array([[1, 1, 0]]))
    assert counts[0] == 2 and sums[0] / counts[0] == pytest.approx(1.0)


def test_head_entropy_matches_torch_attention(net, analysed):
    """Oracle: block 0's attention probabilities recomputed from the torch weights."""
    x = torch.from_numpy(np.concatenate([b["x"] for b in CALIBRATION]))
    attn = net.blocks[0].attn
    with torch.no_grad():
        h = net.blocks[0].ln1(x)
        q = attn.q(h).view(16, 6, 4, 8).transpose(1, 2)
        k = attn.k(h).view(16, 6, 4, 8).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1).double().numpy()
    expected = (-(p * np.log(p)).sum(-1) / np.log(6)).mean(axis=(0, 2))
    layer = analysed["head-entropy"]["layers"][0]
    assert layer["region"] == "blocks.0.attn" and layer["queries"] == 16 * 6
    np.testing.assert_allclose(layer["entropy"], expected, atol=1e-5)


def _torch_outputs(net, x, layer=None, head=None):
    with torch.no_grad():
        out = net.blocks[layer].attn.out if layer is not None else None
        saved = out.weight.clone() if out is not None else None
        if out is not None:
            out.weight[:, head * 8:(head + 1) * 8] = 0.0
        try:
            return net(torch.from_numpy(x)).numpy()
        finally:
            if out is not None:
                out.weight.copy_(saved)


def test_masked_head_loss_equals_zeroing_the_head_in_torch(net, analysed):
    """Oracle: the fidelity loss of the torch model with the head's O columns zeroed."""
    result = analysed["head-importance"]
    assert result["loss"].startswith("fidelity") and result["samples"] == 16
    for layer_index, layer in enumerate(result["layers"]):
        for head in range(4):
            losses = [fidelity_loss({"y": _torch_outputs(net, b["x"])},
                                    {"y": _torch_outputs(net, b["x"], layer_index, head)})
                      for b in CALIBRATION]
            assert layer["importance"][head] == pytest.approx(np.mean(losses), rel=1e-3, abs=1e-6)
    assert -1.0 <= result["spearman"]["entropy_vs_importance"] <= 1.0


def test_proxy_is_the_norm_of_the_heads_contribution(net, analysed):
    """Oracle: the input of block 1's output projection captured with a torch hook."""
    seen = []
    hook = net.blocks[1].attn.out.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        _torch_outputs(net, np.concatenate([b["x"] for b in CALIBRATION]))
    finally:
        hook.remove()
    x = seen[0].reshape(-1, 32).double()
    w = net.blocks[1].attn.out.weight.detach().double().T
    expected = [float((x[:, h * 8:(h + 1) * 8] @ w[h * 8:(h + 1) * 8]).pow(2).sum(1).mean().sqrt())
                for h in range(4)]
    np.testing.assert_allclose(analysed["head-importance"]["layers"][1]["proxy"], expected,
                               rtol=1e-4)


def test_models_without_attention_say_so():
    ctx = PassContext()
    PassManager("head-entropy,head-importance").run(model(DUPLICATED), ctx)
    assert "no attention" in ctx.analyses["head-entropy"]["note"]
    assert "no attention" in ctx.analyses["head-importance"]["note"]
    assert ctx.analyses["head-importance"]["layers"] == []
