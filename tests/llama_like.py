"""Random-weight Llama-style decoder ONNX models of a chosen size, written straight to disk.

The weights are drawn one tensor at a time and appended to one external data file (page
aligned, as ONNX Runtime maps them), so a model of any size is written within the memory of its
largest tensor; the graph is built with onnx.helper (RMSNorm, rotary q/k, causal softmax
attention, SiLU-gated MLP, untied LM head), the op mix torch's exporter gives a Llama block.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
DATA_ALIGN = 4096


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama-style decoder."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 176
    vocab: int = 256
    max_seq: int = 32

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def weight_bytes(self) -> int:
        """Bytes of the fp32 weight matrices (norms and tables are a rounding error)."""
        per_layer = 4 * self.hidden**2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return 4 * (self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden)


# TinyLlama-1.1B's widths (hidden 2048, MLP 5632, 32 heads, vocab 32000): ~206 MB per layer.
LLAMA_1B = LlamaShape(hidden=2048, layers=22, heads=32, intermediate=5632, vocab=32000,
                      max_seq=128)


def shape_for_bytes(target: float, base: LlamaShape = LLAMA_1B) -> LlamaShape:
    """`base`'s widths with the layer count whose weights come nearest `target` bytes (at least
    one layer); below one layer's size the widths shrink by halves, keeping the vocabulary."""
    shape = base
    while dataclasses.replace(shape, layers=1).weight_bytes() > target and shape.hidden > 64:
        shape = dataclasses.replace(shape, hidden=shape.hidden // 2,
                                    intermediate=shape.intermediate // 2,
                                    heads=max(1, shape.heads // 2))
    one = dataclasses.replace(shape, layers=1).weight_bytes()
    per_layer = dataclasses.replace(shape, layers=2).weight_bytes() - one
    return dataclasses.replace(shape, layers=max(1, round(1 + (target - one) / per_layer)))


class _Writer:
    """Builds the initializers, streaming every tensor above `threshold` bytes to `data_path`."""

    def __init__(self, data_path: Path, threshold: int, seed: int) -> None:
        self.data_path, self.threshold = data_path, threshold
        self.rng = np.random.default_rng(seed)
        self.initializers: list[TensorProto] = []
        self.file = open(data_path, "wb")  # noqa: SIM115 - closed by close()

    def weight(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        """A random normal fp32 tensor (std `scale`) named `name`."""
        array = self.rng.standard_normal(shape, dtype=np.float32)
        array *= np.float32(scale)
        return self.tensor(name, array)

    def tensor(self, name: str, array: np.ndarray) -> str:
        """Add `array` as initializer `name`: inline when small, else in the data file."""
        if array.nbytes < self.threshold:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        offset = -self.file.tell() % DATA_ALIGN + self.file.tell()
        self.file.seek(offset)
        self.file.write(np.ascontiguousarray(array).tobytes())
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                            dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.data_path.name), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            proto.external_data.add(key=key, value=value)
        self.initializers.append(proto)
        return name

    def close(self) -> None:
        """Close the data file."""
        self.file.close()


class _Graph:
    """Nodes of the decoder with generated, unique names."""

    def __init__(self, writer: _Writer) -> None:
        self.writer, self.nodes, self.count = writer, [], 0

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        """Append one node; returns its output name."""
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self.count}",
                                           **attrs))
        return out

    def const(self, name: str, values, dtype=np.int64) -> str:
        """A small constant initializer."""
        return self.writer.tensor(name, np.asarray(values, dtype=dtype))


def _rms_norm(g: _Graph, x: str, weight: str) -> str:
    square = g.op("Mul", [x, x])
    mean = g.op("ReduceMean", [square, "axes_last"], keepdims=1)
    root = g.op("Sqrt", [g.op("Add", [mean, "rms_eps"])])
    return g.op("Mul", [g.op("Div", [x, root]), weight])


def _rotary(g: _Graph, x: str, cos: str, sin: str) -> str:
    first = g.op("Slice", [x, "zero_1", "half_dim", "axes_last"])
    second = g.op("Slice", [x, "half_dim", "head_dim", "axes_last"])
    rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def _heads(g: _Graph, x: str) -> str:
    return g.op("Transpose", [g.op("Reshape", [x, "heads_shape"])], perm=[0, 2, 1, 3])


