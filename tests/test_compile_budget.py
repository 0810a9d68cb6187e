"""compile with lossy passes: calibration, the fidelity budget (--max-drop) and --force."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import winnow
from tests.tiny_models import TinyTransformer, zero_block_branches
from winnow.errors import FidelityError

CALIBRATION = [{"x": np.random.default_rng(i).standard_normal((2, 6, 32)).astype(np.float32)}
               for i in range(4)]


def compile_tiny(out, zero: int | None = None, **kwargs):
    net = TinyTransformer(layers=3, seed=5)
    if zero is not None:
        zero_block_branches(net, zero)
    return winnow.compile(net, out, example_inputs=(torch.randn(2, 6, 32),),
                          calibration=CALIBRATION,
                          pipeline="fold-constants,drop-layers{count=1},dce", **kwargs)


def test_lossy_result_below_budget_is_refused_and_nothing_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FidelityError, match="misses the fidelity budget: 1 - cosine on the check "
                                            "inputs is .* above --max-drop 0.001"):
        compile_tiny(out, max_drop=0.001)
    assert not out.exists()


def test_force_writes_it_and_records_the_budget(tmp_path):
    result = compile_tiny(tmp_path / "out", max_drop=0.001, force=True)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    budget = manifest["fidelity"]["budget"]
    assert budget["forced"] is True and budget["drop"] > 0.001
    assert manifest["fidelity"]["lossy_passes"] == ["drop-layers"]
    assert manifest["fidelity"]["calibration"] == "explicit"
    assert result.nodes_after < result.nodes_before


def test_dropping_an_identity_block_fits_any_budget(tmp_path):
    result = compile_tiny(tmp_path / "out", zero=1, max_drop=1e-6)
    assert result.fidelity["budget"]["drop"] < 1e-6
