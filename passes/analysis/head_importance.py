"""`head-importance`: the loss when one attention head alone is masked (Michel et al. 2019, "Are
Sixteen Heads Really Better than One?"), and a cheap proxy: the RMS norm of the head's
contribution through the output projection, x_h @ W_o[h], over real tokens.

Speed: the model is copied once with a head-gate input per attention layer (`winnow.ir.gates.
head_gated_copy`), so masking a head is a feed, not a new model; masking a head of layer L runs
only the model after layer L's entry (one session per layer, built once), fed with the entry
value of the unmasked run. The loss is the zoo model's task loss when the context has one
(importance = masked loss - unmasked loss), else 1 - cosine of the outputs against the unmasked
model. Spearman correlations of importance with entropy and with the proxy say how well the
cheap scores rank heads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from winnow import progress
from winnow.errors import ExecutionError
from winnow.ir.activations import as_vectors, padding_mask
from winnow.ir.execute import model_bytes, run, session_options
from winnow.ir.gates import head_gate_feeds, head_gated_copy, suffix_model
from winnow.ir.pruning import const_array, head_names, prunable_attention, weight_node
from winnow.ir.regions import Region, find_regions
from winnow.passes.base import AnalysisPass, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext

NO_HEADS = ("no attention layer with recognisable heads (head count, head dim and Q/K/V/O "
            "projections) was found, so there are no heads to score")


def spearman(a, b) -> float | None:
    """Spearman rank correlation, None when undefined (fewer than 3 values or a constant)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])  # numpy: scipy is not in the core


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of `x` with ties given their average rank (what scipy's spearmanr uses)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="mergesort")] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def by_length(batches: list[dict]) -> list[dict]:
    """The batches merged into one, rows sorted by attention-mask length, so that mini-batches
    trimmed of trailing padding carry little of it (unchanged without a mask or when shapes differ)."""
    keys = set(batches[0]) if batches else set()
    if len(batches) < 1 or any(set(b) != keys for b in batches) or "attention_mask" not in keys:
        return batches
    arrays = {k: [np.asarray(b[k]) for b in batches] for k in keys}
    if any(a.ndim == 0 or a.shape[1:] != arrays[k][0].shape[1:] for k in keys for a in arrays[k]):
        return batches
    merged = {k: np.concatenate(v) for k, v in arrays.items()}
    mask = merged["attention_mask"]
    if mask.ndim != 2 or any(v.shape[0] != mask.shape[0] for v in merged.values()):
        return batches
    order = np.argsort(mask.sum(axis=1), kind="stable")
    return [{k: v[order] for k, v in merged.items()}]


def output_weight(region: Region) -> np.ndarray:
    """The output projection as [num_heads * head_dim, model_dim]."""
    node = weight_node(region, region.heads.o)
    w = const_array(node.inputs[1])
    trans = node.op_type == "Gemm" and node.attributes.get("transB") is not None \
        and node.attributes["transB"].as_int() == 1
    return w.T if trans else w


def head_proxy(model: ir.Model, regions: list[Region], batches: list[dict]) -> dict[str, np.ndarray]:
    """Per layer, per head: RMS over real tokens of ||x_h @ W_o[h]|| (the head's contribution)."""
    inputs = {r.name: weight_node(r, r.heads.o).inputs[0].name for r in regions}
    sums = {r.name: np.zeros(r.heads.num_heads) for r in regions}
    count = 0
    for feeds in batches:
        captured = run(model, feeds, capture=list(inputs.values()))
        mask = padding_mask(feeds)
        for r in regions:
            x = as_vectors(captured[inputs[r.name]], mask)
            w, d = output_weight(r).astype(np.float64), r.heads.head_dim
            for h in range(r.heads.num_heads):
                part = x[:, h * d:(h + 1) * d] @ w[h * d:(h + 1) * d]
                sums[r.name][h] += float((part**2).sum())
        count += len(x)
    return {name: np.sqrt(s / max(count, 1)) for name, s in sums.items()}


def _session(model: ir.Model) -> ort.InferenceSession:
    """An ORT session for many small runs (worker threads sleep instead of spinning)."""
    options = session_options(threads=0, optimize=True)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model_bytes(model), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise ExecutionError("ONNX Runtime cannot load the head-gated model: "
                             f"{str(exc).splitlines()[0]}") from exc


class HeadMasker:
    """Outputs of the model with one head masked, from one head-gated copy and per-layer suffixes."""

    def __init__(self, model: ir.Model, regions: list[Region]) -> None:
        ir.external_data.load_to_model(model)
        self.regions = regions
        self.gated, _ = head_gated_copy(model, regions)
        self.outputs = [v.name for v in self.gated.graph.outputs]
        inputs = {v.name for v in self.gated.graph.inputs}
        self.starts = {i: r.entry.name for i, r in enumerate(regions) if r.entry.name not in inputs}
        full = self.gated.clone()
        values = {v.name: v for node in full.graph for v in node.outputs}
        self.captures = [n for n in dict.fromkeys(self.starts.values()) if n not in self.outputs]
        full.graph.outputs.extend(values[n] for n in self.captures)
        self.full = _session(full)
        self.suffix = {i: _session(suffix_model(self.gated, name)) for i, name in self.starts.items()}

    @staticmethod
    def _feeds(session: ort.InferenceSession, values: dict) -> dict:
        names = {i.name for i in session.get_inputs()}
        return {k: v for k, v in values.items() if k in names}

    def unmasked(self, feeds: dict) -> dict[str, np.ndarray]:
        """Outputs and layer entries of the unmasked model."""
        names = self.outputs + self.captures
        values = {**feeds, **head_gate_feeds(self.regions)}
        return dict(zip(names, self.full.run(names, self._feeds(self.full, values))))

    def masked(self, feeds: dict, opened: dict, layer: int, head: int) -> dict[str, np.ndarray]:
        """Graph outputs with head `head` of layer `layer` masked (`opened`: the unmasked run)."""
        values = {**feeds, **head_gate_feeds(self.regions, [(layer, head)])}
        session = self.suffix.get(layer, self.full)
        if layer in self.suffix:
            values[self.starts[layer]] = opened[self.starts[layer]]
        return dict(zip(self.outputs, session.run(self.outputs, self._feeds(session, values))))


@register_pass
class HeadImportancePass(AnalysisPass):
    """Score every attention head by the loss when it alone is masked, plus a cheap proxy."""

    name = "head-importance"
    description = ("loss when one head alone is masked (one head-gated copy, per-layer suffix "
                   "sessions) and the norm of its contribution through the output projection")

    @dataclass(frozen=True)
    class Config:
        """Options of head-importance."""

        samples: int = option(64, "calibration sequences/images used", min=1)
        batch_size: int = option(16, "rows per mini-batch (trailing padding trimmed); 0 keeps "
                                 "calibration batches whole", min=0)
        proxy_only: bool = option(False, "compute only the cheap proxy, not the masked losses")

    def analyze(self, model: ir.Model) -> dict[str, Any]:
        """Masked-head loss and proxy per head; Spearman of entropy and proxy against it."""
        from winnow.passes.analysis.calibration import calibration_batches, split_batch
        from winnow.passes.analysis.layer_similarity import limit_samples

        ctx = PassContext.current()
        start = time.perf_counter()
        regions = prunable_attention(find_regions(model))
        if not regions:
            return {"layers": [], "heads": {}, "note": NO_HEADS}
        cfg = self.config
        whole = by_length(limit_samples(calibration_batches(model, ctx), cfg.samples))
        batches = [mb for b in whole for mb in split_batch(b, cfg.batch_size, model)]
        proxy = head_proxy(model, regions, batches)
        task_loss = ctx.options.get("task_loss")
        importance = None if cfg.proxy_only else _masked_losses(model, regions, batches, task_loss)
        layers = []
        for i, r in enumerate(regions):
            layer = {"region": r.name, "num_heads": r.heads.num_heads,
                     "num_kv_heads": r.heads.num_kv_heads, "proxy": proxy[r.name].tolist()}
            if importance is not None:
                layer["importance"] = importance[i].tolist()
            layers.append(layer)
        names = [n for r in regions for n in head_names(r)]
        flat_proxy = np.concatenate([proxy[r.name] for r in regions])
        result = {"layers": layers, "heads": {n: {"proxy": float(p)} for n, p in zip(names, flat_proxy)},
                  "loss": "task" if callable(task_loss) else "fidelity (1 - cosine of outputs)",
                  "samples": sum(next(iter(b.values())).shape[0] for b in batches)}
        if importance is not None:
            flat = np.concatenate(importance)
            for n, v in zip(names, flat):
                result["heads"][n]["importance"] = float(v)
            entropy = ctx.get_analysis("head-entropy", model).get("heads", {})
            result["spearman"] = {
                "proxy_vs_importance": spearman(flat_proxy, flat),
                "entropy_vs_importance": (spearman([entropy[n] for n in names], flat)
                                          if all(n in entropy for n in names) else None)}
        result["seconds"] = time.perf_counter() - start
        return result


def _masked_losses(model: ir.Model, regions: list[Region], batches: list[dict],
                   task_loss: Any) -> list[np.ndarray]:
    """Per layer, per head: mean (over rows) loss increase when that head alone is masked."""
    from winnow.passes.analysis.calibration import fidelity_loss

    masker = HeadMasker(model, regions)
    total = [np.zeros(r.heads.num_heads) for r in regions]
    rows = 0
    jobs = sum(r.heads.num_heads for r in regions) * len(batches)
    with progress.counter("head-importance", jobs) as bar:
        for feeds in batches:
            n = next(iter(feeds.values())).shape[0]
            opened = masker.unmasked(feeds)
            reference = {k: opened[k] for k in masker.outputs}
            base = float(task_loss(reference, feeds)) if callable(task_loss) else 0.0
            for i, r in enumerate(regions):
                for h in range(r.heads.num_heads):
                    out = masker.masked(feeds, opened, i, h)
                    loss = (float(task_loss(out, feeds)) if callable(task_loss)
                            else fidelity_loss(reference, out))
                    total[i][h] += n * (loss - base)
                    bar.update(1)
            rows += n
    return [t / max(rows, 1) for t in total]
