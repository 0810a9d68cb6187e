"""`quantize`: fewer bits with ONNX Runtime's own quantization tools (`onnxruntime.quantization`).

Modes: `int8-dynamic` (quantize_dynamic), `int8-static` (quantize_static, QDQ, calibrated on the
pass context's calibration batches with MinMax, Entropy or Percentile), `int4-weight` and
`int8-weight` (MatMulNBits through ORT's n-bits quantizer: blockwise weights, activations
quantized per block at run time, accuracy_level 4) and `fp16` (ORT's float16 converter, IO kept
fp32).
Nodes are left in float by name or by region (a selector that matches nothing is an error), or
with `exclude=[auto]`: the most sensitive nodes (the `quant-sensitivity` ranking) are excluded
one at a time until the calibration loss (mean 1 - cosine) is within `budget`. ORT works on
ModelProto files: the IR is serialized, quantized in a temporary folder and read back in place.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import version_converter

from winnow.errors import PassConfigError, UnsupportedModelError
from winnow.progress import quiet_libraries
from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext

MODES = ("int8-dynamic", "int8-static", "int4-weight", "int8-weight", "fp16")
CALIBRATION = ("minmax", "entropy", "percentile")
WEIGHT_TYPES = ("int8", "uint8")
AUTO = "auto"
# Ops with a constant weight that each mode quantizes (int4 covers MatMul only: MatMulNBits).
OP_TYPES = {"int8-dynamic": ("MatMul", "Gemm", "Attention", "Gather"),
            "int8-static": ("MatMul", "Gemm", "Conv"),
            "int4-weight": ("MatMul",),
            "int8-weight": ("MatMul",),
            "fp16": ("MatMul", "Gemm", "Conv", "Attention")}
# MatMulConstBOnly: activation x activation MatMuls stay float. DefaultTensorType: a value made
# by a contrib op that ONNX shape inference cannot type (fuse's SkipSimplifiedLayerNormalization
# feeding a MatMul on tiny-gpt) is float; without it ORT's quantizers refuse the model.
EXTRA_OPTIONS = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how (shared by the `quantize` pass and `quant-sensitivity`)."""

    mode: str = "int8-dynamic"
    per_channel: bool = True
    calibrate: str = "minmax"
    block_size: int = 32
    reduce_range: bool = False
    accuracy_level: int = 4
    embeddings: bool = False
    weight_type: str = "int8"

    @property
    def op_types(self) -> tuple[str, ...]:
        """The op types this spec quantizes (int4-weight adds Gather with `embeddings`)."""
        extra = ("Gather",) if self.embeddings and self.mode == "int4-weight" else ()
        return OP_TYPES[self.mode] + extra


