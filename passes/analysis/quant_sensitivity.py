"""`quant-sensitivity`: per quantizable node, the fidelity loss when only that node is quantized
(for each mode asked), and the activation-range statistics that explain it.

The model is quantized once per mode with ORT's own tool (the `quantize` pass's code path), then
every quantized node gets its float original back beside it and a boolean gate input choosing
between the two (`y = Where(g, y_quant, y_float)`): one ORT session answers "only node i
quantized" for every i by a feed, not a re-quantization.
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
from winnow.passes.rewrite.quantize import (CALIBRATION, MODES, OP_TYPES, WEIGHT_TYPES, QuantSpec,
                                            calibration,
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
        calibrate: str = option("minmax", "int8-static: activation range method",
                                choices=CALIBRATION)
        reduce_range: bool = option(False, "int8: 7-bit weights (as the quantize pass's option)")
        weight_type: str = option("int8", "int8 modes: weight type (as the quantize pass's option)",
                                  choices=WEIGHT_TYPES)

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
            spec = QuantSpec(mode, self.config.per_channel, self.config.calibrate,
                             reduce_range=self.config.reduce_range,
                             weight_type=self.config.weight_type)
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
    """A quantized model whose every quantized node can be switched back to float by a feed.

    A node's loss alone is measured from the entry of the residual block it sits in: the
    float stream there is captured once per batch and fed to a session of the model's rest
    (exact: upstream of a gate that is closed, the model is float).
    """

    def __init__(self, model: ir.Model, spec: QuantSpec, candidates: Sequence[str],
                 batches: Sequence[dict[str, np.ndarray]]) -> None:
        name_nodes(model)
        original = to_proto(model)
        quantized = quantize_proto(original, spec, list(candidates), batches)
        self.proto, self.gated = gated_proto(original, quantized, candidates)
        self.batches = list(batches)
        self.anchor_of = anchor_entries(model, self.proto, self.gated)
        anchors = sorted(set(self.anchor_of.values()))
        full = onnx.ModelProto()
        full.CopyFrom(self.proto)
        full.graph.output.extend(helper.make_empty_tensor_value_info(a) for a in anchors)
        self.session = _session(full)
        self.outputs = [o.name for o in self.proto.graph.output]
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.captured: list[dict[str, np.ndarray]] = []
        self.reference = []
        for b in self.batches:
            out = self._call(self.session, {**self._data(b, self.inputs), **self._gates(set())},
                             [*self.outputs, *anchors])
            self.reference.append({k: out[k] for k in self.outputs})
            self.captured.append({a: out[a] for a in anchors})
        self.suffixes = {a: _Suffix(self.proto, a, self) for a in anchors}

    def _gates(self, enabled: set[str]) -> dict[str, np.ndarray]:
        return {f"{GATE_PREFIX}{i}": np.array(n in enabled) for i, n in enumerate(self.gated)}

    @staticmethod
    def _data(feeds: dict[str, np.ndarray], names: set[str]) -> dict[str, np.ndarray]:
        return {k: v for k, v in feeds.items() if k in names}

    @staticmethod
    def _call(session: ort.InferenceSession, feeds: dict[str, np.ndarray],
              outputs: list[str]) -> dict[str, np.ndarray]:
        names = {i.name for i in session.get_inputs()}
        return dict(zip(outputs, session.run(outputs, {k: v for k, v in feeds.items()
                                                       if k in names})))

    def _run(self, feeds: dict[str, np.ndarray], enabled: set[str]) -> dict[str, np.ndarray]:
        """The full model's outputs with `enabled` nodes quantized."""
        return self._call(self.session, {**self._data(feeds, self.inputs), **self._gates(enabled)},
                          self.outputs)

    def loss(self, enabled: set[str]) -> float:
        """Mean 1 - cosine of the outputs against float when only `enabled` nodes are quantized."""
        anchors = {self.anchor_of.get(n) for n in enabled}
        if len(anchors) == 1 and None not in anchors:
            suffix = self.suffixes[anchors.pop()]
            losses = [fidelity_loss(ref, suffix.run(i, self._gates(enabled)))
                      for i, ref in enumerate(suffix.reference)]
        else:
            losses = [fidelity_loss(ref, self._run(b, enabled))
                      for ref, b in zip(self.reference, self.batches)]
        return float(np.mean(losses))


class _Suffix:
    """The gated model after one anchor value, fed that value's float capture."""

    def __init__(self, proto: onnx.ModelProto, anchor: str, gated: GatedQuant) -> None:
        from winnow.ir.gates import suffix_model

        rest = suffix_model(ir.serde.deserialize_model(proto), anchor)
        self.session = _session(ir.serde.serialize_model(rest))
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = gated.outputs
        self.feeds = [{**gated._data(b, self.inputs), anchor: c[anchor]}
                      for b, c in zip(gated.batches, gated.captured)]
        self.reference = [self.run(i, gated._gates(set())) for i in range(len(self.feeds))]

    def run(self, batch: int, gates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs for one batch with these gates."""
        return GatedQuant._call(self.session, {**self.feeds[batch], **gates}, self.outputs)


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    so = session_options()
    # no spin-waiting: on a shared host the idle threads' spinning only steals time
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def anchor_entries(model: ir.Model, proto: onnx.ModelProto, gated: Sequence[str]
                   ) -> dict[str, str]:
    """For each gated node, the entry value of the last residual block whose descendants hold
    its gate (none for a node before the first block)."""
    import networkx as nx

    from winnow.ir.regions import find_regions

    try:
        entries = [b.entry.name for b in find_regions(model).blocks]
    except Exception:  # noqa: BLE001 - no regions: every node is scored on the full model
        return {}
    graph = nx.DiGraph()
    producer = {o: i for i, n in enumerate(proto.graph.node) for o in n.output}
    for i, node in enumerate(proto.graph.node):
        graph.add_node(i)
        graph.add_edges_from((producer[x], i) for x in node.input if x in producer)
    gate_node = {}
    for i, node in enumerate(proto.graph.node):
        for x in node.input:
            if x.startswith(GATE_PREFIX):
                gate_node[int(x[len(GATE_PREFIX):])] = i
    out: dict[str, str] = {}
    for entry in entries:
        if entry not in producer:
            continue
        below = nx.descendants(graph, producer[entry])
        for k, name in enumerate(gated):
            if gate_node.get(k) in below:
                out[name] = entry  # blocks come in order: a later entry overrides
    return out


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
        q.graph.input.append(helper.make_tensor_value_info(gate, onnx.TensorProto.BOOL, []))
        choose = helper.make_node("Where", [gate, qv, f], [out], name=f"{gate}/where")
        extra[id(made)] = [twin, choose]
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
