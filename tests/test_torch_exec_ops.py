"""Op rules of winnow's torch runner (ir/torch_exec.py) that distill trains through: their
outputs against ONNX Runtime and their gradients."""

from __future__ import annotations

import numpy as np
import torch

from tests.graphs import HEADER, parse
from winnow.ir.execute import run
from winnow.ir.torch_exec import TorchGraph

BN_HSWISH = HEADER + """
agraph (float[2, 3, 5, 7] x) => (float[2, 3, 5, 7] y)
<float[3] s = {1.5, 0.5, -2.0}, float[3] b = {0.1, -0.2, 0.3}, float[3] m = {0.2, -0.1, 0.0},
 float[3] v = {0.5, 2.0, 1.0}> {
    n = BatchNormalization <epsilon = 0.001> (x, s, b, m, v)
    y = HardSwish (n)
}
"""


def test_batch_norm_matches_ort_and_trains_scale_and_bias_only():
    """distill makes every float initializer a parameter, BatchNormalization's running mean and
    variance included: the rule must run (F.batch_norm refuses statistics with requires_grad),
    give ORT's output, and leave the statistics constant (a trained variance can go negative)."""
    model = parse(BN_HSWISH)
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32) * 3
    want = run(model, {"x": x})["y"]
    net = TorchGraph(model)
    (out,) = net({"x": torch.from_numpy(x)})
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    params = list(net.parameters())
    assert len(params) == 4
    trained = [p for p in params if p.grad is not None]
    assert len(trained) == 2  # scale and bias; mean and variance get no gradient
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in trained)
    got = sorted(p.detach().numpy().tolist() for p in trained)
    np.testing.assert_allclose(got, [[0.1, -0.2, 0.3], [1.5, 0.5, -2.0]], rtol=1e-6)


CUMSUM = HEADER + """
agraph (float[2, 5, 3] x) => (float[2, 5, 3] y)
<int64 axis = {1}> {
    y = CumSum <exclusive = EXCLUSIVE, reverse = REVERSE> (x, axis)
}
"""


def test_cumsum_matches_ort_in_every_mode():
    """drop-layers' context adapters use a running mean (CumSum): distill trains through it."""
    x = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32)
    for exclusive in (0, 1):
        for reverse in (0, 1):
            model = parse(CUMSUM.replace("EXCLUSIVE", str(exclusive))
                          .replace("REVERSE", str(reverse)))
            want = run(model, {"x": x})["y"]
            (got,) = TorchGraph(model)({"x": torch.from_numpy(x)})
            np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)
