"""The torch frontend: torch.export -> ONNX keeps numerics, module scopes and dynamic axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import winnow
from tests.tiny_models import TinyTransformer
from winnow.errors import SourceError, UnsupportedModelError
from winnow.frontend import example_feeds
from winnow.ir.execute import run

SCOPES = "pkg.torch.onnx.name_scopes"


class TinyCNN(nn.Module):
    """conv-bn-relu-pool twice, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class DataDependent(nn.Module):
    """Branches on a tensor value, which torch.export cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def _randomize_bn(module: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)


def _only_output(model, feeds) -> np.ndarray:
    outs = run(model, feeds)
    assert len(outs) == 1
    return next(iter(outs.values()))


def _expected(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(x).numpy()


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    module = TinyTransformer()
    x = torch.randn(2, 7, 32)
    return module, x, winnow.load(module, (x,))


def test_transformer_matches_torch(transformer):
    module, x, model = transformer
    feeds = example_feeds(model)
    assert list(feeds) == [model.graph.inputs[0].name]
    np.testing.assert_allclose(feeds[model.graph.inputs[0].name], x.numpy())
    np.testing.assert_allclose(_only_output(model, feeds), _expected(module, x), atol=1e-4, rtol=0)
    assert model.metadata_props["winnow.source"] == "torch:TinyTransformer"
    assert model.opset_imports[""] >= 18


def test_transformer_keeps_module_scopes(transformer):
    _, _, model = transformer
    scopes = [n.metadata_props.get(SCOPES, "") for n in model.graph]
    for name in ("blocks.0.attn", "blocks.1.mlp", "blocks.2.ln2"):
        assert any(name in s for s in scopes), name
    hierarchy = [n.metadata_props.get("pkg.torch.onnx.class_hierarchy", "") for n in model.graph]
    assert any("Attention" in h for h in hierarchy)
    matmuls = [n for n in model.graph if n.op_type == "MatMul" and "blocks.1.attn" in
               n.metadata_props.get(SCOPES, "")]
    assert len(matmuls) >= 4  # q, k, v, out projections plus the two attention matmuls


def test_cnn_matches_torch():
    torch.manual_seed(0)
    module = TinyCNN()
    _randomize_bn(module)
    module.train()
    x = torch.randn(2, 3, 16, 16)
    model = winnow.load(module, (x,))
    assert module.training, "load must restore the module's training mode"
    out = _only_output(model, example_feeds(model))
    np.testing.assert_allclose(out, _expected(module, x), atol=1e-4, rtol=0)
    assert {"Conv", "Relu", "MaxPool"} <= {n.op_type for n in model.graph}


def test_dynamic_batch_runs_other_sizes():
    torch.manual_seed(0)
    module = TinyTransformer(layers=2)
    model = winnow.load(module, (torch.randn(2, 5, 32),), dynamic_shapes=({0: "batch"},))
    shape = model.graph.inputs[0].shape
    assert str(shape[0]) == "batch" and shape[1] == 5
    name = model.graph.inputs[0].name
    for batch in (1, 4):
        x = torch.randn(batch, 5, 32)
        out = _only_output(model, {name: x.numpy()})
        np.testing.assert_allclose(out, _expected(module, x), atol=1e-4, rtol=0)


def test_dynamic_dim_objects_are_accepted():
    torch.manual_seed(0)
    module = TinyCNN()
    batch = torch.export.Dim("n")
    model = winnow.load(module, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    x = torch.randn(3, 3, 16, 16)
    out = _only_output(model, {model.graph.inputs[0].name: x.numpy()})
    np.testing.assert_allclose(out, _expected(module, x), atol=1e-4, rtol=0)


def test_non_model_source_is_refused():
    with pytest.raises(SourceError, match="object"):
        winnow.load(object())


def test_module_without_inputs_is_refused():
    with pytest.raises(SourceError, match="example_inputs"):
        winnow.load(TinyCNN())


def test_unexportable_module_names_class():
    with pytest.raises(UnsupportedModelError, match="DataDependent") as info:
        winnow.load(DataDependent(), (torch.randn(2, 3),))
    assert "\n" not in str(info.value)
