"""Energy: operations x pJ/op by dtype (Horowitz, ISSCC 2014) plus bytes x pJ/byte by memory level."""

from __future__ import annotations

from winnow.cost_model.op_costs import OpCost
from winnow.cost_model.targets import Target

MAC_KINDS = ("matmul", "bmm", "conv", "dwconv", "attention")
# dtype -> (multiply key, accumulate key) in a target's energy table
_MAC = {"fp32": ("fp32_mult", "fp32_add"), "fp16": ("fp16_mult", "fp16_add"),
        "int8": ("int8_mult", "int32_add"), "int4": ("int8_mult", "int32_add"),
        "fp64": ("fp32_mult", "fp32_add"), "int": ("int32_mult", "int32_add")}
_ADD = {"fp32": "fp32_add", "fp16": "fp16_add", "int8": "int8_add", "int4": "int8_add",
        "fp64": "fp32_add", "int": "int32_add"}


def compute_pj(cost: OpCost, target: Target) -> float:
    """Arithmetic energy of one node: MACs as a multiply plus an add; other FLOPs as adds."""
    e = target.energy
    if cost.kind in MAC_KINDS:
        mult, add = _MAC.get(cost.dtype, _MAC["fp32"])
        return cost.flops / 2.0 * (e[mult] + e[add])
    return cost.flops * e[_ADD.get(cost.dtype, "fp32_add")]


def memory_pj(nbytes: float, in_cache: bool, target: Target) -> float:
    """Data-movement energy of `nbytes` served from the last-level cache or from DRAM."""
    return nbytes * target.energy["cache_pj_per_byte" if in_cache else "dram_pj_per_byte"]
