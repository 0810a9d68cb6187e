"""Helpers for testing passes: tiny model builders, `assert_equivalent`, `assert_valid`, `run_pass`.

The builders write ONNX directly (no torch): an MLP, pre-norm and post-norm transformer blocks,
a grouped-query attention layer and a residual conv block, with seeded random weights and
symbolic `batch` / `seq` dims. Weights and nodes are named like a torch export
(`blocks.0.attn.q.weight`), so messages and region names read the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassBase
from onnx_ir.tape import Tape

from winnow.public_api import guard_private_names

__all__ = ["mlp", "transformer_block", "gqa_attention", "conv_block", "random_inputs",
           "assert_equivalent", "assert_valid", "run_pass", "PassRun", "OPSET"]

OPSET = 18
IR_VERSION = 8


class _Builder:
    """A tape of nodes plus seeded weights, turned into an `ir.Model` by `model()`."""

    def __init__(self, seed: int) -> None:
        self.tape = Tape()
        self.rng = np.random.default_rng(seed)

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> ir.Value:
        """A random float32 initializer, scaled by 1/sqrt(fan-in) unless `scale` is given."""
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
        std = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        data = (self.rng.standard_normal(shape) * std).astype(np.float32)
        return self.tape.initializer(ir.tensor(data, name=name), name=name)

    def constant(self, name: str, data: Any) -> ir.Value:
        """A constant initializer (shapes, axes, scalars)."""
        array = np.asarray(data)
        return self.tape.initializer(ir.tensor(array, name=name), name=name)

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], name: str, **attributes: Any
           ) -> ir.Value:
        """Append one node named `name`; its first output is named after it."""
        out = self.tape.op(op_type, inputs, attributes or None, name=name)
        out.name = name
        return out

    def linear(self, x: ir.Value, d_in: int, d_out: int, prefix: str) -> ir.Value:
        """x @ W + b, as a torch Linear exports (MatMul then Add)."""
        w = self.weight(f"{prefix}.weight", (d_in, d_out))
        b = self.weight(f"{prefix}.bias", (d_out,), scale=0.1)
        return self.op("Add", [self.op("MatMul", [x, w], f"{prefix}/MatMul"), b], f"{prefix}/Add")

    def layer_norm(self, x: ir.Value, dim: int, prefix: str) -> ir.Value:
        """LayerNormalization over the last axis, with a random scale near 1 and bias near 0."""
        scale = self.constant(f"{prefix}.weight",
                              (1 + 0.1 * self.rng.standard_normal(dim)).astype(np.float32))
        bias = self.weight(f"{prefix}.bias", (dim,), scale=0.1)
        return self.op("LayerNormalization", [x, scale, bias], f"{prefix}/LayerNorm", axis=-1)

    def model(self, inputs: list[ir.Value], outputs: list[ir.Value], name: str) -> ir.Model:
        """The finished model (opset 18, IR version 8), with every value's type and shape."""
        from winnow.passes import get_pass_class

        graph = ir.Graph(inputs, outputs, nodes=self.tape.nodes,
                         initializers=self.tape.initializers, opset_imports={"": OPSET}, name=name)
        model = ir.Model(graph, ir_version=IR_VERSION, producer_name="winnow.testing")
        return get_pass_class("shape-inference")()(model).model


def _input(name: str, shape: list[int | str]) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))


def _output(value: ir.Value, name: str, shape: list[int | str]) -> ir.Value:
    value.name, value.shape, value.type = name, ir.Shape(shape), ir.TensorType(ir.DataType.FLOAT)
    return value


def mlp(dims: Sequence[int] = (16, 32, 8), activation: str = "Relu", seed: int = 0) -> ir.Model:
    """x[batch, dims[0]] -> Linear, `activation`, ..., Linear -> y[batch, dims[-1]]."""
    b = _Builder(seed)
    x = _input("x", ["batch", dims[0]])
    h = x
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        h = b.linear(h, d_in, d_out, f"layers.{i}")
        if i < len(dims) - 2:
            h = b.op(activation, [h], f"layers.{i}/{activation}")
    return b.model([x], [_output(h, "y", ["batch", dims[-1]])], "mlp")


