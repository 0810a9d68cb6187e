"""channel-importance and prune-channels on the tiny transformer: the OTO oracle (removing a
channel = zeroing it), the score against a torch-side oracle, round_to, refit and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import winnow
from tests.graphs import DUPLICATED, model
from tests.tiny_models import TinyTransformer
from winnow.errors import PassConfigError, PassFailedError
from winnow.ir.execute import run
from winnow.ir.verify import verify
from winnow.passes import PassContext, PassManager

RNG = np.random.default_rng(0)
CALIBRATION = [{"x": RNG.standard_normal((16, 6, 32)).astype(np.float32)} for _ in range(4)]
HELDOUT = np.random.default_rng(1).standard_normal((16, 6, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def net():
    return TinyTransformer(layers=2, seed=4)


_EXPORTED = {}


def load(net):
    """The exported IR of `net` (exported once per module, then cloned)."""
    if id(net) not in _EXPORTED:
        _EXPORTED[id(net)] = winnow.load(net, (torch.randn(2, 6, 32),),
                                         dynamic_shapes=({0: "batch"},))
    return _EXPORTED[id(net)].clone()


def prune(net, pipeline):
    m, ctx = load(net), PassContext(calibration=CALIBRATION)
    PassManager(pipeline).run(m, ctx)
    verify(m)
    return m, ctx


def torch_output(net, zeroed=None):
    """Oracle: the torch model with the down-projection columns of `zeroed` channels set to 0."""
    saved = [b.mlp[2].weight.detach().clone() for b in net.blocks]
    with torch.no_grad():
        for block, channels in (zeroed or {}).items():
            net.blocks[block].mlp[2].weight[:, channels] = 0.0
        out = net(torch.from_numpy(HELDOUT)).numpy()
        for b, w in zip(net.blocks, saved):
            b.mlp[2].weight.copy_(w)
    return out


def test_scores_match_the_torch_activations(net):
    ctx = PassContext(calibration=CALIBRATION)
    PassManager("channel-importance").run(load(net), ctx)
    layer = ctx.analyses["channel-importance"]["layers"][1]
    seen = []
    hook = net.blocks[1].mlp[2].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        net(torch.from_numpy(np.concatenate([b["x"] for b in CALIBRATION])))
    hook.remove()
    a = seen[0].reshape(-1, 128).double()
    expected = a.norm(dim=0) * net.blocks[1].mlp[2].weight.detach().double().norm(dim=0)
    assert layer["region"] == "blocks.1.mlp" and layer["width"] == 128
    np.testing.assert_allclose(layer["scores"], expected.numpy(), rtol=1e-4)


@pytest.mark.parametrize("source", ["activation", "weight", "random"])
def test_pruning_equals_zeroing_the_channels(net, source):
    m, ctx = prune(net, f"prune-channels{{ratio=0.4,source={source},round_to=8}}")
    pruned = ctx.report["prune-channels"]["pruned"]
    assert pruned == {"blocks.0.mlp": [128, 80], "blocks.1.mlp": [128, 80]}  # 76.8 -> 77 -> 80
    # Which channels survived: the columns of the pruned down projection in the original.
    removed = {}
    for block in range(2):
        original = net.blocks[block].mlp[2].weight.detach().numpy()
        node = next(n for n in m.graph if n.op_type == "MatMul"
                    and n.inputs[1].const_value is not None
                    and n.inputs[1].const_value.shape[0] == 80
                    and f"blocks.{block}." in n.metadata_props.get("pkg.torch.onnx.name_scopes", ""))
        kept = node.inputs[1].const_value.numpy().T  # [32, 80]
        index = [int(np.argmin(np.abs(original - kept[:, [j]]).sum(0))) for j in range(80)]
        assert len(set(index)) == 80
        removed[block] = sorted(set(range(128)) - set(index))
    out = next(iter(run(m, {"x": HELDOUT}).values()))
    assert np.abs(out - torch_output(net, removed)).max() < 1e-4
    if source == "activation":  # the dropped channels are the lowest-scored ones
        scored = PassContext(calibration=CALIBRATION)
        PassManager("channel-importance").run(load(net), scored)
        scores = np.asarray(scored.analyses["channel-importance"]["layers"][0]["scores"])
        assert scores[removed[0]].max() <= np.sort(scores)[48]


def test_refit_lowers_the_heldout_error(net):
    reference = torch_output(net)
    errors = {}
    for refit in ("false", "true"):
        m, ctx = prune(net, f"prune-channels{{ratio=0.75,refit={refit}}}")
        errors[refit] = np.abs(next(iter(run(m, {"x": HELDOUT}).values())) - reference).mean()
    assert 0 < ctx.report["prune-channels"]["refit_r2"]["blocks.1.mlp"] <= 1
    assert errors["true"] < errors["false"]


@pytest.mark.parametrize("ratio, round_to, kept", [
    (0.25, 1, [128, 64]),   # the 64 lowest scores overall are all block 1's
    (0.5, 1, [128, 1]),     # all 128 would go: one is kept
    (0.3, 16, [128, 64]),   # 77 go, block 1 keeps 51, rounded up to 64
])
def test_global_scope_takes_the_lowest_scores_wherever_they_are(ratio, round_to, kept):
    quiet = TinyTransformer(layers=2, seed=4)
    with torch.no_grad():  # block 1's MLP writes 100x less into the residual: its channels rank last
        quiet.blocks[1].mlp[2].weight.mul_(0.01)
    _, ctx = prune(quiet, f"prune-channels{{ratio={ratio},scope=global,round_to={round_to}}}")
    pruned = ctx.report["prune-channels"]["pruned"]
    assert [pruned["blocks.0.mlp"][1], pruned["blocks.1.mlp"][1]] == kept
    _, ctx = prune(quiet, f"prune-channels{{ratio={ratio},round_to={round_to}}}")  # per layer
    per_layer = ctx.report["prune-channels"]["pruned"]
    assert per_layer["blocks.0.mlp"][1] == per_layer["blocks.1.mlp"][1] < 128


def test_only_the_named_mlp_is_pruned(net):
    _, ctx = prune(net, "prune-channels{ratio=0.5,regions=[blocks.1.mlp]}")
    assert ctx.report["prune-channels"]["pruned"] == {"blocks.1.mlp": [128, 64]}


def test_bad_input_is_refused(net):
    with pytest.raises(PassConfigError, match="ratio"):
        PassManager("prune-channels{ratio=1.0}")
    with pytest.raises(PassConfigError, match="round_to"):
        PassManager("prune-channels{round_to=4}")
    with pytest.raises(PassConfigError, match="scope"):
        PassManager("prune-channels{ratio=0.5,scope=model}")
    with pytest.raises(PassFailedError, match="no prunable MLP or conv group named 'blocks.7.mlp'.*blocks.0.mlp"):
        prune(net, "prune-channels{ratio=0.5,regions=[blocks.7.mlp]}")
    ctx = PassContext()
    assert not PassManager("prune-channels{ratio=0.5}").run(model(DUPLICATED), ctx).modified
    assert "nothing was rewritten" in ctx.report["prune-channels"]["note"]
