"""Run an IR graph in PyTorch with its float weights as trainable parameters (what `distill`
trains): a small interpreter over the standard ONNX ops the zoo's graphs use before fusion and
quantization. Integer shape arithmetic runs as int64 tensors beside the float math; an op it does
not know is named when the graph is wrapped, before any work is done."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from winnow.errors import PassConfigError

Op = Callable[..., Any]
TORCH_DTYPES = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32, ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8, ir.DataType.BOOL: torch.bool, ir.DataType.INT16: torch.int16,
}


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _ints(value: torch.Tensor | None) -> list[int] | None:
    return None if value is None else [int(v) for v in value.reshape(-1).tolist()]


def _axes(node: ir.Node, inputs: Sequence[Any], index: int = 1) -> list[int] | None:
    """Axes from the attribute (old opsets) or the optional input (new ones)."""
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    axes = _attr(node, "axes")
    return None if axes is None else list(axes)


def _shape(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    dims = list(x.shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _squeeze(node: ir.Node, x: torch.Tensor, *rest: Any) -> torch.Tensor:
    axes = _axes(node, (x, *rest))
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(node: ir.Node, x: torch.Tensor, *rest: Any) -> torch.Tensor:
    axes = _axes(node, (x, *rest))
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _slice(node: ir.Node, x: torch.Tensor, starts: Any, ends: Any, axes: Any = None,
           steps: Any = None) -> torch.Tensor:
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            index[axis] = slice(max(min(start + size if start < 0 else start, size), 0),
                                max(min(end + size if end < 0 else end, size), 0), step)
        else:  # a negative step: slice the reversed axis
            start = min(start + size if start < 0 else start, size - 1)
            end = end + size if end < 0 else end
            index[axis] = slice(size - 1 - start, size - 1 - max(end, -1), -step)
            flips.append(axis)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


def _gather(node: ir.Node, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    axis = _attr(node, "axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    picked = x.index_select(axis, idx.reshape(-1))
    return picked.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


def _gather_elements(node: ir.Node, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    axis = _attr(node, "axis", 0) % x.dim()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx).long())


def _gather_nd(node: ir.Node, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    batch = _attr(node, "batch_dims", 0)
    idx = idx.long()
    depth = idx.shape[-1]
    lead = x.shape[:batch]
    flat_x = x.reshape(-1, *x.shape[batch:])
    flat_i = idx.reshape(-1, *idx.shape[batch:])
    rows = torch.arange(flat_x.shape[0]).reshape(-1, *([1] * (flat_i.dim() - 2)))
    picked = flat_x[(rows.expand(flat_i.shape[:-1]),
                     *(flat_i[..., k] for k in range(depth)))]
    return picked.reshape(*lead, *idx.shape[batch:-1], *x.shape[batch + depth:])


def _expand(node: ir.Node, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    return torch.broadcast_to(x, torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _reshape(node: ir.Node, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    dims = _ints(shape)
    if not _attr(node, "allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _transpose(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    perm = _attr(node, "perm")
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def _concat(node: ir.Node, *xs: torch.Tensor) -> torch.Tensor:
    return torch.cat(xs, dim=_attr(node, "axis"))


def _split(node: ir.Node, x: torch.Tensor, sizes: Any = None) -> tuple[torch.Tensor, ...]:
    axis = _attr(node, "axis", 0)
    if sizes is None:
        sizes = _attr(node, "split")
    if sizes is None:
        count = _attr(node, "num_outputs", len(node.outputs))
        return torch.split(x, math.ceil(x.shape[axis] / count), dim=axis)  # the last is smaller
    return torch.split(x, _ints(sizes) if isinstance(sizes, torch.Tensor) else list(sizes), axis)


def _reduce(fn: Callable[..., torch.Tensor]) -> Op:
    def reduce(node: ir.Node, x: torch.Tensor, *rest: Any) -> torch.Tensor:
        axes = _axes(node, (x, *rest))
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=[a % x.dim() for a in axes], keepdim=keep)
    return reduce


def _layer_norm(node: ir.Node, x: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    axis = _attr(node, "axis", -1) % x.dim()
    shape = tuple(x.shape[axis:])
    return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape),
                        _attr(node, "epsilon", 1e-5))


def _softmax(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=_attr(node, "axis", -1))


def _gelu(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate=_attr(node, "approximate", "none"))


def _gemm(node: ir.Node, a: torch.Tensor, b: torch.Tensor,
          c: torch.Tensor | None = None) -> torch.Tensor:
    a = a.t() if _attr(node, "transA", 0) else a
    b = b.t() if _attr(node, "transB", 0) else b
    out = _attr(node, "alpha", 1.0) * (a @ b)
    return out if c is None else out + _attr(node, "beta", 1.0) * c


def _pads(node: ir.Node, spatial: int) -> list[int]:
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise PassConfigError(f"{node.op_type} '{node.name}': auto_pad "
                              f"{_attr(node, 'auto_pad')} is not supported by the torch runner")
    pads = list(_attr(node, "pads", [0] * 2 * spatial))
    return pads


def _conv(node: ir.Node, x: torch.Tensor, w: torch.Tensor,
          b: torch.Tensor | None = None) -> torch.Tensor:
    spatial = w.dim() - 2
    pads = _pads(node, spatial)
    begin, end = pads[:spatial], pads[spatial:]
    if begin != end:
        x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end)) for p in pair])
        begin = [0] * spatial
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return fn(x, w, b, stride=list(_attr(node, "strides", [1] * spatial)), padding=begin,
              dilation=list(_attr(node, "dilations", [1] * spatial)), groups=_attr(node, "group", 1))


def _pool(kind: str) -> Op:
    def pool(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
        kernel = list(_attr(node, "kernel_shape"))
        spatial = len(kernel)
        pads = _pads(node, spatial)
        if pads[:spatial] != pads[spatial:]:
            raise PassConfigError(f"{node.op_type} '{node.name}': asymmetric pads are not "
                                  "supported by the torch runner")
        strides = list(_attr(node, "strides", [1] * spatial))
        ceil = bool(_attr(node, "ceil_mode", 0))
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return fn(x, kernel, strides, pads[:spatial], list(_attr(node, "dilations",
                                                                     [1] * spatial)), ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return fn(x, kernel, strides, pads[:spatial], ceil,
                  count_include_pad=bool(_attr(node, "count_include_pad", 0)))
    return pool


def _batch_norm(node: ir.Node, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    # The running statistics are constants, not weights to train (distill makes every float
    # initializer a parameter; F.batch_norm refuses statistics that require grad, and a trained
    # variance can turn negative).
    return F.batch_norm(x, mean.detach(), var.detach(), scale, bias, False, 0.0,
                        _attr(node, "epsilon", 1e-5))


def _clip(node: ir.Node, x: torch.Tensor, low: Any = None, high: Any = None) -> torch.Tensor:
    low = _attr(node, "min") if low is None else low
    high = _attr(node, "max") if high is None else high
    return torch.clamp(x, low, high)


def _div(node: ir.Node, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _cast(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    to = ir.DataType(_attr(node, "to"))
    if to not in TORCH_DTYPES:
        raise PassConfigError(f"Cast '{node.name}' to {to.name} is not supported by the torch "
                              "runner")
    return x.to(TORCH_DTYPES[to])


def _range(node: ir.Node, start: Any, limit: Any, delta: Any) -> torch.Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _cumsum(node: ir.Node, x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    dim, reverse = int(axis.reshape(-1)[0]), bool(_attr(node, "reverse", 0))
    ordered = x.flip(dim) if reverse else x
    out = torch.cumsum(ordered, dim=dim, dtype=x.dtype)
    if _attr(node, "exclusive", 0):
        out = out - ordered
    return out.flip(dim) if reverse else out


def _constant_of_shape(node: ir.Node, shape: torch.Tensor) -> torch.Tensor:
    value = _attr(node, "value")
    fill = _from_numpy(value.numpy()) if value is not None else torch.zeros(1)
    return fill.reshape(()).expand(_ints(shape)).clone()


def _constant(node: ir.Node) -> torch.Tensor:
    value = _attr(node, "value")
    if value is None:
        raise PassConfigError(f"Constant '{node.name}' without a tensor value is not supported "
                              "by the torch runner")
    return _from_numpy(value.numpy())


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """A copy of `array` on the current default device (the graph's, inside its forward)."""
    return torch.from_numpy(np.array(array)).to(torch.get_default_device())


def _flatten(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    axis = _attr(node, "axis", 1) % max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _elementwise(fn: Callable[..., torch.Tensor]) -> Op:
    return lambda node, *xs: fn(*xs)


OPS: dict[str, Op] = {
    "Add": _elementwise(torch.add), "Sub": _elementwise(torch.sub),
    "Mul": _elementwise(torch.mul), "Div": _div, "Pow": _elementwise(torch.pow),
    "Sqrt": _elementwise(torch.sqrt), "Reciprocal": _elementwise(torch.reciprocal),
    "Neg": _elementwise(torch.neg), "Abs": _elementwise(torch.abs), "Exp": _elementwise(torch.exp),
    "Log": _elementwise(torch.log), "Erf": _elementwise(torch.erf),
    "Tanh": _elementwise(torch.tanh), "Sigmoid": _elementwise(torch.sigmoid),
    "Relu": _elementwise(torch.relu), "Max": _elementwise(torch.maximum),
    "Min": _elementwise(torch.minimum), "Where": _elementwise(torch.where),
    "And": _elementwise(torch.logical_and), "Or": _elementwise(torch.logical_or),
    "Not": _elementwise(torch.logical_not), "Equal": _elementwise(torch.eq),
    "Greater": _elementwise(torch.gt), "GreaterOrEqual": _elementwise(torch.ge),
    "Less": _elementwise(torch.lt), "LessOrEqual": _elementwise(torch.le),
    "Identity": _elementwise(lambda x: x), "MatMul": _elementwise(torch.matmul),
    "HardSigmoid": lambda node, x: torch.clamp(_attr(node, "alpha", 0.2) * x
                                               + _attr(node, "beta", 0.5), 0, 1),
    "HardSwish": _elementwise(F.hardswish),
    "Shape": _shape, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Slice": _slice,
    "Gather": _gather, "GatherElements": _gather_elements, "GatherND": _gather_nd,
    "Expand": _expand, "Reshape": _reshape, "Transpose": _transpose, "Concat": _concat,
    "Split": _split, "Flatten": _flatten, "Cast": _cast, "Range": _range, "CumSum": _cumsum,
    "ConstantOfShape": _constant_of_shape, "Constant": _constant,
    "ReduceSum": _reduce(torch.sum), "ReduceMean": _reduce(torch.mean),
    "ReduceMax": _reduce(torch.amax), "ReduceMin": _reduce(torch.amin),
    "ReduceL2": _reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, 2, dim, keepdim)),
    "LayerNormalization": _layer_norm, "Softmax": _softmax, "Gelu": _gelu, "Gemm": _gemm,
    "Conv": _conv, "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda node, x: x.mean(dim=list(range(2, x.dim())), keepdim=True),
    "BatchNormalization": _batch_norm, "Clip": _clip,
}


