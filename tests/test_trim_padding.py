"""trim-padding: crops the positions every row masks, matches torch on padded inputs, and leaves
models alone whose outputs carry the sequence axis or read masked positions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

import winnow
from winnow.errors import WinnowError
from winnow.ir.execute import run
from winnow.passes.manager import FINISHING_PIPELINE, PassContext, PassManager, finished

VOCAB, DIM, SEQ = 40, 16, 12


class MaskedEncoder(nn.Module):
    """Token + position embeddings, one masked self-attention and MLP, then `pool`: 'masked' mean
    over kept positions (sentence-transformers), 'all' positions, or 'none' (hidden states)."""

    def __init__(self, pool: str = "masked") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = pool
        self.tokens, self.positions = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ, DIM)
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.tokens(input_ids) + self.positions.weight[:seq]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        bias = (1.0 - attention_mask[:, None, :].float()) * torch.finfo(torch.float32).min
        att = torch.softmax(q @ k.transpose(-1, -2) / DIM**0.5 + bias, dim=-1)
        x = x + self.out(att @ v)
        x = x + self.mlp(x)
        if self.pool == "none":
            return x
        mask = attention_mask[..., None].float() if self.pool == "masked" else torch.ones_like(x)
        return (x * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _padded(lengths: list[int], seed: int = 0, left: bool = False) -> dict[str, np.ndarray]:
    """Rows of random tokens, `lengths` of them kept, random other tokens behind the padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (len(lengths), SEQ)).astype(np.int64)
    mask = np.zeros((len(lengths), SEQ), np.int64)
    for r, n in enumerate(lengths):
        if left:
            mask[r, SEQ - n:] = 1
        else:
            mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _load(pool: str = "masked") -> tuple[nn.Module, ir.Model]:
    net = MaskedEncoder(pool).eval()
    feeds = _padded([SEQ, 5])
    example = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    axes = {0: "batch", 1: "seq"}
    return net, winnow.load(net, example, dynamic_shapes=(dict(axes), dict(axes)))


def _trim(model: ir.Model, pipeline: str = "trim-padding") -> tuple[ir.Model, dict]:
    ctx = PassContext(calibration=[_padded([7, 3, SEQ], seed=1)])
    out = PassManager(pipeline).run(model, ctx).model
    return out, ctx.report["trim-padding"]


def _torch(net: nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(feeds["input_ids"]),
                   torch.from_numpy(feeds["attention_mask"])).numpy()


def _cropped_and_output(trimmed: ir.Model, feeds: dict[str, np.ndarray]
                        ) -> tuple[dict[str, tuple[int, ...]], np.ndarray]:
    """The shapes of the cropped inputs inside the trimmed model, and its output."""
    names = ["input_ids_trimmed", "attention_mask_trimmed"]
    got = run(trimmed, feeds, capture=names)
    return {n: got[n].shape for n in names}, next(v for k, v in got.items() if k not in names)


@pytest.mark.parametrize("feeds,length", [
    (_padded([3, 5], seed=2), 5),  # right padding: cropped to the longest row
    (_padded([3, 5], seed=3, left=True), SEQ),  # left padding is never cropped
    (_padded([SEQ, 2], seed=4), SEQ),  # a full row keeps every position
    (_padded([0, 0], seed=5), 1),  # all padding: one position is kept
])
def test_trimmed_model_matches_torch_and_runs_only_the_kept_positions(feeds, length):
    net, model = _load()
    trimmed, report = _trim(model)
    assert report["trimmed"] == ["input_ids", "attention_mask"] and report["max_abs_error"] < 1e-5
    shapes, out = _cropped_and_output(trimmed, feeds)
    assert set(shapes.values()) == {(2, length)}
    np.testing.assert_allclose(out, _torch(net, feeds), atol=1e-5)


@pytest.mark.parametrize("pool,key,reason", [
    ("none", "note", "carries the sequence axis"),  # per-token outputs
    ("all", "skipped", "read masked positions"),  # pooling without the mask: rolled back
])
def test_models_whose_outputs_see_the_padding_are_left_alone(pool, key, reason):
    _, model = _load(pool)
    nodes = len(model.graph)
    trimmed, report = _trim(model)
    assert report["trimmed"] == [] and reason in report[key]
    assert len(trimmed.graph) == nodes


