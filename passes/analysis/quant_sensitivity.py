"""`quant-sensitivity`: per quantizable node, the fidelity loss when only that node is quantized
(for each mode asked), and the activation-range statistics that explain it.

The model is quantized once per mode with ORT's own tool (the `quantize` pass's code path), then
every quantized node gets its float original back beside it and a scalar gate input choosing
between the two (`y = y_float + g * (y_quant - y_float)`, as ir/gates.py does for regions): one
ORT session answers "only node i quantized" for every i by a feed, not a re-quantization.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from winnow.ir.activations import as_vectors, padding_mask
from winnow.ir.execute import run, session_options
from winnow.passes.analysis.calibration import fidelity_loss
from winnow.passes.base import AnalysisPass, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext
from winnow.passes.rewrite.quantize import (MODES, OP_TYPES, QuantSpec, calibration,
                                            lift_constants, name_nodes, quantizable_nodes,
                                            quantize_proto, to_proto)
from winnow.progress import bar

GATE_PREFIX = "winnow_qgate_"
OUTLIER_FACTOR = 6.0  # a channel whose max |x| is this many times the median channel's


@register_pass
class QuantSensitivityPass(AnalysisPass):
    """Rank quantizable nodes by the loss each causes alone, with activation-range statistics."""

    name = "quant-sensitivity"
    description = ("Per MatMul/Gemm/Conv/Attention: fidelity loss when only it is quantized "
                   "(one gated session per mode), activation max/p99.9 and outlier channels.")

    @dataclass(frozen=True)
    class Config:
        """Options of quant-sensitivity."""

        modes: tuple[str, ...] = option(("int8-dynamic",), "quantize modes to measure")
        per_channel: bool = option(True, "int8: one weight scale per output channel")
        samples: int = option(8, "calibration samples each node is scored on", min=1)

        def __post_init__(self) -> None:
            bad = [m for m in self.modes if m not in MODES]
            if bad or not self.modes:
                raise ValueError(f"modes must be among {', '.join(MODES)}; got {self.modes}")

    def analyze(self, model: ir.Model) -> dict[str, Any]:
        """Score every quantizable node for each mode; rank them, most sensitive first."""
        start = time.perf_counter()
        lift_constants(model)
        name_nodes(model)
        batches = calibration(model, PassContext.current(), self.config.samples)
        result: dict[str, Any] = {"modes": {}, "ranking": {}}
        for mode in self.config.modes:
            candidates = quantizable_nodes(model, OP_TYPES[mode])
            if not candidates:
                result["modes"][mode] = {"nodes": [], "note": "no quantizable node"}
                result["ranking"][mode] = []
                continue
            spec = QuantSpec(mode, self.config.per_channel)
            gated = GatedQuant(model, spec, candidates, batches)
            scores = [{"node": n, "op_type": _op(model, n), "loss": gated.loss({n})}
                      for n in bar(gated.gated, f"quant-sensitivity: {mode}")]
            scores.sort(key=lambda s: -s["loss"])
            result["modes"][mode] = {"nodes": scores, "all_quantized_loss": gated.loss(
                set(gated.gated)), "not_quantized_by_ort": sorted(set(candidates) - set(gated.gated))}
            result["ranking"][mode] = [s["node"] for s in scores]
        candidates = quantizable_nodes(model, sorted({o for m in self.config.modes
                                                      for o in OP_TYPES[m]}))
        result["activations"] = activation_stats(model, candidates, batches)
        result["samples"] = sum(_rows(b) for b in batches)
        result["seconds"] = time.perf_counter() - start
        return result


def _op(model: ir.Model, name: str) -> str:
    return next(n.op_type for n in model.graph if n.name == name)


def _rows(feeds: dict[str, np.ndarray]) -> int:
    return int(next(iter(feeds.values())).shape[0])


class GatedQuant:
    """A quantized model whose every quantized node can be switched back to float by a feed."""

    def __init__(self, model: ir.Model, spec: QuantSpec, candidates: Sequence[str],
                 batches: Sequence[dict[str, np.ndarray]]) -> None:
        name_nodes(model)
        original = to_proto(model)
        quantized = quantize_proto(original, spec, list(candidates), batches)
        self.proto, self.gated = gated_proto(original, quantized, candidates)
        self.batches = list(batches)
        self.session = ort.InferenceSession(self.proto.SerializeToString(), session_options(),
                                            providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.reference = [self._run(b, set()) for b in self.batches]

    def _run(self, feeds: dict[str, np.ndarray], enabled: set[str]) -> dict[str, np.ndarray]:
        names = {i.name for i in self.session.get_inputs()}
        gates = {f"{GATE_PREFIX}{i}": np.array(1.0 if n in enabled else 0.0, np.float32)
                 for i, n in enumerate(self.gated)}
        data = {k: v for k, v in feeds.items() if k in names}
        return dict(zip(self.outputs, self.session.run(self.outputs, {**data, **gates})))

    def loss(self, enabled: set[str]) -> float:
        """Mean 1 - cosine of the outputs against float when only `enabled` nodes are quantized."""
        losses = [fidelity_loss(ref, self._run(b, enabled))
                  for ref, b in zip(self.reference, self.batches)]
        return float(np.mean(losses))


def gated_proto(original: onnx.ModelProto, quantized: onnx.ModelProto,
                candidates: Sequence[str]) -> tuple[onnx.ModelProto, list[str]]:
    """`quantized` with each quantized candidate's float twin and a gate input beside it;
    returns the model and the gated node names (gate i belongs to the i-th)."""
    q = onnx.ModelProto()
    q.CopyFrom(quantized)
    nodes = {n.name: n for n in original.graph.node}
    weights = {i.name: i for i in original.graph.initializer}
    present = {i.name for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    gated: list[str] = []
    extra: dict[int, list[onnx.NodeProto]] = {}
    for name in candidates:
        node = nodes[name]
        out = node.output[0]
        made = producer.get(out)
        if made is None or (made.op_type == node.op_type and list(made.input) == list(node.input)):
            continue  # ORT left this node in float
        index = len(gated)
        gate, f, qv = f"{GATE_PREFIX}{index}", f"{out}/float", f"{out}/quant"
        made.output[list(made.output).index(out)] = qv
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name, twin.output[0] = f"{name}/float", f
        for k, i in enumerate(twin.input):
            if i not in weights or i in present:
                continue
            if i in producer:  # QDQ: the name now leaves a DequantizeLinear (a Conv's bias)
                twin.input[k] = f"{i}/float"
                if twin.input[k] in present:
                    continue
            w = onnx.TensorProto()
            w.CopyFrom(weights[i])
            w.name = twin.input[k]
            q.graph.initializer.append(w)
            present.add(w.name)
        q.graph.input.append(helper.make_tensor_value_info(gate, onnx.TensorProto.FLOAT, []))
        diff = helper.make_node("Sub", [qv, f], [f"{out}/diff"], name=f"{gate}/sub")
        scaled = helper.make_node("Mul", [f"{out}/diff", gate], [f"{out}/scaled"],
                                  name=f"{gate}/mul")
        total = helper.make_node("Add", [f, f"{out}/scaled"], [out], name=f"{gate}/add")
        extra[id(made)] = [twin, diff, scaled, total]
        gated.append(name)
    ordered = []
    for n in q.graph.node:
        ordered.append(n)
        ordered += extra.get(id(n), [])
    del q.graph.node[:]
    q.graph.node.extend(ordered)
    return q, gated


def _constant_value(value: ir.Value) -> bool:
    return value.const_value is not None or value.is_initializer()


def activation_stats(model: ir.Model, names: Sequence[str],
                     batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Per node input: max |x|, its 99.9th percentile, their ratio, and the channels whose max is
    OUTLIER_FACTOR times the median channel's (padding tokens left out)."""
    by_name = {n.name: n for n in model.graph}
    inputs = {n: by_name[n].inputs[0].name for n in names
              if by_name[n].inputs[0] is not None and by_name[n].op_type != "Gather"
              and not _constant_value(by_name[n].inputs[0])}
    wanted = sorted(set(inputs.values()))
    vectors: dict[str, list[np.ndarray]] = {v: [] for v in wanted}
    for feeds in batches:
        captured = run(model, feeds, capture=wanted)
        mask = padding_mask(feeds)
        for v in wanted:
            vectors[v].append(np.abs(as_vectors(captured[v], mask)))
    stats = {}
    for v, parts in vectors.items():
        a = np.concatenate(parts)
        peak, p999 = float(a.max()), float(np.percentile(a, 99.9))
        channel = a.max(axis=0)
        median = float(np.median(channel)) or 1e-12
        stats[v] = {"max": peak, "p99_9": p999, "max_over_p99_9": peak / max(p999, 1e-12),
                    "outlier_channels": int(np.sum(channel > OUTLIER_FACTOR * median)),
                    "channels": int(channel.size)}
    return [{"node": n, "input": inputs[n], **stats[inputs[n]]} for n in names if n in inputs]