def unsupported_ops(model: ir.Model) -> list[str]:
    """The op types of the main graph the torch runner cannot execute (sorted, unique)."""
    return sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph
                   if n.domain not in ("", "ai.onnx") or n.op_type not in OPS})


def trainable(value: ir.Value) -> bool:
    """Whether an initializer is a float weight worth training (not a scalar or shape)."""
    tensor = value.const_value
    if tensor is None or tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE) \
            or tensor.size <= 1:
        return False
    return bool(np.isfinite(tensor.numpy()).all())  # not an additive -inf mask


class TorchGraph(torch.nn.Module):
    """The main graph of an IR model as a torch module on `device`; float initializers (more than
    one element, not named in `frozen`) are parameters, the rest constants."""

    def __init__(self, model: ir.Model, device: str = "cpu", frozen: frozenset[str] = frozenset()
                 ) -> None:
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise PassConfigError("the torch runner cannot execute " + ", ".join(missing)
                                  + "; run distill before fuse / quantize (they add contrib ops)")
        self.graph = model.graph
        self.device = torch.device(device)
        self.names: dict[str, str] = {}
        self.weights = torch.nn.ParameterDict()
        self.constants: dict[str, torch.Tensor] = {}
        for value in model.graph.initializers.values():
            array = torch.from_numpy(np.array(value.const_value.numpy())).to(self.device)
            if trainable(value) and value.name not in frozen:
                key = f"w{len(self.names)}"
                self.names[value.name] = key
                self.weights[key] = torch.nn.Parameter(array)
            else:
                self.constants[value.name] = array

    def forward(self, feeds: Mapping[str, torch.Tensor],
                extra: Sequence[str] = ()) -> list[torch.Tensor]:
        """The graph outputs for `feeds` (input name -> tensor), in graph order, followed by the
        intermediate values named in `extra`; feeds must be on the graph's device."""
        env: dict[str, Any] = dict(self.constants)
        env.update({name: self.weights[key] for name, key in self.names.items()})
        env.update(feeds)
        with self.device:
            self._run_nodes(env)
        return [env[v.name] for v in self.graph.outputs] + [env[name] for name in extra]

    def _run_nodes(self, env: dict[str, Any]) -> None:
        for node in self.graph:
            args = [None if v is None or not v.name else env[v.name] for v in node.inputs]
            while args and args[-1] is None:
                args.pop()
            result = OPS[node.op_type](node, *args)
            outs = result if isinstance(result, (tuple, list)) else (result,)
            for value, out in zip(node.outputs, outs):
                env[value.name] = out

    def write_back(self) -> int:
        """Copy the trained parameters into the IR initializers; returns how many changed."""
        changed = 0
        for value in self.graph.initializers.values():
            key = self.names.get(value.name)
            if key is None:
                continue
            array = self.weights[key].detach().cpu().numpy()
            value.const_value = ir.tensor(array.astype(value.const_value.dtype.numpy()),
                                          name=value.name)
            changed += 1
        return changed