def test_a_named_mask_that_does_not_exist_lists_the_inputs(tmp_path):
    _, model = _load()
    with pytest.raises(WinnowError, match="its inputs are input_ids, attention_mask"):
        _trim(model, "trim-padding{mask=nope}")
    path = tmp_path / "enc.onnx"
    ir.save(model, path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "winnow", "compile", str(path), "--pipeline",
                           "trim-padding{mask=nope}", "-o", str(out), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no input 'nope'" in proc.stdout + proc.stderr
    assert not out.exists()


def test_finished_puts_the_finishing_passes_before_quantization_once():
    assert finished("dce") == f"dce,{FINISHING_PIPELINE}"
    assert finished(f"dce,{FINISHING_PIPELINE}") == f"dce,{FINISHING_PIPELINE}"
    quantized = "dce,split-outliers,quantize{mode=int8-dynamic,exclude=[auto]}"
    assert finished(quantized) == f"dce,{FINISHING_PIPELINE},{quantized[4:]}"
    assert finished(quantized, at_end=True) == f"{quantized},{FINISHING_PIPELINE}"
    assert finished("dce,fuse-convs") == "dce,fuse-convs,split-skip-norms,trim-padding"  # only what it lacks
    assert FINISHING_PIPELINE.endswith("trim-padding")
    assert winnow.passes.LOSSLESS_PIPELINE == f"{winnow.passes.DEFAULT_PIPELINE},{FINISHING_PIPELINE}"


def test_compile_runs_the_finishing_passes_after_a_kept_model(tmp_path):
    from winnow.driver.compile import Rewritten, compile_model

    net, model = _load()
    path = tmp_path / "enc.onnx"
    ir.save(model, path)
    kept = PassManager("dce").run(winnow.load(path), PassContext()).model
    record = {"index": 0, "name": "dce", "modified": False, "seconds": 0.0,
              "nodes": {"before": len(kept.graph), "after": len(kept.graph)}, "report": None}
    result = compile_model(str(path), tmp_path / "out", pipeline="dce,trim-padding",
                           rewritten=Rewritten(kept, [record]),
                           calibration=[_padded([7, 3, SEQ], seed=1)])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entries = {p["name"]: p for p in manifest["passes"]}
    assert entries["dce"].get("reused") and entries["trim-padding"]["modified"]
    assert result.pipeline.endswith("trim-padding")
    feeds = _padded([4, 2], seed=6)
    emitted = run(ir.load(tmp_path / "out" / "model.onnx"), feeds)
    np.testing.assert_allclose(next(iter(emitted.values())), _torch(net, feeds), atol=1e-5)


def test_dynamic_int8_sees_the_padding_so_trim_goes_before_it():
    """Dynamic quantization takes its scales over every position, padding included: after it,
    cropping changes the outputs and the check refuses it; before it, the crop holds."""
    _, model = _load()
    _, report = _trim(model,
                          "quantize{mode=int8-dynamic,per_channel=false},trim-padding")
    assert report["trimmed"] == [] and "read masked positions" in report["skipped"]
    _, model = _load()
    before, report = _trim(model, "trim-padding,quantize{mode=int8-dynamic,per_channel=false}")
    assert report["trimmed"] == ["input_ids", "attention_mask"]
    got = run(before, _padded([3, 5], seed=7), capture=["input_ids_trimmed"])
    assert got["input_ids_trimmed"].shape == (2, 5)



def test_finishing_passes_are_judged_against_the_kept_model_not_the_source(tmp_path):
    """A kept trial model is trained (its outputs differ from the source's on purpose): the
    lossless passes after it (here cse) must be checked against it, or every one is rolled back."""
    import onnx
    from onnx import TensorProto, helper

    from winnow.driver.compile import Rewritten, compile_model

    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3],
                                rng.normal(size=18).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r1"]), helper.make_node("Relu", ["c"], ["r2"]),
         helper.make_node("Add", ["r1", "r2"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 4, 4])], [weight])
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)]),
              path)
    kept = winnow.load(path)
    w = kept.graph.initializers["w"]
    w.const_value = ir.tensor(w.const_value.numpy() * 2.0 + 0.1)  # "trained"
    record = {"index": 0, "name": "dce", "modified": True, "seconds": 0.0,
              "nodes": {"before": 2, "after": 2}, "report": None}
    compile_model(str(path), tmp_path / "out", pipeline="dce,cse",
                  rewritten=Rewritten(kept, [record]),
                  calibration=[{"x": rng.normal(size=(4, 1, 4, 4)).astype(np.float32)}])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["fidelity"]["max_abs_error"] > 1e-2  # it really differs from the source
    assert manifest["fidelity"]["rolled_back"] == []
    out = ir.load(tmp_path / "out" / "model.onnx")
    assert [n.op_type for n in out.graph] == ["Conv", "Relu", "Add"]  # cse's merge was kept
    x = rng.normal(size=(3, 1, 4, 4)).astype(np.float32)
    emitted = run(out, {"x": x})["y"]
    np.testing.assert_allclose(emitted, run(kept, {"x": x})["y"], atol=1e-5)  # the kept model
