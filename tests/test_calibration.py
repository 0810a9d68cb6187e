"""Which options a zoo model contributes to a pass context (its task loss)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.graphs import FOLDABLE, parse
from winnow.passes.analysis.calibration import task_options


def _tagged(zoo: str | None):
    model = parse(FOLDABLE)
    if zoo:
        model.metadata_props["winnow.zoo"] = zoo
    return model


def test_a_causal_lm_contributes_its_cross_entropy():
    options = task_options("zoo:tiny-gpt", _tagged("tiny-gpt"))
    logits = np.zeros((1, 4, 256), dtype=np.float32)
    loss = options["task_loss"]({"logits": logits}, {"input_ids": np.zeros((1, 4), np.int64)})
    assert loss == pytest.approx(np.log(256))  # uniform logits: log of the vocabulary


@pytest.mark.parametrize("source,zoo", [("model.onnx", None), ("model.onnx", "tiny-gpt")])
def test_plain_files_contribute_nothing(source, zoo):
    assert task_options(source, _tagged(zoo)) == {}


@pytest.mark.parametrize("zoo,kind", [("minilm", "text-embedding"), ("tiny-gpt", "causal-lm"),
                                      ("digits-cnn", "image-classifier")])
def test_zoo_models_say_what_they_are(zoo, kind):
    options = task_options(f"zoo:{zoo}", _tagged(zoo))
    assert options["model_kind"] == kind
    assert ("task_loss" in options) == (zoo == "tiny-gpt")
