"""Calibration on the real host: micro-benchmarks through ONNX Runtime, timed with benchmark.py,
fitted into a `host` target profile.

Each micro-benchmark is a small ONNX model that ORT runs as one kernel (GEMMs fp32 and int8,
convolutions, elementwise, softmax, norms, attention, data movement), timed interleaved with
an Identity model whose time is the `session.run` overhead. The fit, in order:

1. run overhead = the Identity model's median; dispatch = (chain of N tiny ops of ten
   kinds - run) / its launches;
   what each graph input/output adds (from N Identity copies) is taken off every
   micro-benchmark's copies, which have inputs and outputs of their own;
2. peak FLOP/s per dtype = the best FLOP/s among that dtype's GEMMs and convs;
   DRAM and cache bandwidth = the best bytes/s of large and of cache-sized elementwise ops;
3. per kernel kind, the correction of targets.Correction,
   t = overhead + min(parallel_overhead + work, threads x work),
   work = compute_scale x compute + memory_scale x memory (the roofline's two sides), fitted by
   non-negative least squares on the relative error (kernel time = the median minus run and
   dispatch overheads, over the copies); see `_line`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from winnow.measure.timing import available_cpus, bench_session_options, cpu_model, time_interleaved
from winnow.cost_model.kernels import group_kernels
from winnow.cost_model.op_costs import node_costs
from winnow.cost_model.targets import Target, load_target, user_dir
from winnow.errors import OutputError

OPSET = [h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]
CHAIN = 32
COPIES = 8  # copies of a kernel per micro-benchmark model
TINY_COPIES = 32
MIN_KERNEL_SHARE = 0.2  # a micro-benchmark whose kernels are less of its time is left out of the fit
_RNG = np.random.default_rng(0)


@dataclass(eq=False)  # compared by identity: comparing feeds would compare whole arrays
class Micro:
    """One micro-benchmark: a name, its model and its feeds."""

    name: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    copies: int = 1


def replicate(micro: Micro, copies: int) -> Micro:
    """`copies` independent copies of the micro-benchmark's nodes in one model, so that a kernel
    is timed as it runs inside a model (threads awake, one `session.run` shared), not alone.

    Each copy reads graph inputs of its own (fed the same arrays): copies that read the same
    values would be merged by ORT's common-subexpression elimination, which keeps only the
    nodes that write graph outputs, and the rest would be timed once for all copies."""
    if copies <= 1:
        return micro
    model = onnx.ModelProto()
    model.CopyFrom(micro.model)
    graph = model.graph
    produced = {o for n in graph.node for o in n.output if o}
    inputs = [i for i in graph.input if i.name in micro.feeds]
    originals, outputs = list(graph.node), list(graph.output)
    feeds = dict(micro.feeds)
    for i in range(1, copies):
        rename = {o: f"{o}__{i}" for o in [*produced, *(v.name for v in inputs)]}
        for value in inputs:
            extra = graph.input.add()
            extra.CopyFrom(value)
            extra.name = rename[value.name]
            feeds[extra.name] = micro.feeds[value.name]
        for j, node in enumerate(originals):
            clone = graph.node.add()
            clone.CopyFrom(node)
            clone.name = f"{node.name or node.op_type}_{j}__{i}"
            clone.input[:] = [rename.get(x, x) for x in node.input]
            clone.output[:] = [rename.get(x, x) for x in node.output]
        for out in outputs:
            extra = graph.output.add()
            extra.CopyFrom(out)
            extra.name = rename[out.name]
    return Micro(micro.name, model, feeds, copies)


def _f32(shape: tuple[int, ...]) -> np.ndarray:
    return _RNG.standard_normal(shape).astype(np.float32)


def _model(nodes: list, inputs: dict[str, tuple], outputs: list[str],
           weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "micro",
                         [h.make_tensor_value_info(n, T.FLOAT, list(s)) for n, s in inputs.items()],
                         [h.make_tensor_value_info(o, T.FLOAT, None) for o in outputs],
                         [nh.from_array(v, k) for k, v in (weights or {}).items()])
    return h.make_model(graph, opset_imports=OPSET, ir_version=9)


def _micro(name: str, nodes: list, inputs: dict[str, tuple], outputs: list[str],
           weights: dict[str, np.ndarray] | None = None) -> Micro:
    return Micro(name, _model(nodes, inputs, outputs, weights),
                 {n: _f32(s) for n, s in inputs.items()})


def gemm(m: int, k: int, n: int, act: bool = False) -> Micro:
    """MatMul [m,k]x[k,n] (+ bias + Relu when `act`)."""
    nodes = [h.make_node("MatMul", ["x", "w"], ["y" if not act else "mm"])]
    weights = {"w": _f32((k, n))}
    if act:
        weights["b"] = _f32((n,))
        nodes += [h.make_node("Add", ["mm", "b"], ["ab"]), h.make_node("Relu", ["ab"], ["y"])]
    return _micro(f"gemm-fp32-{m}x{k}x{n}{'-bias-relu' if act else ''}", nodes, {"x": (m, k)},
                  ["y"], weights)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Hide the quantizer's advice to pre-process (logged on the root logger for every model)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def gemm_int8(m: int, k: int, n: int) -> Micro:
    """The dynamic-int8 MatMul that onnxruntime.quantization.quantize_dynamic makes of a GEMM."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = gemm(m, k, n)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(fp32.model, src)
        with _quiet_root_logger():
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        model = onnx.load(dst)
    return Micro(f"gemm-int8-{m}x{k}x{n}", model, fp32.feeds)


