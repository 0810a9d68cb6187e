"""Kernels, not ops: group priced nodes into the kernels ONNX Runtime's CPU provider runs.

In the spirit of nn-Meter's kernel detection, the fusion rules are those of ORT's graph
optimizer at ORT_ENABLE_ALL: a Conv absorbs a constant bias Add, a BatchNormalization, a
constant Mul and one activation (ConvAddFusion, ConvBNFusion, ConvMulFusion,
ConvActivationFusion); a MatMul/Gemm absorbs a constant bias Add, a scalar Mul/Div
(MatMulScaleFusion), an activation (GemmActivationFusion) and a Transpose feeding it
(MatMulTransposeFusion, FusedMatMul). Fused parts cost no launch and their intermediate tensor
never goes to memory. Chains of elementwise ops are grouped into one kernel too, but ORT's CPU
provider still runs each one: every op keeps its launch and its memory traffic. ORT's contrib
fusions (Attention, SkipLayerNormalization, BiasGelu, ...) are one node already.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from winnow.cost_model.op_costs import OpCost

ANCHORS = ("conv", "dwconv", "matmul", "bmm")
ACTIVATIONS = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish",
               "Gelu", "FastGelu", "QuickGelu", "Elu", "Softplus"}
GEMM_ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Elu", "Softplus"}
CONV_FOLLOWERS = {"Add", "Mul", "BatchNormalization", "Sum"} | ACTIVATIONS
MATMUL_FOLLOWERS = {"Add", "Mul", "Div", "BiasGelu"} | ACTIVATIONS
CHAIN_KINDS = ("elementwise", "quantize")
INTEGER = {"MatMulInteger", "ConvInteger"}  # ORT's DynamicQuantizeMatMulFusion: DQL + op + Cast + Mul


@dataclass
class Kernel:
    """One runtime kernel: the nodes it covers, its work and traffic, and its launches."""

    name: str
    kind: str
    dtype: str
    nodes: list[int] = field(default_factory=list)
    flops: float = 0.0
    weight_bytes: float = 0.0
    act_bytes: float = 0.0
    launches: int = 0
    priced: bool = True
    notes: list[str] = field(default_factory=list)
    tail: int = -1  # the node whose output leaves the kernel

    @property
    def bytes(self) -> float:
        """All bytes the kernel moves to and from memory."""
        return self.weight_bytes + self.act_bytes


def _consumers(costs: Sequence[OpCost]) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {}
    for i, c in enumerate(costs):
        for name in c.inputs:
            if name:
                users.setdefault(name, []).append(i)
    return users


def _single_consumer(c: OpCost, users: dict[str, list[int]], graph_outputs: set[str]) -> int | None:
    """The one node that reads `c`'s only output, when there is exactly one and it is internal."""
    if len(c.outputs) != 1 or c.outputs[0] in graph_outputs:
        return None
    readers = users.get(c.outputs[0], [])
    return readers[0] if len(set(readers)) == 1 else None


def _swaps_last_two(perm: Sequence[int]) -> bool:
    """Whether a permutation only swaps the last two axes (what FusedMatMul's transA/B absorb)."""
    n = len(perm)
    return n >= 2 and list(perm) == [*range(n - 2), n - 1, n - 2]


def _fused_into_consumer(c: OpCost, users: dict[str, list[int]], outputs: set[str],
                         costs: Sequence[OpCost]) -> int | None:
    """The MatMul a Transpose (FusedMatMul) or a DynamicQuantizeLinear folds into, if any."""
    if c.op_type == "Transpose" and _swaps_last_two(c.perm):
        j = _single_consumer(c, users, outputs)
        ok = j is not None and costs[j].op_type in ("MatMul", "FusedMatMul")
        return j if ok else None
    if c.op_type == "DynamicQuantizeLinear" and c.outputs and c.outputs[0] not in outputs:
        readers = set(users.get(c.outputs[0], []))
        j = readers.pop() if len(readers) == 1 else None
        return j if j is not None and costs[j].op_type in INTEGER else None
    return None


def _fusible(anchor: OpCost, follower: OpCost, absorbed: list[str]) -> bool:
    """Whether ORT folds `follower` into a kernel anchored at `anchor` (already holding `absorbed`)."""
    op = follower.op_type
    if anchor.op_type in INTEGER:
        return op in ("Cast", "Mul", "Add") and op not in absorbed
    if anchor.kind in ("conv", "dwconv"):
        if op in ACTIVATIONS:
            return not any(a in ACTIVATIONS for a in absorbed)
        return op in CONV_FOLLOWERS and not any(a in ACTIVATIONS for a in absorbed)
    if anchor.kind in ("matmul", "bmm"):
        if op in ("Mul", "Div"):  # scale by a scalar constant (MatMulScaleFusion), any rank
            return follower.weight_bytes <= 8 and not absorbed
        # MatMulAddFusion makes a Gemm of a 2-D MatMul and its bias; GemmActivationFusion
        # then takes the activation. An N-D MatMul keeps both as kernels of their own.
        gemm = anchor.op_type == "Gemm" or (anchor.op_type == "MatMul" and anchor.rank == 2)
        if op in GEMM_ACTIVATIONS:
            return gemm and not any(a in ACTIVATIONS for a in absorbed)
        return (op == "Add" and anchor.op_type == "MatMul" and gemm and follower.weight_bytes > 0
                and "Add" not in absorbed)
    return False


