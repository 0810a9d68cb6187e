"""bench/distill_offload.py on a tiny transformer: train there, resume with --init, assemble's
weight check (what the GPU offload of issue 8's distillation runs)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import winnow
from tests.tiny_models import TinyTransformer

RNG = np.random.default_rng(0)
CALIBRATION = [{"x": RNG.standard_normal((16, 6, 32)).astype(np.float32)} for _ in range(4)]
PIPELINE = "prune-channels{ratio=0.5},distill{steps=%d,lr=0.003,check_every=10,batch=32}"


@pytest.fixture(scope="module")
def offload():
    """bench/distill_offload.py as a module."""
    path = Path(__file__).resolve().parents[1] / "bench" / "distill_offload.py"
    spec = importlib.util.spec_from_file_location("distill_offload", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory, offload):
    """A folder as `export` writes it: the model (in two parts) and its calibration split."""
    folder = tmp_path_factory.mktemp("export")
    net = TinyTransformer(layers=2, seed=4)
    model = winnow.load(net, (torch.randn(2, 6, 32),), dynamic_shapes=({0: "batch"},))
    ir.save(model, folder / offload.MODEL)
    offload._save_batches(folder / offload.CALIBRATION, CALIBRATION)
    assert len(offload._split_file(folder / offload.MODEL, 20_000)) > 1
    return folder


def _train(offload, exported, out, steps, init=""):
    args = ["train", "--from", str(exported), "--to", str(out), "--pipeline", PIPELINE % steps]
    offload.main(args + (["--init", str(init)] if init else []))
    return json.loads((out / "distill.json").read_text())


def test_train_resumes_from_the_weights_it_wrote(offload, exported, tmp_path):
    first = _train(offload, exported, tmp_path / "a", 60)
    assert first["best_step"] > 0 and first["held_back_loss"][1] < first["held_back_loss"][0]
    again = _train(offload, exported, tmp_path / "b", 1, init=tmp_path / "a")
    fresh = _train(offload, exported, tmp_path / "c", 1)
    # the resumed run starts where the first ended (same held-back rows), not from scratch
    assert again["held_back_loss"][0] == pytest.approx(first["held_back_loss"][1], rel=1e-4)
    assert fresh["held_back_loss"][0] == pytest.approx(first["held_back_loss"][0], rel=1e-4)


def test_weights_that_do_not_fit_are_refused_by_name(offload, exported, tmp_path):
    _train(offload, exported, tmp_path / "a", 1)
    weights = offload._load_weights(tmp_path / "a")
    name = next(iter(weights))
    model = ir.load(offload._join_parts(exported, offload.MODEL))
    with pytest.raises(SystemExit, match=f"'{name}'.*does not fit"):
        offload._put_weights(model, {name: np.zeros((3, 3, 3), np.float32)})


def test_init_without_a_distill_step_is_refused_and_writes_nothing(offload, exported, tmp_path):
    _train(offload, exported, tmp_path / "a", 1)
    args = ["train", "--from", str(exported), "--to", str(tmp_path / "b"),
            "--pipeline", "prune-channels{ratio=0.5}", "--init", str(tmp_path / "a")]
    with pytest.raises(SystemExit, match="--pipeline has no distill step"):
        offload.main(args)
    assert not (tmp_path / "b").exists()
