"""`split-skip-norms`: keep residual adds and layer norms apart, as `Sum` and `LayerNormalization`,
because ONNX Runtime's CPU `SkipLayerNormalization` kernel is the slower form.

Measured here (ORT 1.31, 2-core EPYC, `bench/results/split-skip-norms-2026-12-03.md`): one
`SkipLayerNormalization` over [8, 64, 384] takes 417 us on two threads where `Add` +
`LayerNormalization` take 115 us; over [8, 17, 64] 40 us against 10 us. Two sources make it:
onnxscript's `ort_fusions` (`fuse`) write the contrib op, and ORT itself fuses every `Add` whose
only consumer is a `LayerNormalization` when it loads a model (its `SkipLayerNormFusion`, which
matches op type `Add` only). So, in order:

1. every `SkipLayerNormalization` whose mean / inverse-std outputs nobody reads becomes `Sum` of
   its input, skip and bias, then `LayerNormalization` (axis -1, its epsilon); its optional
   input+skip+bias output is that `Sum`;
2. every `Add` whose only consumer is a `LayerNormalization` (the pattern ORT fuses at load)
   becomes a `Sum` of the same two inputs: the same floats, and ORT leaves it unfused.

Lossless (the same additions; the norm's own rounding differs by ~1e-7) and checked like `fuse`:
the rewritten copy must match the original on calibration data within `tolerance`, else the model
is left as it was, with the reason. Needs opset 17 (`LayerNormalization`) for step 1.
"""

from __future__ import annotations

import onnx_ir as ir

from winnow.passes.base import register_pass
from winnow.passes.checked import CheckedRewrite

CONTRIB = "com.microsoft"
LAYER_NORM_OPSET = 17
DEFAULT_EPSILON = 1e-12  # SkipLayerNormalization's default (com.microsoft schema)


@register_pass
class SplitSkipNormsPass(CheckedRewrite):
    """Split SkipLayerNormalization into Sum + LayerNormalization; keep ORT from re-fusing it."""

    name = "split-skip-norms"
    description = ("Turn SkipLayerNormalization into Sum + LayerNormalization and residual Adds "
                   "feeding a LayerNormalization into Sum, so ORT's slower fused CPU kernel is "
                   "not used; kept only when outputs match.")
    unchanged_report = {"split": 0, "sums": 0}

    def precondition(self, model: ir.Model) -> str | None:
        """Nothing to do without a residual norm."""
        if not any(_is_skip_norm(n) or _is_add_into_norm(n) for n in model.graph):
            return "no residual norm"
        return None

    def rewrite(self, model: ir.Model, feeds: list) -> dict[str, int] | str:
        """Both rewrites (see the module docstring); how many sites each changed."""
        counts = split_skip_norms(model)
        return counts if any(counts.values()) else "no site could be rewritten"


def split_skip_norms(model: ir.Model) -> dict[str, int]:
    """Both rewrites in place on the main graph; how many sites each changed."""
    split = 0
    if model.opset_imports.get("", 1) >= LAYER_NORM_OPSET:
        split = sum(_split(model.graph, n) for n in list(model.graph) if _is_skip_norm(n))
    sums = sum(_add_to_sum(model.graph, n) for n in list(model.graph) if _is_add_into_norm(n))
    return {"split": split, "sums": sums}


def _is_skip_norm(node: ir.Node) -> bool:
    return node.op_type == "SkipLayerNormalization" and node.domain == CONTRIB


def _is_add_into_norm(node: ir.Node) -> bool:
    """An Add whose one output feeds exactly one node, a LayerNormalization (as its data)."""
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    out = node.outputs[0]
    uses = list(out.uses())
    return (not out.is_graph_output() and len(uses) == 1 and uses[0][1] == 0
            and uses[0][0].op_type == "LayerNormalization" and uses[0][0].domain in ("", "ai.onnx"))


def _used(value: ir.Value | None) -> bool:
    return value is not None and (bool(list(value.uses())) or value.is_graph_output())


def _split(graph: ir.Graph, node: ir.Node) -> int:
    """One SkipLayerNormalization as Sum + LayerNormalization; 0 when its mean or inverse-std
    output is read (LayerNormalization would give them over another sum)."""
    outputs = list(node.outputs) + [None] * (4 - len(node.outputs))
    if _used(outputs[1]) or _used(outputs[2]):
        return 0
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    x, skip, gamma, beta, bias = inputs[:5]
    addends = [v for v in (x, skip, bias) if v is not None]
    total = ir.Node("", "Sum", addends, name=f"{node.name}_sum")
    epsilon = node.attributes.get("epsilon")
    eps = epsilon.as_float() if epsilon is not None else DEFAULT_EPSILON
    norm_inputs = [total.outputs[0], gamma] + ([beta] if beta is not None else [])
    norm = ir.Node("", "LayerNormalization", norm_inputs, name=f"{node.name}_norm",
                   attributes=[ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", eps)])
    _take_over(total.outputs[0], outputs[3] if _used(outputs[3]) else outputs[0], "_sum")
    _take_over(norm.outputs[0], outputs[0], "")
    graph.insert_before(node, [total, norm])
    _replace(outputs[0], norm.outputs[0])
    if _used(outputs[3]):
        _replace(outputs[3], total.outputs[0])
    graph.remove(node, safe=True)
    return 1


def _add_to_sum(graph: ir.Graph, node: ir.Node) -> int:
    """One Add as a Sum of the same two inputs."""
    total = ir.Node("", "Sum", list(node.inputs), name=f"{node.name}_sum")
    _take_over(total.outputs[0], node.outputs[0], "")
    graph.insert_before(node, [total])
    _replace(node.outputs[0], total.outputs[0])
    graph.remove(node, safe=True)
    return 1


def _take_over(new: ir.Value, old: ir.Value, suffix: str) -> None:
    """Give `new` the type and shape of `old` and a name derived from it."""
    new.type, new.shape = old.type, old.shape
    new.name = f"{old.name}{suffix}" if suffix else None


def _replace(old: ir.Value, new: ir.Value) -> None:
    """Every use of `old` reads `new`; a graph output becomes `new` under the old name."""
    was_output = old.is_graph_output()
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output:
        name, old.name = old.name, None
        new.name = name