def conv_int8(n: int, c: int, hw: int, cout: int, k: int, groups: int = 1) -> Micro:
    """The ConvInteger model that quantize_dynamic makes of a convolution."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = conv(n, c, hw, cout, k, groups=groups)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(fp32.model, src)
        with _quiet_root_logger():  # QInt8 weights: the default, as the bench's models get
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        model = onnx.load(dst)
    return Micro(f"conv-int8-{n}x{c}x{hw}x{hw}-{cout}k{k}g{groups}", model, fp32.feeds)


def batched_matmul(b: int, m: int, k: int, n: int) -> Micro:
    """Attention-style batched MatMul [b,m,k]x[b,k,n] on two activations."""
    return _micro(f"bmm-fp32-{b}x{m}x{k}x{n}", [h.make_node("MatMul", ["x", "z"], ["y"])],
                  {"x": (b, m, k), "z": (b, k, n)}, ["y"])


def conv(n: int, c: int, hw: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> Micro:
    """Conv + bias + Relu (one fused kernel in ORT)."""
    node = h.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride] * 2,
                       pads=[k // 2] * 4, group=groups)
    weights = {"w": _f32((cout, c // groups, k, k)), "b": _f32((cout,))}
    return _micro(f"conv-{n}x{c}x{hw}x{hw}-{cout}k{k}s{stride}g{groups}",
                  [node, h.make_node("Relu", ["c"], ["y"])], {"x": (n, c, hw, hw)}, ["y"], weights)


def elementwise(size: int, op: str = "Add") -> Micro:
    """One elementwise op over `size` floats (binary ops take a second activation)."""
    binary = op in ("Add", "Mul")
    inputs = {"x": (size,), "z": (size,)} if binary else {"x": (size,)}
    return _micro(f"{op.lower()}-{size}", [h.make_node(op, list(inputs), ["y"])], inputs, ["y"])


def softmax(rows: int, cols: int) -> Micro:
    """Softmax over the last axis of [rows, cols]."""
    return _micro(f"softmax-{rows}x{cols}", [h.make_node("Softmax", ["x"], ["y"], axis=-1)],
                  {"x": (rows, cols)}, ["y"])


def layernorm(rows: int, cols: int) -> Micro:
    """LayerNormalization over the last axis of [rows, cols]."""
    return _micro(f"layernorm-{rows}x{cols}",
                  [h.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)],
                  {"x": (rows, cols)}, ["y"], {"g": _f32((cols,)), "b": _f32((cols,))})


def attention(b: int, s: int, hidden: int, heads: int) -> Micro:
    """ORT's fused com.microsoft Attention (QKV projection, scores, softmax, context)."""
    node = h.make_node("Attention", ["x", "w", "bias"], ["y"], domain="com.microsoft",
                       num_heads=heads)
    return _micro(f"attention-{b}x{s}x{hidden}h{heads}", [node], {"x": (b, s, hidden)}, ["y"],
                  {"w": _f32((hidden, 3 * hidden)) * 0.05, "bias": _f32((3 * hidden,))})


