"""Give fused Attention nodes the raw padding mask instead of an additive bias.

onnxscript's ORT fusions turn an exported attention into `com.microsoft.Attention` with the
exporter's additive bias (`attention_bias`, input 5: 0 where a key is visible, a very negative
number where it is padding), built from the model's `attention_mask` input by a dozen shape ops.
ONNX Runtime's quantizers only make `QAttention` (int8 Q/K/V projection in one kernel) from an
Attention that takes the raw mask as `mask_index` (input 3), and with equal Q/K/V sizes given
without `qkv_hidden_sizes`. This module finds, per node, whether the bias is exactly that padding
mask (proved numerically on calibration feeds and on masks with padding at random places, left and
right) and then passes the mask itself; a bias that is anything else (causal, relative position,
ALiBi) is left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from winnow.ir.execute import run

CONTRIB = "com.microsoft"
MASK_INPUT, BIAS_INPUT = 3, 5
MASKED_AT_MOST = -1e4  # a masked position's bias; ORT's mask_index uses mask_filter_value -10000
SYNTHETIC_SEED = 0


def attention_nodes(model: ir.Model) -> list[ir.Node]:
    """The fused ORT Attention nodes of the main graph."""
    return [n for n in model.graph if n.op_type == "Attention" and n.domain == CONTRIB]


def drop_equal_qkv_sizes(node: ir.Node) -> bool:
    """Remove `qkv_hidden_sizes` when Q, K and V have one size (it then says nothing, and ORT's
    quantizer skips any Attention that has it); True when removed."""
    sizes = node.attributes.get("qkv_hidden_sizes")
    if sizes is None or len(set(sizes.as_ints())) != 1:
        return False
    del node.attributes["qkv_hidden_sizes"]
    return True


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _graph_inputs_behind(value: ir.Value, model: ir.Model) -> set[ir.Value]:
    """The graph inputs that `value` is computed from (walking producers, not into subgraphs)."""
    inputs = set(model.graph.inputs)
    seen, found, stack = set(), set(), [value]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in inputs:
            found.add(v)
        producer = v.producer()
        if producer is not None:
            stack.extend(i for i in producer.inputs if i is not None)
    return found


def mask_candidate(node: ir.Node, model: ir.Model) -> ir.Value | None:
    """The one integer rank-2 graph input the node's attention bias is computed from, if any."""
    bias = _input(node, BIAS_INPUT)
    if bias is None or _input(node, MASK_INPUT) is not None:
        return None
    sources = _graph_inputs_behind(bias, model)
    if len(sources) != 1:
        return None
    (mask,) = sources
    dtype, shape = mask.dtype, mask.shape
    if dtype is None or not dtype.is_integer() or shape is None or len(shape) != 2:
        return None
    return mask


def synthetic_masks(mask: np.ndarray, seed: int = SYNTHETIC_SEED) -> list[np.ndarray]:
    """The calibration mask, plus the same shape padded on the right, on the left, and at random
    places (never a row with nothing visible)."""
    rng = np.random.default_rng(seed)
    rows, length = mask.shape
    right, left = np.ones_like(mask), np.ones_like(mask)
    for r in range(rows):
        keep = int(rng.integers(1, length + 1))
        right[r, keep:] = 0
        left[r, :length - keep] = 0
    scattered = (rng.random(mask.shape) < 0.7).astype(mask.dtype)
    scattered[:, 0] = 1
    return [mask, right, left, scattered]


def bias_is_padding_mask(bias: np.ndarray, mask: np.ndarray) -> bool:
    """True when the additive bias is 0 exactly where the mask keeps a key and very negative
    exactly where it masks one, for every head and query (no causal or positional term)."""
    if bias.ndim != 4 or bias.shape[-1] != mask.shape[1]:
        return False
    try:
        shape = np.broadcast_shapes(bias.shape, (mask.shape[0], 1, 1, mask.shape[1]))
    except ValueError:
        return False
    keep = np.broadcast_to((mask != 0)[:, None, None, :], shape)
    values = np.broadcast_to(bias, shape)
    return bool(np.all(values[keep] == 0) and np.all(values[~keep] <= MASKED_AT_MOST))


def proven_padding_masks(model: ir.Model, candidates: Mapping[ir.Node, ir.Value],
                         batches: Sequence[Mapping[str, np.ndarray]]) -> set[ir.Node]:
    """The candidate nodes whose bias equals the padding mask of their mask input on every
    calibration batch and on synthetic masks of the same shapes (one run per mask pattern for
    all nodes; a node whose mask no batch feeds is never proven)."""
    proven = set(candidates)
    tried: set[ir.Node] = set()
    for mask in {m.name: m for m in candidates.values()}.values():
        nodes = [n for n, m in candidates.items() if m is mask]
        biases = sorted({_input(n, BIAS_INPUT).name for n in nodes})
        for feeds in batches:
            if mask.name not in feeds:
                continue
            for pattern in synthetic_masks(np.asarray(feeds[mask.name])):
                values = run(model, {**feeds, mask.name: pattern}, capture=biases)
                for n in nodes:
                    tried.add(n)
                    if not bias_is_padding_mask(np.asarray(values[_input(n, BIAS_INPUT).name]),
                                                pattern):
                        proven.discard(n)
    return proven & tried


def _int32_mask(model: ir.Model, mask: ir.Value, cache: dict[str, ir.Value]) -> ir.Value:
    """The mask as int32 (ORT's mask_index type), made once per graph input."""
    if mask.dtype == ir.DataType.INT32:
        return mask
    if mask.name not in cache:
        cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT32},
                       name=f"{mask.name}_as_mask_index")
        cast.outputs[0].name = f"{mask.name}_mask_index"
        cast.outputs[0].dtype = ir.DataType.INT32
        cast.outputs[0].shape = mask.shape
        model.graph.insert_before(model.graph.node(0), cast)
        cache[mask.name] = cast.outputs[0]
    return cache[mask.name]


def index_attention_masks(model: ir.Model,
                          batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, int]:
    """Rewrite, in place, each fused Attention whose bias is proven to be a padding mask to take
    the mask as `mask_index`, and drop equal `qkv_hidden_sizes`; returns the counts."""
    counts = {"mask_index": 0, "qkv_hidden_sizes_dropped": 0}
    candidates = {}
    for node in attention_nodes(model):
        counts["qkv_hidden_sizes_dropped"] += drop_equal_qkv_sizes(node)
        mask = mask_candidate(node, model)
        if mask is not None:
            candidates[node] = mask
    cache: dict[str, ir.Value] = {}
    proven = proven_padding_masks(model, candidates, batches)
    for node in (n for n in candidates if n in proven):
        node.replace_input_with(MASK_INPUT, _int32_mask(model, candidates[node], cache))
        node.replace_input_with(BIAS_INPUT, None)
        while node.inputs and node.inputs[-1] is None:
            node.resize_inputs(len(node.inputs) - 1)
        counts["mask_index"] += 1
    return {k: v for k, v in counts.items() if v}
