"""winnow's CPU schedule rules for TVM: fixed tiles, vectors and threads for GEMM, elementwise and
other loop nests (dlight style, no search).

TVM's CPU pipeline schedules nothing by itself and `tvm.s_tir.dlight.cpu` has only GEMV and
Reduction rules, so every matmul, conv and elementwise kernel runs as one serial scalar loop nest.
These rules give each kind a fixed schedule instead: `Matmul` (register tiles, vectorized along
the output's last axis, the epilogue fused into the tile, threads over tiles), `Elementwise`
(vectorized, threaded) and `OuterParallel` (threads over the outer spatial loops of anything
else, e.g. convolutions).
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr
from tvm.s_tir.dlight.base import get_extent, try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width, target_has_features

__all__ = ["Matmul", "Elementwise", "OuterParallel", "VectorizableGelu", "VectorizableSoftmax",
           "ChannelsLast",
           "winnow_rules", "default_rules"]

DEFAULT_VECTOR_BITS = 128  # NEON, SSE: when LLVM reports no width for the target


def vector_bits(target: Target) -> int:
    """Width of one SIMD register of `target`. LLVM's own answer is not used on x86: it says 512
    for Zen 3, which has 256-bit AVX2 only, and tiles sized for 512 bits spill registers."""
    if "x86" in str(target.attrs.get("mtriple", "")) or not target.attrs.get("mtriple"):
        if target_has_features("avx512f", target):
            return 512
        if target_has_features("avx", target):
            return 256
    width = llvm_get_vector_width(target)
    return width if width > 0 else DEFAULT_VECTOR_BITS


def vector_lanes(target: Target, bits: int = 32) -> int:
    """Lanes of one SIMD register of `target` for elements of `bits` bits."""
    return max(vector_bits(target) // bits, 2)


def _or_next_rule(apply):
    """A rule's `apply` that yields to the next rule (returns None) where TVM refuses one of its
    schedule primitives on a kernel shape it did not foresee (alexnet's 'output block' of the
    onnx corpus), instead of failing the whole build."""

    def wrapped(self, func, target, tunable):
        try:
            return apply(self, func, target, tunable)
        except s_tir.schedule.ScheduleError:
            return None

    wrapped.__doc__ = apply.__doc__
    return wrapped


def _vectorize_innermost(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """Split the block's innermost loop into SIMD-wide chunks and vectorize them."""
    inner = sch.get_loops(block)[-1]
    extent = get_extent(sch, inner)
    if isinstance(extent, int) and extent <= 1:
        return
    if isinstance(extent, int) and extent <= lanes:
        sch.vectorize(inner)
        return
    sch.vectorize(sch.split(inner, factors=[None, lanes])[1])


def _access_vars(block: s_tir.SBlock) -> list[set[tirx.Var]]:
    """The block iter vars each buffer the block reads is indexed by."""
    iters = {iv.var for iv in block.iter_vars}
    return [set().union(*(collect_vars_used_in_prim_expr(r.min) for r in read.region)) & iters
            for read in block.reads]


def _matmul_operands(sch: s_tir.Schedule, info: SBlockInfo) -> bool:
    """True when the block is C[..., i, j] += A[..., i, ..., k...] * B[k..., j]: spatial axes then
    reduction axes, two operands, j (the last spatial axis) read by B only and i (the one before)
    by A only. Matmuls are this; so are NHWC convolutions with HWIO weights (i = x, j = f)."""
    kinds = info.dom_kind()
    spatial = len(kinds) - len(kinds.lstrip("S"))
    if spatial < 2 or spatial == len(kinds) or "S" in kinds[spatial:]:
        return False
    block = sch.get(info.block_rv)
    iters = [iv.var for iv in block.iter_vars]
    i, j, reductions = iters[spatial - 2], iters[spatial - 1], set(iters[spatial:])
    operands = [v for v in _access_vars(block) if v & reductions]
    if len(operands) != 2:
        return False
    first, second = operands
    return ((i in first and j not in first and j in second and i not in second)
            or (i in second and j not in second and j in first and i not in first))


class Matmul(CPUScheduleRule):
    """Batched GEMM with an optional elementwise epilogue: `rows` x `vectors` SIMD registers of
    accumulators per tile, the reduction split by `depth` and unrolled, threads over the tiles."""

    def __init__(self, rows: int = 4, vectors: int = 2, depth: int = 4) -> None:
        self.rows, self.vectors, self.depth = rows, vectors, depth

    @_or_next_rule
    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        """The tiled schedule, or None when `func` is not one matmul (+ epilogue)."""
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if not infos or infos[0].is_injective() or len(infos) > 2:
            return None
        if len(infos) == 2 and not infos[1].is_injective():
            return None
        if not _matmul_operands(sch, infos[0]):
            return None
        epilogue = infos[1].block_rv if len(infos) == 2 else None
        self._tile(sch, infos[0].block_rv, epilogue, vector_lanes(target))
        return sch

    def _tile(self, sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV,
              epilogue: s_tir.schedule.SBlockRV | None, lanes: int) -> None:
        loops = sch.get_loops(block)
        kinds = sch.get(block).iter_vars
        spatial = sum(1 for iv in kinds if iv.iter_type == tirx.IterVar.DataPar)
        *batch, i, j = loops[:spatial]
        *outer_k, k = loops[spatial:]
        io, ii = sch.split(i, factors=[None, self.rows])
        jo, ji = sch.split(j, factors=[None, lanes * self.vectors])
        ko, ki = sch.split(k, factors=[None, self.depth])
        # j-panels outside the row tiles: one panel of B stays in L1 while every row passes it.
        sch.reorder(*batch, jo, io, *outer_k, ko, ki, ii, ji)
        outer = sch.fuse(*batch, jo) if batch else jo
        sch.parallel(outer)
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, io, preserve_unit_loops=True)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, io, preserve_unit_loops=True)
            _vectorize_innermost(sch, epilogue, lanes)
        _vectorize_innermost(sch, accumulator, lanes)
        sch.vectorize(ji)
        sch.unroll(ii)
        sch.unroll(ki)
        sch.decompose_reduction(block, outer_k[0] if outer_k else ko)


