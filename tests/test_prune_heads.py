"""prune-heads on the tiny transformer: the OTO oracle (removing a head = zeroing it), GQA, refit,
and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import winnow
from tests.graphs import DUPLICATED, model
from tests.tiny_models import TinyTransformer
from winnow.errors import PassConfigError, PassFailedError
from winnow.ir.execute import run
from winnow.ir.regions import find_regions
from winnow.ir.verify import verify
from winnow.passes import PassContext, PassManager

RNG = np.random.default_rng(0)
CALIBRATION = [{"x": RNG.standard_normal((16, 6, 32)).astype(np.float32)} for _ in range(4)]
HELDOUT = np.random.default_rng(1).standard_normal((16, 6, 32)).astype(np.float32)


_EXPORTED = {}


def load(net):
    """The exported IR of `net` (exported once per net, then cloned)."""
    if id(net) not in _EXPORTED:
        _EXPORTED[id(net)] = (net, winnow.load(net, (torch.randn(2, 6, 32),),
                                               dynamic_shapes=({0: "batch"},)))
    return _EXPORTED[id(net)][1].clone()


@pytest.fixture(scope="module")
def plain():
    return get_net()


@pytest.fixture(scope="module")
def gqa():
    return get_net(kv_heads=2)


def zeroed_output(net, removed):
    """Oracle: the torch model with the removed heads' output-projection columns zeroed."""
    saved = [b.attn.out.weight.detach().clone() for b in net.blocks]
    with torch.no_grad():
        for name in removed:
            block, head = int(name.split(".")[1]), int(name.rsplit("head", 1)[1])
            d = net.blocks[block].attn.head_dim
            net.blocks[block].attn.out.weight[:, head * d:(head + 1) * d] = 0.0
        out = net(torch.from_numpy(HELDOUT)).numpy()
        for b, w in zip(net.blocks, saved):
            b.attn.out.weight.copy_(w)
    return out


def prune(net, pipeline):
    m, ctx = load(net), PassContext(calibration=CALIBRATION)
    PassManager(pipeline).run(m, ctx)
    verify(m)
    return m, ctx.report["prune-heads"]


CASES = {
    "pre-norm": (dict(), "prune-heads{heads=[blocks.0.attn.head1,blocks.1.attn.head0,"
                         "blocks.1.attn.head3]}"),
    "post-norm": (dict(post=True), "prune-heads{ratio=0.5,source=proxy}"),
    "gqa-within": (dict(kv_heads=2), "prune-heads{heads=[blocks.0.attn.head1,blocks.0.attn.head2,"
                                     "blocks.1.attn.head0,blocks.1.attn.head3]}"),
    "gqa-groups": (dict(kv_heads=2), "prune-heads{ratio=0.5,gqa=groups,source=random,seed=3}"),
    "global": (dict(heads=8), "prune-heads{ratio=0.5,scope=global}"),
}


_NETS: dict = {}


def get_net(**kwargs):
    """One TinyTransformer(layers=2, seed=2, **kwargs) per module (so it is exported once)."""
    key = repr(sorted(kwargs.items()))
    if key not in _NETS:
        _NETS[key] = TinyTransformer(layers=2, seed=2, **kwargs)
    return _NETS[key]


@pytest.mark.parametrize("case", list(CASES))
def test_pruning_equals_zeroing_the_heads(case):
    kwargs, pipeline = CASES[case]
    net = get_net(**kwargs)
    m, report = prune(net, pipeline)
    assert report["removed"]
    out = next(iter(run(m, {"x": HELDOUT}).values()))
    assert np.abs(out - zeroed_output(net, report["removed"])).max() < 1e-4
    heads = {r.name: r.heads for r in find_regions(m).sublayers() if r.kind == "attention"}
    for layer, kept in report["kept"].items():  # the graph really shrank
        assert heads[layer].num_heads == kept and heads[layer].num_heads % heads[layer].num_kv_heads == 0
        q = m.graph.initializers[heads[layer].q].const_value
        assert q.shape[-1] == kept * heads[layer].head_dim
    if case == "gqa-groups":
        assert set(report["kept_kv"].values()) == {1}
    if case == "global":
        assert len(report["removed"]) == 8 and min(report["kept"].values()) >= 1


def test_refit_lowers_the_heldout_error():
    net = get_net()
    reference = zeroed_output(net, [])
    errors = {}
    for refit in ("false", "true"):
        m, report = prune(net, f"prune-heads{{ratio=0.5,source=random,refit={refit}}}")
        errors[refit] = np.abs(next(iter(run(m, {"x": HELDOUT}).values())) - reference).mean()
    assert 0 < report["refit_r2"]["blocks.0.attn"] <= 1
    assert errors["true"] < 0.8 * errors["false"]


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(PassConfigError, match="ratio"):
        PassManager(f"prune-heads{{ratio={ratio}}}")


def test_unknown_head_lists_the_valid_ones(plain):
    with pytest.raises(PassFailedError, match="no head named 'blocks.0.attn.head9'.*blocks.0.attn.head0"):
        prune(plain, "prune-heads{heads=[blocks.0.attn.head9]}")


def test_every_head_of_a_layer_is_refused_and_nothing_is_rewritten(plain):
    m = load(plain)
    before = next(iter(run(m, {"x": HELDOUT}).values()))
    names = ",".join(f"blocks.1.attn.head{i}" for i in range(4))
    with pytest.raises(PassFailedError, match="every head of 'blocks.1.attn'.*drop-layers"):
        PassManager(f"prune-heads{{heads=[blocks.0.attn.head0,{names}]}}").run(
            m, PassContext(calibration=CALIBRATION))
    np.testing.assert_array_equal(next(iter(run(m, {"x": HELDOUT}).values())), before)


def test_uneven_gqa_selection_is_refused(gqa):
    with pytest.raises(PassFailedError, match="same number from each of its 2 KV groups"):
        prune(gqa, "prune-heads{heads=[blocks.0.attn.head0]}")


def test_model_without_attention_is_left_alone():
    ctx = PassContext()
    result = PassManager("prune-heads{ratio=0.5}").run(model(DUPLICATED), ctx)
    assert not result.modified and "nothing was rewritten" in ctx.report["prune-heads"]["note"]


@pytest.mark.slow
def test_pruned_digits_vit_equals_zeroing_and_fuses_as_fully_as_the_original():
    from winnow import models_zoo
    from winnow.ir.pruning import const_array, prunable_attention, set_const_input, weight_node

    zm = models_zoo.get("digits-vit")
    base = zm.load_ir()
    pruned, ctx = base.clone(), PassContext(calibration=zm.calibration())
    PassManager("prune-heads{ratio=0.5,source=proxy}").run(pruned, ctx)
    verify(pruned)
    removed = set(ctx.report["prune-heads"]["removed"])
    zeroed = base.clone()  # oracle: the removed heads' rows of each O projection set to 0
    for region in prunable_attention(find_regions(zeroed)):
        node, d = weight_node(region, region.heads.o), region.heads.head_dim
        w = const_array(node.inputs[1]).copy()
        for h in range(region.heads.num_heads):
            if f"{region.name}.head{h}" in removed:
                w[h * d:(h + 1) * d] = 0.0
        set_const_input(zeroed.graph, node, 1, w)
    data = zm.heldout()[0]
    assert np.abs(run(pruned, data)["logits"] - run(zeroed, data)["logits"]).max() < 1e-4
    PassManager("fuse").run(pruned, ctx)
    assert ctx.report["fuse"]["fused"].get("Attention") == 4
    assert ctx.report["fuse"]["fused"].get("SkipLayerNormalization") == 8