def _layer(g: _Graph, s: LlamaShape, i: int, x: str, cos: str, sin: str, mask: str) -> str:
    w = g.writer
    std = 0.02
    h = _rms_norm(g, x, w.tensor(f"layers.{i}.input_norm", np.ones(s.hidden, np.float32)))
    q, k, v = (g.op("MatMul", [h, w.weight(f"layers.{i}.attn.{n}_proj", (s.hidden, s.hidden),
                                           std)]) for n in "qkv")
    q, k = (_rotary(g, _heads(g, t), cos, sin) for t in (q, k))
    v = _heads(g, v)
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = g.op("Add", [g.op("Mul", [scores, "attn_scale"]), mask])
    attn = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    attn = g.op("Reshape", [g.op("Transpose", [attn], perm=[0, 2, 1, 3]), "hidden_shape"])
    x = g.op("Add", [x, g.op("MatMul", [attn, w.weight(f"layers.{i}.attn.o_proj",
                                                        (s.hidden, s.hidden), std)])])
    h = _rms_norm(g, x, w.tensor(f"layers.{i}.post_norm", np.ones(s.hidden, np.float32)))
    gate = g.op("MatMul", [h, w.weight(f"layers.{i}.mlp.gate_proj", (s.hidden, s.intermediate),
                                       std)])
    up = g.op("MatMul", [h, w.weight(f"layers.{i}.mlp.up_proj", (s.hidden, s.intermediate), std)])
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    down = g.op("MatMul", [act, w.weight(f"layers.{i}.mlp.down_proj",
                                         (s.intermediate, s.hidden), std)])
    return g.op("Add", [x, down])


def _tables(g: _Graph, s: LlamaShape) -> None:
    """Shape constants, rotary cos/sin and the causal mask (sliced to the sequence length)."""
    d = s.head_dim
    g.const("axes_last", [-1])
    g.const("zero_1", [0])
    g.const("zero_2", [0, 0])
    g.const("half_dim", [d // 2])
    g.const("head_dim", [d])
    g.const("heads_shape", [0, 0, s.heads, d])
    g.const("hidden_shape", [0, 0, s.hidden])
    g.const("rms_eps", 1e-6, np.float32)
    g.const("attn_scale", 1 / math.sqrt(d), np.float32)
    inv = 1.0 / 10000 ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(s.max_seq), inv)
    angles = np.concatenate([angles, angles], axis=-1)
    g.const("cos_table", np.cos(angles), np.float32)
    g.const("sin_table", np.sin(angles), np.float32)
    mask = np.triu(np.full((s.max_seq, s.max_seq), -1e9, np.float32), k=1)
    g.const("mask_table", mask, np.float32)


def build_llama(path: str | Path, shape: LlamaShape = LlamaShape(), *, seed: int = 0,
                external_above: int = 1024) -> Path:
    """Write a random-weight decoder to `path` (ONNX) and `path`.data (every tensor of at least
    `external_above` bytes); input `input_ids` [batch, seq] int64 (seq <= max_seq), output
    `logits` [batch, seq, vocab]. Returns `path`."""
    path = Path(path)
    writer = _Writer(path.with_name(path.name + ".data"), external_above, seed)
    g = _Graph(writer)
    try:
        _tables(g, shape)
        seq = g.op("Shape", ["input_ids"], start=1, end=2)
        cos = g.op("Slice", ["cos_table", "zero_1", seq, "zero_1"])
        sin = g.op("Slice", ["sin_table", "zero_1", seq, "zero_1"])
        mask = g.op("Slice", ["mask_table", "zero_2", g.op("Concat", [seq, seq], axis=0)])
        x = g.op("Gather", [writer.weight("embed_tokens", (shape.vocab, shape.hidden), 1.0),
                            "input_ids"])
        for i in range(shape.layers):
            x = _layer(g, shape, i, x, cos, sin, mask)
        x = _rms_norm(g, x, writer.tensor("final_norm", np.ones(shape.hidden, np.float32)))
        g.nodes.append(helper.make_node(
            "MatMul", [x, writer.weight("lm_head", (shape.hidden, shape.vocab), 0.02)],
            ["logits"], name="lm_head"))
    finally:
        writer.close()
    graph = helper.make_graph(
        g.nodes, "llama_like",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["batch", "seq", shape.vocab])],
        writer.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=9, producer_name="winnow.tests.llama_like")
    path.write_bytes(model.SerializeToString())
    return path


def llama_config(shape: LlamaShape):
    """The transformers LlamaConfig of `shape` (config in code, nothing downloaded): full
    multi-head attention, untied LM head, no KV cache, as `build_llama` builds it."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                       intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                       max_position_embeddings=shape.max_seq, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, use_cache=False)


def build_transformers_llama(path: str | Path, shape: LlamaShape = LlamaShape(), *,
                             seed: int = 0) -> Path:
    """Write transformers' LlamaForCausalLM with random weights (its own initialisation, seeded)
    exported by torch.onnx (dynamo) to `path` with every weight in `path`.data; input
    `input_ids` [batch, seq] int64, output `logits` [batch, seq, vocab]. Returns `path`.
    Holds the torch model and the exported graph's references to it: ~1-2x the weights."""
    import torch
    from transformers import LlamaForCausalLM

    class Logits(torch.nn.Module):
        """input_ids -> logits, without the cache and the output dataclass."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, use_cache=False).logits

    path = Path(path)
    torch.manual_seed(seed)
    module = Logits(LlamaForCausalLM(llama_config(shape)).eval())
    example = torch.arange(2 * 8, dtype=torch.int64).reshape(2, 8) % shape.vocab
    dims = ({0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=shape.max_seq)},)
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["input_ids"],
                                    output_names=["logits"], dynamic_shapes=dims, verbose=False)
    program.save(str(path), external_data=True)
    return path