@register_pass
class QuantizePass(Pass):
    """Quantize weights (and activations) with onnxruntime.quantization, with exclusions."""

    name = "quantize"
    description = ("int8 dynamic/static (QDQ), int4 weights (MatMulNBits) or fp16 with ORT's "
                   "quantizers; exclusions by node, region or sensitivity (exclude=[auto]).")
    lossless = False

    @dataclass(frozen=True)
    class Config:
        """Options of quantize."""

        mode: str = option("int8-dynamic", "number format", choices=MODES)
        per_channel: bool = option(True, "int8: one weight scale per output channel")
        calibrate: str = option("minmax", "int8-static: activation range method",
                                choices=CALIBRATION)
        block_size: int = option(32, "int4/int8-weight: weights per scale along the contraction "
                                 "axis (ORT pads a last partial block)",
                                 choices=(16, 32, 64, 128, 256))
        reduce_range: bool = option(False, "int8: 7-bit weights (avoids u8s8 overflow without VNNI)")
        accuracy_level: int = option(4, "int4/int8-weight: MatMulNBits compute type (0 unset, "
                                     "1 fp32, 2 fp16, 3 bf16, 4 int8 activations)",
                                     choices=(0, 1, 2, 3, 4))
        embeddings: bool = option(False, "int4-weight: also Gather tables (embeddings) as "
                                  "GatherBlockQuantized, blocks along the embedding axis")
        weight_type: str = option("int8", "int8 modes: signed weights (u8s8 kernels, which "
                                  "saturate without VNNI) or uint8 (u8u8 kernels, exact)",
                                  choices=WEIGHT_TYPES)
        exclude: tuple[str, ...] = option((), "node or region names kept in float; [auto] "
                                          "excludes the most sensitive nodes until `budget` holds")
        budget: float = option(0.005, "exclude=[auto]: largest calibration loss (mean 1 - cosine)",
                               min=0.0, max=1.0)
        max_excluded: int = option(12, "exclude=[auto]: most nodes it may exclude", min=0)
        samples: int = option(32, "calibration samples for static ranges and exclude=[auto]",
                              min=1)

    @property
    def spec(self) -> QuantSpec:
        """The quantization settings as a QuantSpec."""
        c = self.config
        return QuantSpec(c.mode, c.per_channel, c.calibrate, c.block_size, c.reduce_range,
                         c.accuracy_level, c.embeddings, c.weight_type)

    def call(self, model: ir.Model) -> PassResult:
        """Quantize in place; the report says what was quantized and what was kept in float."""
        ctx = PassContext.current()
        lift_constants(model)
        name_nodes(model)
        candidates = quantizable_nodes(model, self.spec.op_types)
        if not candidates:
            raise UnsupportedModelError(
                f"quantize: the model has no node mode {self.config.mode} can quantize (ops "
                f"{', '.join(self.spec.op_types)} with a constant weight).")
        batches = calibration(model, ctx, self.config.samples)
        auto = AUTO in self.config.exclude
        excluded = resolve_selectors(model, [s for s in self.config.exclude if s != AUTO],
                                     candidates)
        report: dict[str, Any] = {}
        if auto:
            excluded, report = self._auto_exclude(model, ctx, candidates, excluded, batches)
        include = [n for n in candidates if n not in set(excluded)]
        if include:  # ORT reads an empty node list as "every node"
            replace_model(model, quantize_proto(to_proto(model), self.spec, include, batches))
        mark_quantized(model, include, self.config.mode)
        ctx.report[self.name] = {"mode": self.config.mode, "quantized": len(include),
                                 "excluded": list(excluded), **report}
        return PassResult(model, True)

    def _auto_exclude(self, model: ir.Model, ctx: PassContext, candidates: list[str],
                      excluded: list[str], batches: list[dict]) -> tuple[list[str], dict]:
        """Greedy: add the most sensitive remaining node until the gated loss meets the budget."""
        from winnow.passes.analysis.quant_sensitivity import GatedQuant

        result = ctx.get_analysis("quant-sensitivity", model, modes=(self.config.mode,),
                                  per_channel=self.config.per_channel,
                                  calibrate=self.config.calibrate,
                                  reduce_range=self.config.reduce_range,
                                  weight_type=self.config.weight_type)
        ranking = [n for n in result["ranking"][self.config.mode] if n in candidates]
        gated = GatedQuant(model, self.spec, candidates, batches)
        chosen = list(excluded)
        steps = [{"excluded": list(chosen), "loss": gated.loss(set(candidates) - set(chosen))}]
        for node in ranking:
            if steps[-1]["loss"] <= self.config.budget or len(chosen) >= self.config.max_excluded:
                break
            if node in chosen:
                continue
            chosen.append(node)
            steps.append({"excluded": list(chosen),
                          "loss": gated.loss(set(candidates) - set(chosen))})
        met = steps[-1]["loss"] <= self.config.budget
        return chosen, {"auto": {"budget": self.config.budget, "met": met, "steps": steps}}