def _elementwise_fusion(kernel: Kernel, p: OpCost, c: OpCost, costs: Sequence[OpCost]) -> bool:
    """ORT's contrib fusions of a one-node elementwise kernel with its consumer: a bias Add and
    a Gelu (BiasGelu), a residual Add and a LayerNormalization (SkipLayerNormalization)."""
    if len(kernel.nodes) != 1 or p.op_type != "Add":
        return False
    if c.op_type in ("Gelu", "FastGelu"):
        return p.weight_bytes > 0
    return c.op_type in ("LayerNormalization", "SimplifiedLayerNormalization")


def group_kernels(costs: Sequence[OpCost], graph_outputs: Sequence[str] = ()) -> list[Kernel]:
    """Group node costs (in graph order) into runtime kernels, in execution order."""
    users = _consumers(costs)
    producers = {name: i for i, c in enumerate(costs) for name in c.outputs}
    outputs = set(graph_outputs)
    inner_users = {k: v for k, v in users.items() if k not in outputs}  # outputs stay written
    owner: dict[int, Kernel] = {}
    kernels: list[Kernel] = []
    pending_transpose: dict[int, int] = {}  # MatMul index -> producer fused into it
    for i, c in enumerate(costs):
        if c.kind == "emulated":  # a numerics format's emulation: priced on its marked node
            continue
        j = _fused_into_consumer(c, users, outputs, costs)
        if j is not None:
            pending_transpose[j] = i
            continue
        kernel = _join(c, i, costs, owner, producers, inner_users)
        if kernel is None:
            kernel = Kernel(c.name or c.op_type, c.kind, c.dtype)
            kernels.append(kernel)
            _add(kernel, c, i, launch=c.op_type != "Constant", internal=0.0)
        owner[i] = kernel
        if i in pending_transpose:
            t = pending_transpose.pop(i)
            p = costs[t]
            internal = p.act_read + p.act_write if p.op_type == "Transpose" else p.act_write
            _add(kernel, p, t, launch=False, internal=internal, tail=False)
            owner[t] = kernel
    return kernels


def _join(c: OpCost, i: int, costs: Sequence[OpCost], owner: dict[int, Kernel],
          producers: dict[str, int], users: dict[str, list[int]]) -> Kernel | None:
    """Add node `i` to its producer's kernel when ORT fuses it or it extends an elementwise chain."""
    if c.kind not in CHAIN_KINDS and c.op_type not in ("BatchNormalization", "BiasGelu", "Cast",
                                                       "LayerNormalization",
                                                       "SimplifiedLayerNormalization"):
        return None
    for name in c.inputs:
        producer = producers.get(name)
        if producer is None or producer not in owner:
            continue
        kernel = owner[producer]
        p = costs[producer]
        if kernel.tail == producer and _elementwise_fusion(kernel, p, c, costs):
            # one kernel; the sum is still written when others read it (SkipLayerNorm's output 3)
            shared = set(users.get(p.outputs[0], ())) != {i}
            _add(kernel, c, i, launch=False, internal=p.act_write * (1.0 if shared else 2.0))
            kernel.kind = c.kind
            return kernel
        if len(p.outputs) == 1 and set(users.get(p.outputs[0], ())) == {i}:
            anchor = costs[kernel.nodes[0]]
            absorbed = [costs[n].op_type for n in kernel.nodes[1:]]
            if anchor.kind in ANCHORS and kernel.tail == producer and _fusible(anchor, c, absorbed):
                _add(kernel, c, i, launch=False, internal=2.0 * (p.act_write))
                return kernel
            if kernel.kind in CHAIN_KINDS and c.kind in CHAIN_KINDS:
                _add(kernel, c, i, launch=True, internal=0.0)
                return kernel
    return None


def _add(kernel: Kernel, c: OpCost, i: int, launch: bool, internal: float,
         tail: bool = True) -> None:
    """Add a node's work and traffic; `internal` bytes never reach memory inside a fused kernel."""
    kernel.nodes.append(i)
    if tail:
        kernel.tail = i
    kernel.flops += c.flops
    kernel.weight_bytes += c.weight_bytes
    kernel.act_bytes += max(0.0, c.act_read + c.act_write - internal)
    kernel.launches += int(launch)
    if not c.priced:
        kernel.priced = False
    if c.note:
        kernel.notes.append(f"{c.name or c.op_type}: {c.note}")
