"""Energy: operations x pJ/op by dtype (Horowitz, ISSCC 2014) plus bytes x pJ/byte by memory level."""

from __future__ import annotations

import re

from winnow.cost_model.op_costs import OpCost
from winnow.cost_model.targets import Target

MAC_KINDS = ("matmul", "bmm", "conv", "dwconv", "attention")
# dtype -> (multiply key, accumulate key) in a target's energy table
_MAC = {"fp32": ("fp32_mult", "fp32_add"), "fp16": ("fp16_mult", "fp16_add"),
        "int8": ("int8_mult", "int32_add"), "int4": ("int8_mult", "int32_add"),
        "fp64": ("fp32_mult", "fp32_add"), "int": ("int32_mult", "int32_add")}
_ADD = {"fp32": "fp32_add", "fp16": "fp16_add", "int8": "int8_add", "int4": "int8_add",
        "fp64": "fp32_add", "int": "int32_add"}


def op_pj(key: str, energy: dict[str, float]) -> float:
    """pJ of one operation of the energy table; `intN_add` for any width N is interpolated
    linearly between the table's 8- and 32-bit integer adds (an adder's energy grows with its
    width)."""
    if key in energy:
        return energy[key]
    match = re.fullmatch(r"int(\d+)_add", key)
    if match is None:
        raise KeyError(f"no energy for the operation '{key}'")
    bits = int(match.group(1))
    return energy["int8_add"] + (bits - 8) * (energy["int32_add"] - energy["int8_add"]) / 24.0


def compute_pj(cost: OpCost, target: Target) -> float:
    """Arithmetic energy of one node: a format's own op counts (`cost.ops`) when it has them,
    else MACs as a multiply plus an add and other FLOPs as adds of its dtype."""
    e = target.energy
    if cost.ops:
        return sum(count * op_pj(key, e) for key, count in cost.ops.items())
    if cost.kind in MAC_KINDS:
        mult, add = _MAC.get(cost.dtype, _MAC["fp32"])
        return cost.flops / 2.0 * (e[mult] + e[add])
    return cost.flops * e[_ADD.get(cost.dtype, "fp32_add")]


def memory_pj(nbytes: float, in_cache: bool, target: Target) -> float:
    """Data-movement energy of `nbytes` served from the last-level cache or from DRAM."""
    return nbytes * target.energy["cache_pj_per_byte" if in_cache else "dram_pj_per_byte"]