def lift_constants(model: ir.Model, size_limit: int = 16) -> None:
    """Turn Constant-node tensors of at least `size_limit` elements into initializers: ORT's
    quantizers take a weight only from an initializer (a Conv weight made by a Constant node would
    be quantized as an activation)."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    LiftConstantsToInitializersPass(size_limit=size_limit)(model)


def name_nodes(model: ir.Model) -> None:
    """Give every unnamed main-graph node a unique name (ORT's quantizers select by name)."""
    used = {n.name for n in model.graph if n.name}
    for index, node in enumerate(model.graph):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _constant(value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None or value.is_initializer())


def weight_index(op_type: str) -> int:
    """Which input holds the weight: the table of a Gather (embeddings), else input 1."""
    return 0 if op_type == "Gather" else 1


def quantizable_nodes(model: ir.Model, op_types: Sequence[str]) -> list[str]:
    """Names of main-graph nodes of `op_types` whose weight is a constant (a Gather's table only
    when it is a matrix of at least 4096 entries: embeddings, not shape bookkeeping)."""
    out = []
    for n in model.graph:
        if n.op_type not in op_types or len(n.inputs) < 2:
            continue
        w = n.inputs[weight_index(n.op_type)]
        if not _constant(w) or n.name.endswith(".outliers"):  # split-outliers' float path
            continue
        if n.op_type == "Gather" and (w.shape is None or len(w.shape) != 2
                                      or not all(isinstance(d, int) for d in w.shape)
                                      or w.shape[0] * w.shape[1] < 4096):
            continue
        out.append(n.name)
    return out


def resolve_selectors(model: ir.Model, selectors: Sequence[str], candidates: list[str]) -> list[str]:
    """Quantizable node names picked by node or region names; a selector that picks none is an
    error naming some valid choices."""
    if not selectors:
        return []
    from winnow.ir.regions import find_regions

    regions = {r.name: r for r in find_regions(model).all()}
    out: list[str] = []
    for sel in selectors:
        if sel in candidates:
            picked = [sel]
        elif sel in regions:
            inside = {n.name for n in regions[sel].nodes}
            picked = [n for n in candidates if n in inside]
        else:
            picked = []
        if not picked:
            choices = ", ".join([*candidates[:6], *list(regions)[:4]])
            raise PassConfigError(f"quantize: exclude selector '{sel}' matches no quantizable node "
                                  f"or region; valid names include: {choices}.")
        out += [n for n in picked if n not in out]
    return out


def calibration(model: ir.Model, ctx: PassContext, samples: int) -> list[dict[str, np.ndarray]]:
    """Up to `samples` calibration samples from the pass context (example feeds otherwise)."""
    from winnow.passes.analysis.calibration import calibration_batches
    from winnow.passes.analysis.layer_similarity import limit_samples

    return limit_samples(calibration_batches(model, ctx), samples)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a ModelProto with every weight inline."""
    ir.external_data.load_to_model(model)
    return ir.serde.serialize_model(model)


def replace_model(model: ir.Model, proto: onnx.ModelProto) -> None:
    """Put the graph (and opsets, functions) of `proto` into `model`, keeping its metadata; its
    nodes sorted topologically (ORT's float16 converter appends the input casts after the nodes
    that read them, which ONNX forbids and onnx_ir cannot clone)."""
    new = ir.serde.deserialize_model(proto)
    new.graph.sort()
    model.graph = new.graph
    model.ir_version = new.ir_version
    model.functions.clear()
    model.functions.update(new.functions)


def mark_quantized(model: ir.Model, names: Sequence[str], mode: str) -> None:
    """Record on the graph, for the cost model, which nodes were quantized to what."""
    model.metadata_props["winnow.quantize"] = f"{mode}:{len(names)}"


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]], inputs: Sequence[str]) -> None:
        self._batches = [{k: np.asarray(b[k]) for k in inputs if k in b} for b in batches]
        self._iter = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch, None at the end."""
        return next(self._iter, None)

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._iter = iter(self._batches)


def quantize_proto(proto: onnx.ModelProto, spec: QuantSpec, include: Sequence[str],
                   batches: Sequence[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """Quantize the named nodes of `proto` with ORT's tool for `spec.mode`; returns the result."""
    clean = onnx.ModelProto()
    clean.CopyFrom(proto)
    # ORT's quantizers re-run ONNX shape inference strictly; a stale intermediate annotation from
    # the exporter (digits-vit: 64 vs 10) makes them fail, so they get the graph without any.
    contrib = contrib_output_types(clean)
    del clean.graph.value_info[:]
    clean.graph.value_info.extend(contrib)
    proto = clean
    with tempfile.TemporaryDirectory(prefix="winnow-quantize-") as tmp, quiet_libraries():
        src, out = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(proto, src)
        if spec.mode == "int8-dynamic":
            _dynamic(src, out, spec, include)
        elif spec.mode == "int8-static":
            _static(src, out, spec, include, batches, proto)
        elif spec.mode in ("int4-weight", "int8-weight"):
            return _nbits(proto, spec, include)
        elif spec.mode == "fp16":
            return _fp16(proto, include)
        else:
            raise PassConfigError(f"quantize: unknown mode '{spec.mode}'; use one of "
                                  f"{', '.join(MODES)}.")
        return onnx.load(out)


def contrib_output_types(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Element types (no shapes) of the outputs of ORT contrib ops (fused Attention,
    SkipLayerNormalization, ...): ONNX's shape inference cannot type them, and ORT's quantizers
    refuse an untyped activation."""
    produced = {o for n in proto.graph.node if n.domain == "com.microsoft" for o in n.output}
    kept = []
    for info in proto.graph.value_info:
        if info.name in produced and info.type.HasField("tensor_type"):
            kept.append(onnx.helper.make_tensor_value_info(
                info.name, info.type.tensor_type.elem_type, None))
    return kept


def _dynamic(src: Path, out: Path, spec: QuantSpec, include: Sequence[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, out, op_types_to_quantize=list(spec.op_types),
                     per_channel=spec.per_channel, reduce_range=spec.reduce_range,
                     weight_type=_weight_type(spec), nodes_to_quantize=list(include),
                     extra_options=EXTRA_OPTIONS)


def _static(src: Path, out: Path, spec: QuantSpec, include: Sequence[str],
            batches: Sequence[dict[str, np.ndarray]], proto: onnx.ModelProto) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    if spec.per_channel and _opset(proto) < 13:
        # Per-channel DequantizeLinear needs opset 13's axis attribute.
        proto = version_converter.convert_version(proto, 13)
        onnx.save(proto, src)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[spec.calibrate]
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in inits]
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(batches, inputs)
    # U8S8: on x86 uint8 activations with int8 weights run the fast kernels (S8S8 is ~2x slower).
    quantize_static(src, out, reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(spec.op_types), per_channel=spec.per_channel,
                    reduce_range=spec.reduce_range, activation_type=QuantType.QUInt8,
                    weight_type=_weight_type(spec), nodes_to_quantize=list(include),
                    calibrate_method=method, extra_options=EXTRA_OPTIONS)


def _weight_type(spec: QuantSpec):
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if spec.weight_type == "uint8" else QuantType.QInt8


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _nbits(proto: onnx.ModelProto, spec: QuantSpec, include: Sequence[str]) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = 4 if spec.mode == "int4-weight" else 8
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=spec.block_size, is_symmetric=True,
                                     accuracy_level=spec.accuracy_level or None,
                                     nodes_to_include=list(include),
                                     op_types_to_quantize=spec.op_types)
    quantizer.process()
    return quantizer.model.model


def _fp16(proto: onnx.ModelProto, include: Sequence[str]) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = [n.name for n in proto.graph.node
            if n.op_type in OP_TYPES["fp16"] and n.name not in set(include)]
    return convert_float_to_float16(proto, keep_io_types=True, node_block_list=keep,
                                    disable_shape_infer=True)
