"""Slow zoo tests on the real models: IR fidelity, metrics of the originals, training, compile.

Every test reads the registry's shared entries, so a model is trained (or loaded from the user
cache), exported and run on its held-out split once per session, whatever the test order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import winnow
from winnow import models_zoo
from winnow.measure.fidelity import evaluate_zoo
from winnow.frontend import EXAMPLE_FEEDS_KEY
from winnow.models_zoo import digits, tiny_gpt
from winnow.passes import PassContext

pytestmark = pytest.mark.slow

CURATED = models_zoo.names()
TRAINED = ["digits-cnn", "digits-vit", "tiny-gpt"]
# Largest output difference allowed between the original and its IR on held-out data.
ABS_TOL = {"minilm": 1e-4, "digits-cnn": 1e-3, "digits-vit": 1e-3, "tiny-gpt": 1e-3,
           "ppocr-det": 1e-3, "ppocr-rec": 1e-3}


@pytest.mark.parametrize("name", CURATED)
def test_ir_matches_the_original_on_heldout_data(name):
    zm = models_zoo.get(name)
    model = winnow.load(f"zoo:{name}")
    assert model.metadata_props["winnow.zoo"] == name
    feeds = model.meta[EXAMPLE_FEEDS_KEY]
    graph_inputs = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    assert sorted(feeds) == sorted(graph_inputs) == sorted(zm.heldout()[0])
    fid = evaluate_zoo(zm, model)
    assert fid.cosine > 0.99999, fid.summary()
    assert fid.max_abs_error < ABS_TOL[name], fid.summary()
    assert abs(fid.metric_drop) < 1e-3, fid.summary()
    if fid.top1 is not None:
        assert fid.top1 > 0.999 and fid.kl < 1e-5, fid.summary()


def test_minilm_original_scores():
    score = models_zoo.get("minilm").score()
    assert score["spearman"] == pytest.approx(1.0)
    assert score["cosine"] == pytest.approx(1.0)
    assert score["retrieval_agreement"] == 1.0
    assert 0.3 < score["topic_top1"] < 0.7  # same-topic nearest neighbour, measured 0.465


def test_minilm_embeddings_are_unit_length_and_dynamic():
    zm = models_zoo.get("minilm")
    run = zm.reference()
    short = {k: v[:3, :16] for k, v in zm.heldout()[0].items()}
    emb = run(short)["embeddings"]
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    from winnow.ir.execute import run as run_ir

    got = next(iter(run_ir(winnow.load("zoo:minilm"), short).values()))
    np.testing.assert_allclose(got, emb, atol=1e-5)


@pytest.mark.parametrize("name,floor", [("digits-cnn", 0.97), ("digits-vit", 0.95)])
def test_digits_classifiers_reach_their_accuracy_floor(name, floor):
    assert models_zoo.get(name).score()["accuracy"] >= floor


def test_tiny_gpt_perplexity():
    score = models_zoo.get("tiny-gpt").score()
    assert 1.5 < score["perplexity"] < 4.0  # measured 3.43 bytes-perplexity (uniform: 256)


def test_ppocr_originals_on_rendered_text():
    det = models_zoo.get("ppocr-det").score()
    assert det["mask_iou"] == 1.0 and 0.02 < det["text_fraction"] < 0.5
    rec = models_zoo.get("ppocr-rec").score()
    assert rec["seq_agreement"] == 1.0
    assert rec["char_accuracy"] > 0.7  # the real recognizer reads the rendered lines


def test_exported_structure_has_named_blocks_and_gqa():
    vit = winnow.load("zoo:digits-vit")
    scopes = " ".join(n.metadata_props.get("pkg.torch.onnx.name_scopes", "") for n in vit.graph)
    assert "blocks.0.attn" in scopes and "blocks.3.mlp" in scopes
    gpt = winnow.load("zoo:tiny-gpt")
    weights = {}
    for node in gpt.graph:
        scope = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
        if node.op_type == "MatMul" and "blocks.0.attn." in scope:
            proj = scope.split("blocks.0.attn.")[1].split("'")[0]
            weights[proj] = [list(i.shape) for i in node.inputs if i.is_initializer()]
    assert weights["q_proj"] == [[128, 128]]
    assert weights["k_proj"] == weights["v_proj"] == [[128, 32]]  # 2 KV heads of 16, 8 Q heads


def _fresh(name: str):
    if name == "tiny-gpt":
        return tiny_gpt.TinyGPTModel()
    return {m.name: m for m in digits.models()}[name]


@pytest.mark.parametrize("name", TRAINED)
def test_trained_weights_are_reused_from_the_cache(name):
    models_zoo.get(name).builder()  # trains once if the cache is empty
    fresh = _fresh(name)
    assert fresh.is_cached()
    # Reuse means no training: a train step here would fail the test (no wall-clock bound).
    from winnow.models_zoo import cache

    def no_training(*args, **kwargs):
        raise AssertionError("the cached weights were not reused: training ran again")

    original = cache._train_and_save
    cache._train_and_save = no_training
    try:
        fresh.builder()
    finally:
        cache._train_and_save = original
    assert float(fresh.train_info["train_seconds"]) > 0


@pytest.mark.parametrize("name", CURATED)
def test_lossless_compile_keeps_the_metric(name, tmp_path):
    out = tmp_path / "out"
    winnow.compile(f"zoo:{name}", out)
    fid = evaluate_zoo(name, out)
    assert fid.cosine > 0.9999, fid.summary()
    assert abs(fid.metric_drop) < 1e-3, fid.summary()


def test_tiny_gpt_task_loss_is_the_log_perplexity_of_a_batch():
    gpt = models_zoo.get("tiny-gpt")
    feeds = gpt.heldout()[0]
    outputs = gpt.reference()(feeds)
    loss = gpt.task_loss(outputs, feeds)
    assert 0.4 < loss < math.log(4.0)
    total, count = tiny_gpt.perplexity(next(iter(outputs.values())), feeds["input_ids"])
    assert loss == pytest.approx(total / count)
    shuffled = {"input_ids": np.roll(feeds["input_ids"], 7, axis=1)}
    assert gpt.task_loss(outputs, shuffled) > loss + 1.0  # wrong next bytes cost more


def test_das_on_tiny_gpt_rewards_the_lm_loss():
    from winnow.passes.analysis.calibration import task_options

    model = winnow.load("zoo:tiny-gpt")
    options = task_options("zoo:tiny-gpt", model)
    assert set(options) == {"task_loss", "model_kind"} and options["model_kind"] == "causal-lm"
    ctx = PassContext(calibration=models_zoo.get("tiny-gpt").calibration()[:1], options=options)
    result = ctx.get_analysis("das-skip", model, steps=5)
    assert result["loss"] == "task"


def test_context_adapter_on_tiny_gpt_keeps_the_lm_causal():
    from winnow.ir.execute import run as run_ir
    from winnow.passes import PassManager

    zm = models_zoo.get("tiny-gpt")
    model = zm.load_ir()
    ctx = PassContext(calibration=zm.calibration()[:2])
    PassManager("drop-layers{regions=[blocks.0],replacement=context}").run(model, ctx)
    assert any(n.op_type == "CumSum" for n in model.graph)  # a prefix mean, not a global one
    feeds = zm.heldout()[0]
    changed = {"input_ids": feeds["input_ids"].copy()}
    changed["input_ids"][:, -1] = (changed["input_ids"][:, -1] + 1) % 256
    before, after = (next(iter(run_ir(model, f).values())) for f in (feeds, changed))
    np.testing.assert_array_equal(before[:, :-1], after[:, :-1])
    assert not np.array_equal(before[:, -1], after[:, -1])