def _attention(b: _Builder, x: ir.Value, dim: int, heads: int, kv_heads: int, prefix: str
               ) -> ir.Value:
    """Multi-head attention written with MatMuls; KV heads are repeated for GQA."""
    head_dim = dim // heads

    def split(t: ir.Value, n: int, name: str) -> ir.Value:
        shape = b.constant(f"{prefix}.{name}_shape", np.array([0, 0, n, head_dim], np.int64))
        t = b.op("Reshape", [t, shape], f"{prefix}/{name}/Reshape")
        return b.op("Transpose", [t], f"{prefix}/{name}/Transpose", perm=[0, 2, 1, 3])

    def repeat(t: ir.Value, name: str) -> ir.Value:
        if kv_heads == heads:
            return t
        axes = b.constant(f"{prefix}.{name}_axes", np.array([2], np.int64))
        ones = b.constant(f"{prefix}.{name}_repeat",
                          np.array([1, 1, heads // kv_heads, 1, 1], np.int64))
        merged = b.constant(f"{prefix}.{name}_merged", np.array([0, heads, -1, head_dim], np.int64))
        t = b.op("Unsqueeze", [t, axes], f"{prefix}/{name}/Unsqueeze")
        t = b.op("Expand", [t, ones], f"{prefix}/{name}/Expand")
        return b.op("Reshape", [t, merged], f"{prefix}/{name}/RepeatKV")

    q = split(b.linear(x, dim, dim, f"{prefix}.q"), heads, "q")
    k = repeat(split(b.linear(x, dim, kv_heads * head_dim, f"{prefix}.k"), kv_heads, "k"), "k")
    v = repeat(split(b.linear(x, dim, kv_heads * head_dim, f"{prefix}.v"), kv_heads, "v"), "v")
    kt = b.op("Transpose", [k], f"{prefix}/k/TransposeKeys", perm=[0, 1, 3, 2])
    scale = b.constant(f"{prefix}.scale", np.float32(1.0 / np.sqrt(head_dim)))
    scores = b.op("Mul", [b.op("MatMul", [q, kt], f"{prefix}/Scores"), scale], f"{prefix}/Scale")
    probs = b.op("Softmax", [scores], f"{prefix}/Softmax", axis=-1)
    context = b.op("Transpose", [b.op("MatMul", [probs, v], f"{prefix}/Context")],
                   f"{prefix}/ContextTranspose", perm=[0, 2, 1, 3])
    merged = b.constant(f"{prefix}.out_shape", np.array([0, 0, dim], np.int64))
    context = b.op("Reshape", [context, merged], f"{prefix}/MergeHeads")
    return b.linear(context, dim, dim, f"{prefix}.out")


def _feed_forward(b: _Builder, x: ir.Value, dim: int, prefix: str) -> ir.Value:
    return b.linear(_gelu(b, b.linear(x, dim, 4 * dim, f"{prefix}.0"), f"{prefix}/Gelu"),
                    4 * dim, dim, f"{prefix}.2")


def _gelu(b: _Builder, x: ir.Value, prefix: str) -> ir.Value:
    """0.5 x (1 + erf(x / sqrt 2)): GELU in opset 18 ops, as exporters write it."""
    root2 = b.constant(f"{prefix}.sqrt2", np.float32(np.sqrt(2.0)))
    one, half = b.constant(f"{prefix}.one", np.float32(1.0)), b.constant(f"{prefix}.half", np.float32(0.5))
    erf = b.op("Erf", [b.op("Div", [x, root2], f"{prefix}/Div")], f"{prefix}/Erf")
    gate = b.op("Mul", [b.op("Add", [erf, one], f"{prefix}/Add"), half], f"{prefix}/Half")
    return b.op("Mul", [x, gate], f"{prefix}/Mul")


def transformer_block(dim: int = 32, heads: int = 4, kv_heads: int | None = None,
                      norm: str = "pre", layers: int = 1, seed: int = 0) -> ir.Model:
    """`layers` transformer blocks on x[batch, seq, dim]: pre-norm `x + f(norm(x))` or post-norm
    (BERT) `norm(x + f(x))`, each with attention (GQA when `kv_heads` < `heads`) and a GELU MLP."""
    if norm not in ("pre", "post"):
        raise ValueError(f"norm must be 'pre' or 'post', not {norm!r}")
    if dim % heads or heads % (kv_heads or heads):
        raise ValueError("dim must be a multiple of heads, and heads of kv_heads")
    b = _Builder(seed)
    x = _input("x", ["batch", "seq", dim])
    h = x
    for i in range(layers):
        p = f"blocks.{i}"
        h = _residual(b, h, norm, f"{p}.ln1", f"{p}.attn", dim,
                      lambda t: _attention(b, t, dim, heads, kv_heads or heads, f"{p}.attn"))
        h = _residual(b, h, norm, f"{p}.ln2", f"{p}.mlp", dim,
                      lambda t: _feed_forward(b, t, dim, f"{p}.mlp"))
    return b.model([x], [_output(h, "y", ["batch", "seq", dim])], f"{norm}-norm-transformer")


def _residual(b: _Builder, h: ir.Value, norm: str, norm_name: str, name: str, dim: int,
              sublayer: Any) -> ir.Value:
    """Pre-norm h + f(norm(h)) or post-norm norm(h + f(h))."""
    if norm == "pre":
        return b.op("Add", [h, sublayer(b.layer_norm(h, dim, norm_name))], f"{name}/Residual")
    return b.layer_norm(b.op("Add", [h, sublayer(h)], f"{name}/Residual"), dim, norm_name)


def gqa_attention(dim: int = 32, heads: int = 8, kv_heads: int = 2, seed: int = 0) -> ir.Model:
    """One pre-norm grouped-query attention layer, y = x + attn(norm(x)), on x[batch, seq, dim]."""
    b = _Builder(seed)
    x = _input("x", ["batch", "seq", dim])
    attn = _attention(b, b.layer_norm(x, dim, "ln"), dim, heads, kv_heads, "attn")
    y = b.op("Add", [x, attn], "attn/Residual")
    return b.model([x], [_output(y, "y", ["batch", "seq", dim])], "gqa-attention")


def conv_block(channels: int = 8, size: int = 8, seed: int = 0) -> ir.Model:
    """A ResNet basic block on x[batch, channels, size, size]: conv-BN-ReLU-conv-BN, + x, ReLU."""
    b = _Builder(seed)
    x = _input("x", ["batch", channels, size, size])
    h = x
    for i in (1, 2):
        w = b.weight(f"conv{i}.weight", (channels, channels, 3, 3), scale=1 / np.sqrt(9 * channels))
        h = b.op("Conv", [h, w], f"conv{i}/Conv", pads=[1, 1, 1, 1])
        bn = [b.constant(f"bn{i}.weight", (1 + 0.1 * b.rng.standard_normal(channels)).astype(np.float32)),
              b.weight(f"bn{i}.bias", (channels,), scale=0.1),
              b.weight(f"bn{i}.running_mean", (channels,), scale=0.1),
              b.constant(f"bn{i}.running_var", (1 + b.rng.random(channels)).astype(np.float32))]
        h = b.op("BatchNormalization", [h, *bn], f"bn{i}/BatchNorm")
        if i == 1:
            h = b.op("Relu", [h], "relu1/Relu")
    y = b.op("Relu", [b.op("Add", [h, x], "residual/Add")], "relu2/Relu")
    return b.model([x], [_output(y, "y", ["batch", channels, size, size])], "conv-block")


def random_inputs(model: ir.Model, seed: int = 0, batch: int = 2, seq: int = 5
                  ) -> dict[str, np.ndarray]:
    """Random feeds for every input; symbolic `batch` and `seq` dims take these sizes."""
    from winnow.ir.inputs import random_feeds

    return random_feeds(model, seed, dim_values={"batch": batch, "seq": seq})


def assert_valid(model: ir.Model) -> None:
    """Fail when the model does not pass the ONNX checker, strict shape inference and the lint."""
    from winnow.errors import VerificationError
    from winnow.ir.verify import verify

    try:
        verify(model)
    except VerificationError as exc:
        raise AssertionError(str(exc)) from None


def assert_equivalent(a: Any, b: Any, feeds: Mapping | Sequence[Mapping] | None = None, *,
                      rtol: float = 1e-5, atol: float = 1e-5, samples: int = 3) -> None:
    """Fail unless `a` and `b` give the same outputs (by position) within `rtol`/`atol`.

    `a` and `b` are `ir.Model`s, artifact folders or callables taking feeds. Without `feeds`,
    `samples` random feed dicts are made from `a`'s inputs (seeds 0, 1, ...). NaN and inf must
    sit at the same places; shapes and output counts must agree.
    """
    from winnow.measure.fidelity import as_runner

    batches = _feed_batches(a, feeds, samples)
    run_a, run_b = as_runner(a), as_runner(b)
    for index, batch in enumerate(batches):
        out_a, out_b = run_a(batch), run_b(batch)
        if len(out_a) != len(out_b):
            raise AssertionError(f"{len(out_b)} outputs instead of {len(out_a)}")
        for (name, ref), got in zip(out_a.items(), out_b.values()):
            ref, got = np.asarray(ref), np.asarray(got)
            if ref.shape != got.shape:
                raise AssertionError(f"output '{name}' (feeds #{index}): shape {list(got.shape)} "
                                     f"instead of {list(ref.shape)}")
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, equal_nan=True,
                                       err_msg=f"output '{name}' differs on feeds #{index}")


def _feed_batches(model: Any, feeds: Mapping | Sequence[Mapping] | None, samples: int
                  ) -> list[Mapping]:
    if feeds is None:
        if not isinstance(model, ir.Model):
            raise TypeError("give feeds when the first model is not an ir.Model")
        return [random_inputs(model, seed) for seed in range(samples)]
    return [feeds] if isinstance(feeds, Mapping) else list(feeds)


@dataclasses.dataclass
class PassRun:
    """What `run_pass` returns: the rewritten copy, whether it changed, the report and analyses."""

    model: ir.Model
    modified: bool
    report: dict[str, Any]
    analyses: dict[str, Any]
    context: Any


def run_pass(pass_or_pipeline: str | PassBase | Sequence[Any], model: ir.Model,
             calibration: Any = None, *, options: Mapping[str, Any] | None = None,
             verify: bool = True) -> PassRun:
    """Run a pass, pipeline text or list of both on a copy of `model` in a fresh PassContext.

    `calibration` (a feed dict or a list of them) and `options` go into the context, as
    `winnow compile` would put them; with `verify`, the model is verified after every pass that
    changed it (a broken rewrite fails, naming the pass). The input model is left untouched.
    """
    from winnow.passes import PassContext, PassManager
    from winnow.passes.instruments import VerifyInstrument

    pipeline = [pass_or_pipeline] if isinstance(pass_or_pipeline, (str, PassBase)) else pass_or_pipeline
    copy = _deep_copy(model)
    ctx = PassContext(calibration=calibration, options=dict(options or {}))
    instruments = [VerifyInstrument()] if verify else []
    result = PassManager(list(pipeline), instruments).run(copy, ctx)
    return PassRun(result.model, result.modified, ctx.report, ctx.analyses, ctx)


def _deep_copy(model: ir.Model) -> ir.Model:
    """A copy that shares nothing with `model` (weights included), with winnow's metadata."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    copy.meta.update(model.meta)
    return copy


guard_private_names(__name__)