class Elementwise(CPUScheduleRule):
    """Loop nests without reductions: inline what inlines, then per remaining block fuse the
    loops, vectorize SIMD-wide chunks and spread the rest over threads."""

    @_or_next_rule
    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        """The vectorized, threaded schedule, or None when `func` has a reduction."""
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(info.is_injective() for info in infos):
            return None
        lanes = vector_lanes(target)
        for info in try_inline_contiguous_spatial(sch, infos):
            loops = sch.get_loops(info.block_rv)
            if not loops:
                continue
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            extent = get_extent(sch, fused)
            if isinstance(extent, int) and extent < 2 * lanes:
                continue
            outer, inner = sch.split(fused, factors=[None, lanes])
            sch.vectorize(inner)
            sch.parallel(outer)
        return sch


class OuterParallel(CPUScheduleRule):
    """The fallback: threads over each block's leading spatial loops, innermost reduction
    unrolled by the compiler (convolutions, pooling and reductions the other rules leave)."""

    @_or_next_rule
    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        """A schedule with the outer spatial loops parallel, or None when nothing fits."""
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        changed = False
        for info in try_inline_contiguous_spatial(sch, infos):
            leading = len(info.dom_kind()) - len(info.dom_kind().lstrip("S"))
            loops = sch.get_loops(info.block_rv)
            if leading == 0 or len(loops) < leading:
                continue
            outer = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
            sch.parallel(outer)
            changed = True
        return sch if changed else None


def winnow_rules() -> list[CPUScheduleRule]:
    """winnow's rules in the order they are tried (first that applies wins)."""
    return [Matmul(), dlight.cpu.GEMV(), dlight.cpu.Reduction(), Elementwise(), OuterParallel()]


def default_rules() -> list[CPUScheduleRule]:
    """TVM's own CPU rules (`tvm.s_tir.dlight.cpu`): GEMV and Reduction only."""
    return [dlight.cpu.GEMV(), dlight.cpu.Reduction()]


@tvm.transform.module_pass(opt_level=0, name="ChannelsLast")
class ChannelsLast:
    """Convolutions to NHWC with HWIO weights (so `Matmul` tiles them with the output channel
    as the vector axis), or the module unchanged where TVM's ConvertLayout cannot convert it: it
    rejects some reductions' layouts (Max/Min of the onnx corpus) even in modules without a
    convolution, and an NCHW convolution still runs (threaded by `OuterParallel`)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """The converted module, or `mod` itself when the conversion fails."""
        try:
            return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
        except tvm.error.InternalError:
            return mod


def _rewrite_functions(mod: tvm.IRModule, rewriter: relax.PyExprMutator) -> tvm.IRModule:
    """`mod` with every Relax function passed through `rewriter`."""
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="VectorizableGelu")
class VectorizableGelu:
    """Rewrite `relax.nn.gelu` (erf form) as x * (1 + erf(x / sqrt 2)) / 2 with TVM's polynomial
    `fast_erf`: the libm erf call it legalizes to is scalar and dominated MiniLM's FFN kernel."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite every Relax function of `mod`."""
        return _rewrite_functions(mod, _GeluRewriter(mod))


@relax.expr_functor.mutator
class _GeluRewriter(relax.PyExprMutator):
    """The expression mutator behind VectorizableGelu."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.gelu":
            return self.builder_.call_te(_gelu, call.args[0], primfunc_name_hint="gelu")
        return call


@tvm.transform.module_pass(opt_level=0, name="VectorizableSoftmax")
class VectorizableSoftmax:
    """Rewrite `relax.nn.softmax` with TVM's polynomial `fast_exp`: the libm exp it legalizes to
    is scalar, and MiniLM's attention softmax ran at about 1 ms a layer."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite every Relax function of `mod`."""
        return _rewrite_functions(mod, _SoftmaxRewriter(mod))


@relax.expr_functor.mutator
class _SoftmaxRewriter(relax.PyExprMutator):
    """The expression mutator behind VectorizableSoftmax."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.softmax"
                and getattr(call.args[0].ty, "dtype", None) == "float32"):
            return self.builder_.call_te(_softmax, call.args[0], int(call.attrs.axis),
                                         primfunc_name_hint="softmax")
        return call


def _softmax(x: te.Tensor, axis: int) -> te.Tensor:
    """exp(x - max) / sum, the exp by the polynomial `fast_exp` (float32 only)."""
    peak = topi.max(x, axis=axis, keepdims=True)
    exp = topi.fast_exp(topi.subtract(x, peak))
    return topi.divide(exp, topi.sum(exp, axis=axis, keepdims=True))


def _gelu(x: te.Tensor) -> te.Tensor:
    """Gelu through the polynomial erf (error ~1e-7, as ORT's own)."""
    erf = topi.fast_erf(topi.multiply(x, tirx.const(0.7071067811865476, x.dtype)))
    half, one = tirx.const(0.5, x.dtype), tirx.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: x(*i) * half * (one + erf(*i)), name="gelu")
