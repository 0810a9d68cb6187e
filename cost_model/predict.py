"""Predicted latency and energy of a model on a target, per node, per kernel and in total.

Per kernel (see kernels.py), the roofline's two sides are compute = flops / peak[dtype] (peak
of the threads it runs on) and memory = bytes / bandwidth, with the bandwidth of the last-level
cache when the kernel's bytes fit in it and of DRAM otherwise; the roofline bound is their max.
A learned correction per kernel kind turns them into time (targets.Correction):

    t = launches * dispatch + overhead + min(parallel_overhead + work, threads * work)
    work = compute_scale * compute + memory_scale * memory

fitted by least squares on the relative error over the micro-benchmarks of that kind
(calibrate.py; `matmul-int8` and `conv-int8` apart from fp32); a kernel too small to pay for
waking the other threads runs on one. The shipped profiles have no correction (the plain
roofline). The model total adds one `run` overhead (a `session.run` call). All terms are >= 0,
so more work never predicts less time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from winnow.cost_model.energy import compute_pj, memory_pj
from winnow.cost_model.kernels import Kernel, group_kernels
from winnow.cost_model.op_costs import OpCost, node_costs
from winnow.cost_model.targets import Target, load_target


@dataclass
class KernelCost:
    """A kernel with its roofline bound, predicted time and energy."""

    kernel: Kernel
    compute_s: float
    memory_s: float
    roofline_s: float
    latency_s: float
    bound: str
    energy_j: float

    def to_dict(self) -> dict[str, Any]:
        """Plain figures for JSON."""
        k = self.kernel
        return {"name": k.name, "kind": k.kind, "dtype": k.dtype, "nodes": k.nodes,
                "launches": k.launches, "flops": k.flops, "weight_bytes": k.weight_bytes,
                "act_bytes": k.act_bytes, "compute_s": self.compute_s, "memory_s": self.memory_s,
                "roofline_s": self.roofline_s, "latency_s": self.latency_s, "bound": self.bound,
                "energy_j": self.energy_j, "priced": k.priced, "notes": k.notes}


@dataclass
class CostReport:
    """What `predict` returns: per node, per kernel and total latency, work, traffic and energy."""

    target: str
    nodes: list[OpCost]
    kernels: list[KernelCost]
    run_s: float
    compute_energy_j: float
    memory_energy_j: float
    assumed_dims: dict[str, int] = field(default_factory=dict)

    @property
    def latency_s(self) -> float:
        """Predicted latency of one inference (seconds)."""
        return self.run_s + sum(k.latency_s for k in self.kernels)

    @property
    def roofline_s(self) -> float:
        """The plain roofline bound summed over kernels (no overheads, no correction)."""
        return sum(k.roofline_s for k in self.kernels)

    @property
    def flops(self) -> float:
        """Total FLOPs (int ops for integer kernels)."""
        return sum(n.flops for n in self.nodes)

    @property
    def bytes(self) -> float:
        """Total bytes the kernels move."""
        return sum(k.kernel.bytes for k in self.kernels)

    @property
    def energy_j(self) -> float:
        """Arithmetic plus data-movement energy (joules)."""
        return self.compute_energy_j + self.memory_energy_j

    @property
    def unpriced(self) -> list[str]:
        """Notes of nodes priced only by their bytes (no rule, or unknown shapes)."""
        return [f"{n.name or n.op_type}: {n.note}" for n in self.nodes if not n.priced]

    def top(self, count: int = 10) -> list[KernelCost]:
        """The kernels with the largest predicted time."""
        return sorted(self.kernels, key=lambda k: -k.latency_s)[:count]

    def to_dict(self, nodes: bool = True) -> dict[str, Any]:
        """JSON-ready report (per-node rows when `nodes`)."""
        out = {"target": self.target, "latency_s": self.latency_s, "roofline_s": self.roofline_s,
               "run_s": self.run_s, "flops": self.flops, "bytes": self.bytes,
               "energy_j": self.energy_j, "compute_energy_j": self.compute_energy_j,
               "memory_energy_j": self.memory_energy_j, "kernels": [k.to_dict() for k in self.kernels],
               "unpriced": self.unpriced, "assumed_dims": self.assumed_dims}
        if nodes:
            out["nodes"] = [{k: v for k, v in asdict(n).items() if k not in ("inputs", "outputs")}
                            for n in self.nodes]
        return out

    def table(self, count: int = 10) -> str:
        """Top kernels by time, roofline bound vs predicted, and the energy split."""
        lines = [f"target    {self.target}",
                 f"latency   {self.latency_s * 1e3:.3f} ms predicted (roofline {self.roofline_s * 1e3:.3f} "
                 f"ms, {len(self.kernels)} kernels, {sum(k.kernel.launches for k in self.kernels)} "
                 "launches)",
                 f"work      {self.flops / 1e9:.3f} GFLOP, {self.bytes / 1e6:.2f} MB moved",
                 f"energy    {self.energy_j * 1e3:.4f} mJ (compute {self.compute_energy_j * 1e3:.4f}, "
                 f"memory {self.memory_energy_j * 1e3:.4f})"]
        if self.assumed_dims:
            lines.append("assumed   " + ", ".join(f"{k}={v}" for k, v in self.assumed_dims.items())
                         + " (give --shape NAME=SIZE)")
        lines.append(f"{'kernel':<36} {'kind':<11} {'dtype':<5} {'MFLOP':>9} {'MB':>8} "
                     f"{'bound':<7} {'roof us':>9} {'pred us':>9}")
        for k in self.top(count):
            lines.append(f"{k.kernel.name[:36]:<36} {k.kernel.kind:<11} {k.kernel.dtype:<5} "
                         f"{k.kernel.flops / 1e6:>9.2f} {k.kernel.bytes / 1e6:>8.3f} {k.bound:<7} "
                         f"{k.roofline_s * 1e6:>9.1f} {k.latency_s * 1e6:>9.1f}")
        for note in self.unpriced[:10]:
            lines.append(f"flagged   {note}")
        return "\n".join(lines)


def price_kernel(kernel: Kernel, nodes: Sequence[OpCost], target: Target,
                 threads: int | None = None) -> KernelCost:
    """Roofline bound, corrected latency and energy of one kernel run on `threads` threads
    (default: the profile's cores, the thread count it was calibrated with)."""
    threads = threads or target.cores
    compute_s = kernel.flops / target.peak(kernel.dtype, threads) if kernel.flops else 0.0
    in_cache = kernel.bytes <= target.llc_bytes
    memory_s = kernel.bytes / (target.cache_bps if in_cache else target.dram_bps)
    roof = max(compute_s, memory_s)
    corrected = target.correction(kernel.kind, kernel.dtype).apply(
        compute_s * 1e6, memory_s * 1e6, threads) * 1e-6
    latency = kernel.launches * target.dispatch_s + corrected
    energy = sum(compute_pj(nodes[i], target) for i in kernel.nodes)
    energy_mem = memory_pj(kernel.bytes, in_cache, target)
    return KernelCost(kernel, compute_s, memory_s, roof, latency,
                      "compute" if compute_s >= memory_s else "memory",
                      (energy + energy_mem) * 1e-12)


def predict(model: ir.Model | str | Path, target: str | Path | Target = "host",
            input_shapes: Mapping[str, int | Sequence[int]] | None = None,
            formats: bool = True, threads: int | None = None) -> CostReport:
    """Predict latency and energy of `model` on `target` for the given input shapes or dims,
    run on `threads` threads (default: the profile's cores).

    With `formats` (the default) nodes a numerics rewrite marked are priced as their format
    (BFP, L-Mul: formats.py); without, as the float graph that emulates them in ORT."""
    if not isinstance(model, ir.Model):
        from winnow.frontend import load

        model = load(str(model))
    target = load_target(target)
    nodes, assumed = node_costs(model, input_shapes, formats)
    kernels = group_kernels(nodes, [v.name for v in model.graph.outputs])
    priced = [price_kernel(k, nodes, target, threads) for k in kernels]
    compute_j = sum(compute_pj(n, target) for n in nodes) * 1e-12
    memory_j = sum(k.energy_j for k in priced) - compute_j
    return CostReport(target.name, nodes, priced, target.run_s, compute_j, max(0.0, memory_j),
                      assumed)