def transpose(b: int, s: int, heads: int, d: int) -> Micro:
    """The [b,s,h,d] -> [b,h,s,d] transpose of attention heads."""
    return _micro(f"transpose-{b}x{s}x{heads}x{d}",
                  [h.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 1, 3])],
                  {"x": (b, s, heads, d)}, ["y"])


def slice_half(rows: int, cols: int) -> Micro:
    """Slice of the first half of the last axis (a copy, as ORT's Slice runs)."""
    half = np.array([cols // 2], np.int64)
    return Micro(f"slice-{rows}x{cols}", _model(
        [h.make_node("Slice", ["x", "s", "e", "a"], ["y"])], {"x": (rows, cols)}, ["y"],
        {"s": np.array([0], np.int64), "e": half, "a": np.array([-1], np.int64)}),
        {"x": _f32((rows, cols))})


def concat(rows: int, cols: int) -> Micro:
    """Concat of two [rows, cols] activations along the last axis."""
    return _micro(f"concat-{rows}x{cols}", [h.make_node("Concat", ["x", "z"], ["y"], axis=-1)],
                  {"x": (rows, cols), "z": (rows, cols)}, ["y"])


def reduce_mean(rows: int, cols: int) -> Micro:
    """ReduceMean over the last axis."""
    return _micro(f"reducemean-{rows}x{cols}",
                  [h.make_node("ReduceMean", ["x"], ["y"], axes=[-1], keepdims=1)],
                  {"x": (rows, cols)}, ["y"])


def identity() -> Micro:
    """A one-element Identity: its time is the `session.run` overhead."""
    return _micro("identity", [h.make_node("Identity", ["x"], ["y"])], {"x": (1,)}, ["y"])


def io_copies() -> Micro:
    """`TINY_COPIES` one-element Identities, each with an input and an output of its own: their
    time over the run overhead is what each graph input and output adds to a `session.run`,
    which the copies of a micro-benchmark pay and a kernel inside a model does not."""
    micro = replicate(identity(), TINY_COPIES)
    return Micro(f"identity-x{TINY_COPIES}", micro.model, micro.feeds, 1)


CHAIN_OPS = ("Add", "Mul", "Relu", "Sigmoid", "Transpose", "Softmax", "Tanh", "MatMul", "Abs", "Neg")


def op_chain(length: int = CHAIN) -> Micro:
    """`length` ops on a 4x4 tensor, cycling through ten kinds (elementwise, Transpose, Softmax,
    a MatMul): their time over the run overhead is the dispatch overhead of a kernel among
    others of different kinds, as in a model (a chain of one op alone runs warmer: a third of it
    here)."""
    nodes = []
    for i in range(length):
        op, src, dst = CHAIN_OPS[i % len(CHAIN_OPS)], "x" if i == 0 else f"t{i}", \
            f"t{i + 1}" if i < length - 1 else "y"
        inputs = [src, "w"] if op in ("Add", "Mul", "MatMul") else [src]
        extra = {"perm": [1, 0]} if op == "Transpose" else {"axis": -1} if op == "Softmax" else {}
        nodes.append(h.make_node(op, inputs, [dst], **extra))
    return _micro(f"op-chain-{length}", nodes, {"x": (4, 4)}, ["y"], {"w": _f32((4, 4)) * 0.5})


def suite(quick: bool, llc_bytes: float) -> list[Micro]:
    """The micro-benchmarks: a short list with `quick`, a fuller one otherwise."""
    big = int(max(4 * llc_bytes / 12, 1 << 20))  # three tensors of 4 bytes, well over the LLC
    small = int(min(llc_bytes / 48, 1 << 18))  # 3 MB of traffic: inside any LLC
    items = [identity(), op_chain(), io_copies(),
             gemm(64, 384, 384), gemm(128, 384, 1536, act=True), gemm(512, 512, 512),
             gemm(8, 1024, 1024), gemm_int8(128, 384, 1536), gemm_int8(512, 512, 512),
             batched_matmul(12, 64, 32, 64), conv(1, 32, 56, 64, 3), conv(1, 64, 28, 64, 3, groups=64),
             conv_int8(1, 32, 28, 64, 3), conv_int8(1, 64, 28, 64, 3, groups=64),
             conv_int8(32, 32, 8, 64, 3), conv_int8(8, 64, 28, 64, 3),
             gemm(1, 64, 64), elementwise(1024), layernorm(17, 64), softmax(68, 17),
             batched_matmul(1024, 17, 16, 17), conv(1, 16, 8, 16, 3), conv(1, 32, 16, 32, 3, groups=32),
             elementwise(small), elementwise(big), elementwise(small, "Sigmoid"),
             softmax(768, 64), layernorm(512, 384), attention(4, 64, 384, 12), transpose(8, 64, 12, 32)]
    if not quick:
        items += _full_extra(small, big)
    return [m if m.name.startswith(("identity", "op-chain")) else
            replicate(m, 2 if m.name.endswith(f"-{big}") or m.name.endswith(f"-{big // 4}") else
                      TINY_COPIES if _tiny(m) else COPIES)
            for m in items]


def _tiny(micro: Micro) -> bool:
    """A kernel of a few microseconds: more copies, so that their time stands well above the
    `session.run` overhead subtracted from it."""
    kernels = _kernels(micro)
    return sum(k.flops for k in kernels) < 2e6 and sum(k.bytes for k in kernels) < 256 * 1024


def _full_extra(small: int, big: int) -> list[Micro]:
    return [
        gemm(1, 384, 384), gemm(32, 256, 1024), gemm(2048, 256, 64), gemm(256, 1536, 384, act=True),
        gemm_int8(8, 1024, 1024), gemm_int8(64, 384, 384), gemm_int8(256, 1536, 384),
        conv_int8(8, 16, 16, 32, 3), conv_int8(1, 64, 14, 128, 3),
        conv_int8(1, 96, 56, 96, 3, groups=96), conv(1, 96, 56, 96, 3, groups=96),
        batched_matmul(256, 17, 17, 16), gemm(4352, 64, 64), gemm(4352, 64, 256, act=True),
        batched_matmul(48, 64, 64, 64), batched_matmul(96, 128, 32, 128),
        conv(1, 16, 112, 32, 1), conv(1, 128, 14, 256, 3, stride=2), conv(4, 3, 64, 16, 3),
        conv(1, 96, 28, 96, 3, groups=96), conv(8, 32, 16, 32, 3),
        elementwise(small // 8), elementwise(big // 4, "Relu"), elementwise(small, "Mul"),
        elementwise(big, "Erf"), softmax(3072, 128), softmax(96, 16), layernorm(64, 384),
        layernorm(4096, 256), attention(1, 128, 256, 4), attention(8, 32, 384, 12),
        transpose(1, 128, 4, 64), reduce_mean(4096, 256), reduce_mean(64, 64),
        conv_int8(1, 240, 12, 240, 5, groups=240), conv_int8(1, 480, 6, 480, 5, groups=480),
        conv_int8(1, 16, 80, 16, 3, groups=16), transpose(64, 17, 4, 16), gemm(17, 64, 64),
        conv(1, 240, 12, 240, 5, groups=240), layernorm(68, 64),
        elementwise(16384), elementwise(65536, "Mul"), elementwise(32768, "Sigmoid"),
        transpose(16, 64, 12, 32), reduce_mean(512, 256), softmax(256, 128),
        slice_half(32, 512), slice_half(512, 512), concat(32, 128), concat(256, 256),
        gemm_int8(32, 128, 512), gemm_int8(17, 64, 64)]


# ---------------------------------------------------------------- measure


def micro_runner(micro: Micro, threads: int) -> Callable[[], Any]:
    """A callable that runs the micro-benchmark once through an ORT session (timing options)."""
    import onnxruntime as ort

    session = ort.InferenceSession(micro.model.SerializeToString(), bench_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    feeds = micro.feeds
    return lambda: session.run(None, feeds)


def measure(micros: list[Micro], repeats: int, threads: int, clock: str = "wall") -> dict[str, float]:
    """Median seconds of each micro-benchmark, all timed interleaved (measure.timing); clock
    "cpu" reads process CPU time (see `clocked`)."""
    runners, samples = clocked({m.name: micro_runner(m, threads) for m in micros}, clock)
    time_interleaved(runners, repeats=repeats, warmup=2, desc="calibrating")
    return {name: float(np.median(s[-repeats:])) for name, s in samples.items()}


def clocked(runners: dict[str, Callable[[], Any]], clock: str = "wall"
            ) -> tuple[dict[str, Callable[[], Any]], dict[str, list[float]]]:
    """The runners, each noting the time of every run it makes on `clock`: "wall"
    (time.perf_counter) or "cpu" (the process CPU time).

    On a host shared with other work, wall time counts the time other processes hold the cores
    (a long run is preempted more than a short one, so the slowdown grows with run length); the
    CPU time of a one-thread session does not. With more threads it sums them."""
    read = time.process_time if clock == "cpu" else time.perf_counter
    samples: dict[str, list[float]] = {name: [] for name in runners}

    def timed(name: str, run: Callable[[], Any]) -> Callable[[], Any]:
        def go() -> Any:
            start = read()
            out = run()
            samples[name].append(read() - start)
            return out
        return go

    return {name: timed(name, run) for name, run in runners.items()}, samples


# ---------------------------------------------------------------- fit


def host_llc_bytes() -> float:
    """Size of the last-level cache from sysfs (32 MiB when it cannot be read)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1024, "M": 1 << 20}.get(text[-1:], 1)
        try:
            sizes.append(float(text.rstrip("KM")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else float(32 << 20)


def _kernels(micro: Micro):
    model = ir.serde.deserialize_model(micro.model)
    costs, _ = node_costs(model)
    return group_kernels(costs, [v.name for v in model.graph.outputs])


def _rate(micros: list[Micro], times: dict[str, float], run: float, dispatch: float,
          prefix: tuple[str, ...], what: str) -> float | None:
    best = None
    for m in micros:
        if not m.name.startswith(prefix):
            continue
        ks = _kernels(m)
        work = sum(k.flops for k in ks) if what == "flops" else sum(k.bytes for k in ks)
        t = times[m.name] - run - dispatch * sum(k.launches for k in ks)
        if t > 0:
            best = max(best or 0.0, work / t)
    return best


def fit_profile(micros: list[Micro], times: dict[str, float], threads: int,
                llc_bytes: float) -> dict[str, Any]:
    """The host profile's figures (as TOML tables) from the measured medians."""
    run = times["identity"]
    chain = next(m for m in micros if m.name == f"op-chain-{CHAIN}")
    dispatch = max((times[chain.name] - run) / sum(k.launches for k in _kernels(chain)), 1e-7)
    io = max((times.get(f"identity-x{TINY_COPIES}", run) - run) / (TINY_COPIES - 1) - dispatch,
             0.0) / 2  # per graph input or output beyond the Identity's one of each
    times = {m.name: times[m.name] - io * max(len(m.feeds) + len(m.model.graph.output) - 2, 0)
             for m in micros}
    fp32 = _rate(micros, times, run, dispatch, ("gemm-fp32", "conv-1", "conv-4", "conv-8", "bmm"),
                 "flops") or 1e9
    int8 = _rate(micros, times, run, dispatch, ("gemm-int8",), "flops") or fp32
    sized = [m for m in micros if m.name.startswith(("add-", "mul-", "relu-"))
             and not m.name.startswith("op-chain")]
    big = [m for m in sized if sum(k.bytes for k in _kernels(m)) > llc_bytes]
    small = [m for m in sized if m not in big]
    dram = _rate(big, times, run, dispatch, ("",), "bytes") or 1e10
    cache = max(_rate(small, times, run, dispatch, ("",), "bytes") or dram, dram)
    data = {
        "name": "host",
        "description": f"this machine ({cpu_model()}, {threads} threads), fitted by winnow cost calibrate",
        "sources": ["micro-benchmarks through ONNX Runtime on this host (winnow cost calibrate)",
                    "energy: M. Horowitz, ISSCC 2014 (45 nm), as in the shipped profiles",
                    "fp16: not measured (ORT's CPU provider has few fp16 kernels): the fp32 rate"],
        "compute": {"cores": threads, "fp32_gflops_per_core": fp32 / threads / 1e9,
                    "fp16_gflops_per_core": fp32 / threads / 1e9,
                    "int8_gops_per_core": int8 / threads / 1e9},
        "memory": {"dram_gbps": dram / 1e9, "cache_gbps": cache / 1e9,
                   "llc_kib": llc_bytes / 1024},
        "overhead": {"dispatch_us": dispatch * 1e6, "run_us": run * 1e6,
                     "io_us_per_tensor": io * 1e6},  # taken off the micro-benchmarks, not priced
        "energy": dict(load_target("x86-avx2").energy),
    }
    from winnow.cost_model.targets import parse_target

    plain = parse_target(data, Path("host.toml"))
    data["correction"] = fit_corrections(micros, times, plain)
    return data


def _points(micros: list[Micro], times: dict[str, float], target: Target) -> dict[str, list]:
    """Per kernel kind, (compute_us, memory_us, measured_us) of each micro-benchmark's copy."""
    from winnow.cost_model.predict import price_kernel

    points: dict[str, list] = {}
    for m in micros:
        if m.name.startswith(("identity", "op-chain")):
            continue
        model = ir.serde.deserialize_model(m.model)
        costs, _ = node_costs(model)
        ks = group_kernels(costs, [v.name for v in model.graph.outputs])
        priced = [price_kernel(k, costs, target) for k in ks]
        launches = sum(k.launches for k in ks)
        t = times[m.name] - target.run_s - launches * target.dispatch_s
        if t < MIN_KERNEL_SHARE * times[m.name]:  # mostly overheads: its kernel time is noise
            continue
        t /= m.copies
        compute = sum(p.compute_s for p in priced) / m.copies
        memory = sum(p.memory_s for p in priced) / m.copies
        main = max(priced, key=lambda p: p.roofline_s).kernel
        kind = main.kind if main.dtype in ("fp32", "int") else f"{main.kind}-{main.dtype}"
        if compute + memory > 0:
            points.setdefault(kind, []).append((compute * 1e6, memory * 1e6, t * 1e6))
    return points


def _nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin |x b - y| with b >= 0, by trying every subset of columns (three at most)."""
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y ** 2))
    for size in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), size):
            b, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if np.any(b < 0):
                continue
            full = np.zeros(x.shape[1])
            full[list(cols)] = b
            err = float(np.sum((x @ full - y) ** 2))
            if err < best_err - 1e-12:
                best, best_err = full, err
    return best


def _line(pts: list[tuple[float, float, float]], threads: int = 1) -> dict[str, float]:
    """The correction (targets.Correction) of one kernel kind, all terms >= 0:

        t = overhead + min(parallel_overhead + work, threads x work)
        work = compute_scale x compute + memory_scale x memory

    by least squares on the relative error. Which points run serial (on one thread) is part of
    the fit: each split of the points, smallest first, into serial and parallel ones is fitted
    and the best kept. Four terms need five points; with fewer, both sides share one scale
    (three or four points), the parallel overhead goes (two), then the overhead (one); at one
    thread there is no parallel overhead. A side no point exercises (no FLOPs in a data-movement
    kind) takes the other side's scale."""
    c = np.array([p[0] for p in pts])
    m = np.array([p[1] for p in pts])
    t = np.array([p[2] for p in pts])
    n = len(pts)
    parallel = n >= 3 and threads > 1  # whether the parallel overhead is fitted
    order = np.argsort(c + m)
    best: tuple[float, np.ndarray] = (math.inf, np.array([0.0, 0.0, 1.0, 1.0]))
    for count in range(n if parallel else 1):
        serial = np.zeros(n, bool)
        serial[order[:count]] = True
        k = np.where(serial, float(max(threads, 1)), 1.0)
        columns = ([np.ones(n)] if n >= 2 else []) + ([np.where(serial, 0.0, 1.0)] if parallel else [])
        columns += [k * c, k * m] if n >= 5 else [k * (c + m)]
        b = _nonnegative_fit(np.stack(columns, axis=1) / t[:, None], np.ones(n))
        b = np.concatenate([[0.0] * (n < 2), b[:1] if not parallel and n >= 2 else [],
                            [0.0] * (not parallel), b[int(not parallel and n >= 2):],
                            b[-1:] if n < 5 else []])
        err = float(np.sum((_predicted(b, c, m, threads) / t - 1.0) ** 2))
        if err < best[0] - 1e-12:
            best = (err, b)
    overhead, parallel_overhead, compute_scale, memory_scale = (float(v) for v in best[1])
    if not np.any(c > 0):
        compute_scale = memory_scale
    if not np.any(m > 0):
        memory_scale = compute_scale
    pred = np.maximum(_predicted(best[1], c, m, threads), 1e-9)
    return {"overhead_us": round(overhead, 4), "parallel_overhead_us": round(parallel_overhead, 4),
            "compute_scale": round(compute_scale, 6), "memory_scale": round(memory_scale, 6),
            "points": n, "rms_log_error": round(float(np.sqrt(np.mean(np.log(pred / t) ** 2))), 4)}


def _predicted(b: np.ndarray, c: np.ndarray, m: np.ndarray, threads: int) -> np.ndarray:
    work = b[2] * c + b[3] * m
    return b[0] + np.minimum(b[1] + work, max(threads, 1) * work)


def fit_corrections(micros: list[Micro], times: dict[str, float],
                    target: Target) -> dict[str, dict[str, float]]:
    """Per kernel kind (and `default` over all), the fitted overhead and scales."""
    points = _points(micros, times, target)
    out = {}
    for kind, pts in sorted(points.items()):
        out[kind] = _line(pts, target.cores)
    everything = [p for pts in points.values() for p in pts]
    if everything:
        out["default"] = _line(everything, target.cores)
    return out


# ---------------------------------------------------------------- write


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(round(v, 6))
    if isinstance(v, list):
        return "[\n" + "".join(f"  {_toml_value(x)},\n" for x in v) + "]"
    return str(v)


def to_toml(data: dict[str, Any]) -> str:
    """TOML text of a profile (flat keys, tables, and `correction.KIND` tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if not isinstance(table, dict):
            continue
        if key == "correction":
            for kind, values in table.items():
                lines += ["", f"[correction.{kind}]"]
                lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            continue
        lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def calibrate(quick: bool = False, out: str | Path | None = None, repeats: int | None = None,
              threads: int | None = None, clock: str = "wall") -> tuple[Path, dict[str, Any],
                                                                      dict[str, float]]:
    """Run the micro-benchmarks, fit the host profile and write it; returns (path, profile, times)."""
    threads = threads or available_cpus()
    llc = host_llc_bytes()
    micros = suite(quick, llc)
    times = measure(micros, repeats or (7 if quick else 21), threads, clock)
    data = fit_profile(micros, times, threads, llc)
    return write_profile(data, out), data, times


def write_profile(data: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write a fitted profile as TOML at `out` (default: the user folder's host.toml)."""
    path = Path(out) if out else user_dir() / "host.toml"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".toml.tmp")
        tmp.write_text(to_toml(data))
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write the host profile '{path}': {exc.strerror or exc}.") from None
    return path


def summary(path: Path, data: dict[str, Any], times: dict[str, float]) -> str:
    """A printed table: each micro-benchmark's median, then the fitted figures."""
    lines = [f"{'micro-benchmark':<38} {'median us':>10}"]
    lines += [f"{name:<38} {t * 1e6:>10.1f}" for name, t in times.items()]
    c, m, o = data["compute"], data["memory"], data["overhead"]
    lines += ["", f"peak      fp32 {c['fp32_gflops_per_core']:.1f} GFLOP/s, int8 "
                  f"{c['int8_gops_per_core']:.1f} GOP/s per core x {c['cores']} threads",
              f"memory    DRAM {m['dram_gbps']:.1f} GB/s, cache {m['cache_gbps']:.1f} GB/s, "
              f"LLC {m['llc_kib'] / 1024:.0f} MiB",
              f"overhead  run {o['run_us']:.1f} us, dispatch {o['dispatch_us']:.2f} us per kernel"]
    for kind, fit in data.get("correction", {}).items():
        lines.append(f"correct   {kind:<12} overhead {fit['overhead_us']:7.1f} + "
                     f"{fit.get('parallel_overhead_us', 0.0):6.1f} us  x compute "
                     f"{fit['compute_scale']:7.3f}  x memory {fit['memory_scale']:7.3f}  "
                     f"({fit['points']} points, rms log error {fit['rms_log_error']:.3f})")
    lines.append(f"wrote     {path}")
    return "\n".join(lines)
