"""The search space's plans: seeds in two tiers, follow-ups built from the seeds that held the
budget, per-tensor int8 in the pipeline text."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from winnow.driver.space import (
    Space,
    base_plan,
    follow_up_plans,
    pipeline_text,
    plan_moves,
    seed_plans,
    stronger,
    suggest,
)
from winnow.passes.manager import PassContext, PassManager

SPACE = Space(drop_levels={"block": 2, "mlp": 3}, width=("prune-heads",), fuse=True,
              quant_modes=("int8-dynamic", "fp16"), quant_auto_exclude=True, split_outliers=True)


def _plan(**moves):
    return dict(base_plan(SPACE), **moves)


DROP_BLOCK = _plan(**{"drop.level": "block", "drop.count": 1, "drop.replacement": "context"})
INT8 = _plan(**{"quantize.mode": "int8-dynamic", "quantize.per_channel": False,
                "quantize.exclude": "none", "quantize.outliers": "int8"})
HEADS = _plan(**{"prune-heads.ratio": 0.25})
FUSE = _plan(fuse=True)


def test_first_seed_tier_holds_per_tensor_and_fused_int8_and_the_rest_comes_later():
    first, rest = seed_plans(SPACE)
    assert first[0] == base_plan(SPACE)
    int8 = [p for p in first if p.get("quantize.mode") == "int8-dynamic"]
    assert {(p["quantize.per_channel"], p["fuse"]) for p in int8} == {
        (True, False), (False, False), (True, True)}
    assert all(p.get("quantize.outliers") == "int8" for p in int8)
    assert [p["quantize.mode"] for p in rest if p["quantize.mode"] == "fp16"] == ["fp16"]
    assert {p.get("quantize.outliers") for p in rest} >= {"float", "float-free"}
    assert not any(p in first for p in rest)


def test_plan_moves_names_only_what_a_plan_changes():
    assert plan_moves(base_plan(SPACE), SPACE) == {}
    assert set(plan_moves(dict(INT8, fuse=True), SPACE)) == {"quantize", "fuse"}
    assert plan_moves(DROP_BLOCK, SPACE) == {"drop": {"drop.level": "block", "drop.count": 1,
                                                      "drop.replacement": "context"}}


def test_stronger_steps_each_drop_or_width_move_and_stops_at_the_last_step():
    # a dropped block steps to two, or is joined by one MLP sub-layer of a block that is left
    assert stronger(DROP_BLOCK, SPACE) == [dict(DROP_BLOCK, **{"drop.count": 2}),
                                           dict(DROP_BLOCK, **{"drop.extra": "mlp"})]
    assert stronger(dict(DROP_BLOCK, **{"drop.count": 2}), SPACE) == []  # block allows 2
    assert stronger(HEADS, SPACE) == [dict(HEADS, **{"prune-heads.ratio": 0.5})]
    assert stronger(INT8, SPACE) == [] and stronger(dict(INT8, fuse=True), SPACE) == []
    both = dict(DROP_BLOCK, **{"prune-heads.ratio": 0.25, "quantize.mode": "fp16"})
    assert stronger(both, SPACE) == [dict(both, **{"drop.count": 2}),
                                     dict(both, **{"drop.extra": "mlp"}),
                                     dict(both, **{"prune-heads.ratio": 0.5})]


def test_a_sublayer_joins_dropped_blocks_only_while_one_of_its_kind_is_left():
    import optuna

    space = Space(drop_levels={"block": 3, "attention": 3, "mlp": 3}, width=(), fuse=False,
                  quant_modes=())
    two = {"drop.level": "block", "drop.count": 2, "drop.replacement": "context"}
    assert stronger(dict(two, **{"drop.extra": "attention"}), space) == [
        dict(two, **{"drop.count": 3, "drop.extra": "attention"})]  # one extra at most
    assert [p.get("drop.extra") for p in stronger(two, space)] == [None, "attention", "mlp"]
    assert [p.get("drop.extra") for p in stronger(dict(two, **{"drop.count": 3}), space)] == []
    first, _ = seed_plans(space)
    assert [p["drop.extra"] for p in first if p.get("drop.level") == "block"] == ["none"]
    study = optuna.create_study()
    for count in (2, 3):  # 4 blocks: after 3 of them, the last attention must stay
        study.enqueue_trial(dict(two, **{"drop.count": count, "drop.extra": "attention"}))
        chosen = suggest(study.ask(), space)["drop"]
        assert chosen.get("extra") == ("attention" if count == 2 else None)


def test_an_extra_sublayer_drop_removes_one_more_region_of_that_kind():
    import torch

    import winnow
    from tests.tiny_models import TinyTransformer
    from winnow.ir.regions import find_regions

    net = TinyTransformer(dim=32, heads=4, layers=3).eval()
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(1))
    model = winnow.load(net, (x,))
    text = pipeline_text({"drop": {"level": "block", "count": 1, "replacement": "identity",
                                   "extra": "attention"}})
    assert text.count("drop-layers") == 2 and "drop-layers{count=1,level=attention," in text
    out = PassManager(text).run(model, PassContext(calibration=[{"x": x.numpy()}])).model
    kinds = [r.kind for r in find_regions(out).sublayers()]
    # 3 blocks: 1 goes whole, then 1 of the 2 attention sub-layers left; both MLPs stay
    assert kinds.count("attention") == 1 and kinds.count("mlp") == 2


def test_follow_ups_merge_moves_that_held_the_budget_cheapest_first():
    results = [(base_plan(SPACE), 1.0, 0.0), (INT8, 0.6, 0.004), (DROP_BLOCK, 0.8, 0.008),
               (HEADS, 0.9, 0.05),  # past the budget: never merged nor stepped
               (FUSE, 1.1, 0.0)]    # dearer than the source: left alone
    plans = follow_up_plans(SPACE, results, max_drop=0.01)
    # Products: INT8 x DROP 0.48, DROP stepped 0.64 both ways (INT8 has no stronger step).
    assert plans == [dict(INT8, **{k: DROP_BLOCK[k] for k in ("drop.level", "drop.count",
                                                              "drop.replacement")}),
                     dict(DROP_BLOCK, **{"drop.count": 2}),
                     dict(DROP_BLOCK, **{"drop.extra": "mlp"})]
    assert follow_up_plans(SPACE, results, max_drop=0.01, count=1) == plans[:1]
    assert follow_up_plans(SPACE, results, max_drop=0.001) == []
    # A plan queued or failed before is not proposed again; a trial's params lack the choices
    # it did not suggest (no replacement when nothing is dropped).
    tried = [{k: v for k, v in plans[0].items()}]
    assert follow_up_plans(SPACE, results, max_drop=0.01, tried=tried) == plans[1:]


def test_follow_ups_skip_pairs_that_share_a_move_and_plans_already_tried():
    int8_pc = dict(INT8, **{"quantize.per_channel": True})
    merged = dict(INT8, **{"prune-heads.ratio": 0.25})
    results = [(INT8, 0.6, 0.0), (int8_pc, 0.5, 0.0), (HEADS, 0.9, 0.0), (merged, 0.55, 0.0)]
    plans = follow_up_plans(SPACE, results, max_drop=0.01, count=10)
    assert merged not in plans  # tried already
    assert all(len(plan_moves(p, SPACE)) <= 2 for p in plans)
    quantized = [p for p in plans if "quantize" in plan_moves(p, SPACE)]
    assert all("prune-heads" in plan_moves(p, SPACE) for p in quantized)  # never int8 x int8


def test_per_tensor_int8_pipeline_quantizes_with_one_scale_per_weight(tiny_model):
    text = pipeline_text({"quantize": {"mode": "int8-dynamic", "per_channel": False}})
    assert text.endswith("quantize{mode=int8-dynamic,per_channel=false}")
    assert "per_channel" not in pipeline_text({"quantize": {"mode": "int8-dynamic",
                                                            "per_channel": True}})
    rng = np.random.default_rng(0)
    feeds = [{v.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in v.shape])
              .astype(np.float32) for v in tiny_model.graph.inputs}]
    model = PassManager(text).run(tiny_model, PassContext(calibration=feeds)).model
    scales = [v for name, v in model.graph.initializers.items() if name.endswith("_scale")]
    assert scales and all(np.size(v.const_value.numpy()) == 1 for v in scales)
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in model.graph)


def test_follow_ups_merge_only_the_cheapest_of_plans_making_the_same_moves():
    # digits-vit's study held five int8 flavours; each was merged with every structural plan
    # and the follow-ups never reached a second dropped block before the time budget ran out
    flavours = [dict(INT8, **{"quantize.per_channel": pc, "quantize.outliers": o})
                for pc in (True, False) for o in ("int8", "float")]
    costs = [0.7, 0.62, 0.65, 0.6]
    results = [(p, c, 0.0) for p, c in zip(flavours, costs)] + [(DROP_BLOCK, 0.8, 0.0)]
    plans = follow_up_plans(SPACE, results, max_drop=0.01, count=20)
    merged = [p for p in plans if len(plan_moves(p, SPACE)) == 2]
    drop = {k: DROP_BLOCK[k] for k in ("drop.level", "drop.count", "drop.replacement")}
    assert merged == [dict(flavours[3], **drop)]  # the cheapest flavour (0.6), once
    assert dict(DROP_BLOCK, **{"drop.count": 2}) in plans  # stronger steps are all still there


def test_a_first_tier_structural_seed_does_not_train():
    first, _ = seed_plans(DISTILLING)
    structural = [p for p in first if plan_moves(p, DISTILLING).keys() & {"drop",
                                                                          "prune-channels"}]
    assert structural and all(p["distill"] is False for p in structural)


def test_repeated_follow_ups_grow_a_merged_plan_that_held_by_another_move():
    int8_drop = dict(INT8, **{k: DROP_BLOCK[k] for k in ("drop.level", "drop.count",
                                                         "drop.replacement")})
    results = [(INT8, 0.6, 0.0), (DROP_BLOCK, 0.8, 0.008), (int8_drop, 0.5, 0.009),
               (HEADS, 0.9, 0.0)]
    plans = follow_up_plans(SPACE, results, max_drop=0.01, count=10)
    triple = dict(int8_drop, **{"prune-heads.ratio": 0.25})
    assert triple in plans
    assert set(plan_moves(triple, SPACE)) == {"drop", "prune-heads", "quantize"}
    assert int8_drop not in plans  # tried



@pytest.mark.slow
def test_fused_int8_seed_applies_to_tiny_gpt_and_keeps_its_outputs():
    # Every fuse + int8 trial of tiny-gpt failed in ORT's quantizer ("Unable to find data type
    # for weight_name='linear'": a value made by a fused contrib op has no ONNX type) until
    # float is the quantizer's default type.
    from winnow.driver.search import SearchOptions, TrialRunner, lossless_base
    from winnow.driver.source import resolve

    src = resolve("zoo:tiny-gpt")
    runner = TrialRunner(src, lossless_base(src), SearchOptions())
    fused = dict(seed_plans(runner.space)[0][3])
    assert fused["fuse"] and fused["quantize.mode"] == "int8-dynamic"
    choices = {"fuse": {}, "quantize": {"mode": "int8-dynamic", "per_channel": True}}
    cand = runner.evaluate(0, pipeline_text(choices))
    assert cand.cosine > 0.999 and cand.drop < 0.05  # perplexity within 0.05 of the source


DISTILLING = Space(drop_levels={"block": 2}, width=("prune-channels",), fuse=True,
                   quant_modes=("int8-dynamic",), distill=True)


def test_distill_follows_the_structural_moves_and_precedes_fusion_and_int8():
    text = pipeline_text({"prune-channels": {"ratio": 0.5, "refit": True}, "distill": {},
                          "fuse": {}, "quantize": {"mode": "int8-dynamic"}})
    order = [part.split("{")[0] for part in text.split(",") if "=" not in part or "{" in part]
    assert order.index("dce", order.index("prune-channels")) < order.index("distill") \
        < order.index("fuse") < order.index("quantize")
    assert "distill" not in pipeline_text({"quantize": {"mode": "int8-dynamic"}})


def test_distilled_seeds_repeat_the_structural_seeds_only():
    first, rest = seed_plans(DISTILLING)
    assert not any(p.get("distill") for p in first)  # the second tier: each trains a while
    distilled = [p for p in rest if p.get("distill")]
    bare = [dict(p, distill=False) for p in distilled]
    assert distilled and all(dict(p, distill=False) in [dict(q, distill=False) for q in first
                                                       if not q.get("distill")] for p in distilled)
    assert all(set(plan_moves(p, DISTILLING)) & {"drop", "prune-channels"} for p in bare)
    assert not any(p.get("distill") for p in sum(seed_plans(SPACE), []))  # a space without it


def test_follow_ups_keep_distillation_when_they_merge_or_grow_a_plan():
    base = base_plan(DISTILLING)
    drop = dict(base, **{"drop.level": "block", "drop.count": 1, "drop.replacement": "context",
                         "distill": True})
    int8 = dict(base, **{"quantize.mode": "int8-dynamic"})
    ups = follow_up_plans(DISTILLING, [(drop, 0.8, 0.001), (int8, 0.5, 0.002)], 0.01)
    merged = [p for p in ups if p.get("quantize.mode") == "int8-dynamic" and p.get("drop.count")]
    grown = [p for p in ups if p.get("drop.count") == 2]
    assert merged and all(p.get("distill") for p in merged)
    assert grown and all(p.get("distill") for p in grown)


def test_fusion_without_attention_is_a_seed_and_survives_merges():
    assert pipeline_text({"fuse": {"attention": False}}).endswith(",fuse{attention=false}")
    assert pipeline_text({"fuse": {"attention": True}}).endswith(",fuse")
    first, _ = seed_plans(SPACE)
    int8 = [p for p in first if p.get("quantize.mode") == "int8-dynamic" and p.get("fuse")]
    assert {p["fuse.attention"] for p in int8} == {True, False}
    norms = dict(FUSE, **{"fuse.attention": False})
    assert plan_moves(norms, SPACE)["fuse"] == {"fuse": True, "fuse.attention": False}
    ups = follow_up_plans(SPACE, [(norms, 0.9, 0.0), (HEADS, 0.8, 0.001)], 0.01)
    merged = [p for p in ups if p.get("fuse") and p.get("prune-heads.ratio")]
    assert merged and all(p["fuse.attention"] is False for p in merged)


CONVS = Space(drop_levels={}, width=("prune-channels",), fuse=True,
              quant_modes=("int8-dynamic",), fuse_convs=True)


def test_conv_folding_is_a_seed_of_its_own_placed_after_pruning_and_before_int8():
    first, rest = seed_plans(CONVS)
    folding = [p for p in first if p.get("fuse_convs")]
    assert folding == [dict(base_plan(CONVS), fuse_convs=True)]
    assert not any(p.get("fuse_convs") for p in rest) and not base_plan(CONVS)["fuse_convs"]
    assert plan_moves(folding[0], CONVS) == {"fuse-convs": {"fuse_convs": True}}
    # fuse's move keeps its own keys only (fuse_convs starts with "fuse" too)
    both = dict(folding[0], fuse=True, **{"fuse.attention": False})
    assert plan_moves(both, CONVS)["fuse"] == {"fuse": True, "fuse.attention": False}
    text = pipeline_text({"prune-channels": {"ratio": 0.25, "refit": True}, "fuse-convs": {},
                          "fuse": {}, "quantize": {"mode": "int8-dynamic"}})
    order = [part.split("{")[0] for part in text.split(",")]
    assert order.index("prune-channels") < order.index("fuse-convs") < order.index("fuse") \
        < order.index("quantize")
    assert "fuse-convs" not in pipeline_text({"fuse": {}})
    assert not any(p.get("fuse_convs") for p in sum(seed_plans(SPACE), []))  # no Conv there


def test_conv_folding_merges_with_a_width_move_that_held():
    folding = dict(base_plan(CONVS), fuse_convs=True)
    pruned = dict(base_plan(CONVS), **{"prune-channels.ratio": 0.25})
    ups = follow_up_plans(CONVS, [(folding, 0.7, 0.0), (pruned, 0.8, 0.001)], 0.01)
    assert dict(pruned, fuse_convs=True) in ups


def test_build_space_offers_conv_folding_only_where_there_are_convs():
    from tests.test_fuse_convs import lcnet_block
    from tests.test_fuse import residual_norm_gelu
    from winnow.driver.space import build_space

    assert build_space(lcnet_block()).fuse_convs
    assert not build_space(residual_norm_gelu()).fuse_convs


def test_the_best_plan_so_far_is_merged_with_each_numerics_move_before_other_follow_ups():
    # digits-vit at 0.005: 2 blocks + 1 attention, distilled, won at 2.1x without its int8 (2.3x
    # by hand): its stronger steps and its merges with a pruned-and-quantized plan came first,
    # and the 48 trials ran out with its int8 merge queued next
    space = Space(drop_levels={"block": 3, "attention": 3}, width=("prune-heads",), fuse=True,
                  quant_modes=("int8-dynamic",), distill=True)
    base = base_plan(space)
    two = dict(base, **{"drop.level": "block", "drop.count": 2, "drop.replacement": "context",
                        "drop.extra": "attention", "distill": True})
    int8 = dict(base, **{"quantize.mode": "int8-dynamic", "quantize.per_channel": False})
    fused = dict(base, fuse=True, **{"fuse.attention": True})
    heads_int8 = dict(int8, **{"prune-heads.ratio": 0.25})
    results = [(int8, 0.85, 0.0), (fused, 0.86, 0.0), (two, 0.53, 0.004),
               (heads_int8, 0.8, 0.004), (dict(base, **{"prune-heads.ratio": 0.5}), 0.7, 0.02)]
    plans = follow_up_plans(space, results, max_drop=0.005, count=3)
    # two x int8 0.45 and two x fused 0.456 come before two stepped (0.28) and two x heads_int8
    # (0.42); the merges keep the distillation of the dropped blocks
    assert plans[:2] == [dict(two, **{"quantize.mode": "int8-dynamic",
                                      "quantize.per_channel": False}),
                         dict(two, fuse=True, **{"fuse.attention": True})]
    assert plans[2] == dict(two, **{"drop.count": 3})  # then as before: cheapest first
    # the best plan's numerics merges tried, the others follow in the old order
    later = follow_up_plans(space, results, max_drop=0.005, tried=plans[:2], count=10)
    assert later[0] == plans[2] and dict(two, **{"prune-heads.ratio": 0.25,
                                                 "quantize.mode": "int8-dynamic",
                                                 "quantize.per_channel": False}) in later
