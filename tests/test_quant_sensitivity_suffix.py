"""quant-sensitivity scores a node from its block's entry (a suffix session fed the captured float
stream): the loss must equal the full gated model's, and every node's gate must open."""

from __future__ import annotations

import numpy as np

from winnow.ir.execute import run
from winnow.passes.analysis.quant_sensitivity import GatedQuant
from winnow.passes.rewrite.quantize import QuantSpec, quantizable_nodes
from winnow.testing import random_inputs, transformer_block


def test_block_suffix_losses_equal_the_full_gated_model():
    model = transformer_block(dim=32, heads=4, layers=3)
    feeds = [random_inputs(model, seed=s, batch=3, seq=6) for s in (1, 2)]
    names = quantizable_nodes(model, ("MatMul",))
    gated = GatedQuant(model, QuantSpec("int8-dynamic"), names, feeds)
    # nodes of blocks 1 and 2 start from their block's entry; block 0's from its entry too
    assert len(set(gated.anchor_of.values())) >= 2
    assert set(gated.anchor_of) <= set(gated.gated)
    for f, ref in zip(feeds, gated.reference):
        np.testing.assert_allclose(ref["y"], run(model, f)["y"], rtol=1e-5, atol=1e-5)
    for node in gated.gated:
        full = np.mean([1 - _cos(r["y"], gated._run(f, {node})["y"])
                        for r, f in zip(gated.reference, feeds)])
        assert full > 0  # the gate opens: the node's int8 error reaches the output
        # equal up to float32 rounding of the cosine (the suffix session may fuse differently)
        assert abs(gated.loss({node}) - full) <= 1e-2 * full + 2e-7


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
