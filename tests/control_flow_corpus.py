"""Models with control flow (If, Loop, Scan) for the round-trip tests: the onnx package's own
node cases, hand-built Scan / If / Loop models that stress subgraph rewrites, and models
exported from torch (torch.cond, while_loop, scan, LSTM, GRU, a decoder step with state
inputs) kept as files under tests/data/control_flow.

Regenerate the torch files with `python -m tests.control_flow_corpus` (needs torch).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TORCH_DIR = Path(__file__).parent / "data" / "control_flow"
NODE_PREFIXES = ("test_if", "test_loop", "test_scan")


@dataclasses.dataclass(frozen=True)
class FlowCase:
    """One model with control flow, the inputs to run it on, and its expected outputs if known."""

    source: str
    name: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    expected: list | None = None  # shipped outputs, or computed in numpy

    @property
    def id(self) -> str:
        """source/name, the test id."""
        return f"{self.source}/{self.name}"


def onnx_node_cases() -> list[FlowCase]:
    """The If / Loop / Scan node test cases the onnx package generates (with their outputs)."""
    import onnx.backend.test.case.node as node_cases

    for module in ("if_", "loop", "scan"):
        importlib.import_module(f"onnx.backend.test.case.node.{module}")
    cases, seen = [], set()
    for case in node_cases._NodeTestCases:
        if not case.name.startswith(NODE_PREFIXES) or case.name in seen:
            continue
        seen.add(case.name)
        inputs, outputs = case.data_sets[0]
        names = [i.name for i in case.model.graph.input]
        feeds = {n: _as_array(v) for n, v in zip(names, inputs)}
        cases.append(FlowCase("onnx-node", case.name, case.model, feeds, list(outputs)))
    return cases


def _as_array(value):
    if isinstance(value, list):
        return [np.asarray(v) for v in value]
    return None if value is None else np.asarray(value)


def _f(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    ir_version = {8: 3, 9: 4, 11: 6, 13: 7, 17: 8}[opset]
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


def scan_model(opset: int, states: int) -> onnx.ModelProto:
    """A Scan whose body updates `states` loop states (running sum, running max) and emits each
    state again as a scan output through an Identity: the pattern that broke canonicalize."""
    batch = [1] if opset == 8 else []
    ops = ["Add", "Max"][:states]
    body_nodes, body_in, body_out, scan_out = [], [], [], []
    for k, op in enumerate(ops):
        body_nodes.append(helper.make_node(op, [f"s{k}_in", "x_t"], [f"s{k}_out"]))
        body_nodes.append(helper.make_node("Identity", [f"s{k}_out"], [f"y{k}_t"]))
        body_in.append(_f(f"s{k}_in", [3]))
        body_out.append(_f(f"s{k}_out", [3]))
        scan_out.append(_f(f"y{k}_t", [3]))
    body = helper.make_graph(body_nodes, "body", body_in + [_f("x_t", [3])], body_out + scan_out)
    inputs = ([""] if opset == 8 else []) + [f"init{k}" for k in range(states)] + ["xs"]
    node = helper.make_node("Scan", inputs, [f"final{k}" for k in range(states)]
                            + [f"ys{k}" for k in range(states)], body=body, num_scan_inputs=1)
    graph = helper.make_graph(
        [node], f"scan{opset}_{states}",
        [_f(f"init{k}", batch + [3]) for k in range(states)] + [_f("xs", batch + [4, 3])],
        [_f(f"final{k}", batch + [3]) for k in range(states)]
        + [_f(f"ys{k}", batch + [4, 3]) for k in range(states)])
    return _model(graph, opset)


def _scan_feeds(opset: int, states: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = (1,) if opset == 8 else ()
    feeds = {f"init{k}": rng.standard_normal(batch + (3,)).astype(np.float32)
             for k in range(states)}
    feeds["xs"] = rng.standard_normal(batch + (4, 3)).astype(np.float32)
    return feeds


def if_shared_identity_model() -> onnx.ModelProto:
    """Both If branches pass the same outer value through an Identity, and the outer value is
    a graph output too (the speech-model pattern: 'already an output of a different graph')."""
    then_g = helper.make_graph([helper.make_node("Identity", ["h"], ["t_out"])], "then", [],
                               [_f("t_out", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["e_out"])], "else", [],
                               [_f("e_out", [2, 3])])
    neg_g = helper.make_graph([helper.make_node("Neg", ["h"], ["n_out"])], "neg", [],
                              [_f("n_out", [2, 3])])
    keep_g = helper.make_graph([helper.make_node("Identity", ["x"], ["k_out"])], "keep", [],
                               [_f("k_out", [2, 3])])
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("If", ["c"], ["a"], then_branch=then_g, else_branch=else_g),
        helper.make_node("If", ["c"], ["b"], then_branch=neg_g, else_branch=keep_g),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "if_shared",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                               _f("x", [2, 3])], [_f("y", [2, 3]), _f("h", [2, 3])])
    return _model(graph, 13)


def loop_model() -> onnx.ModelProto:
    """A Loop whose body has a pass-through condition, constants to fold, common subexpressions,
    dead code, an outer-scope weight, and a scan output that is an Identity of the state."""
    c = numpy_helper.from_array(np.float32(0.5), "half")
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2.0))),
        helper.make_node("Mul", ["two", "two"], ["four"]),
        helper.make_node("Mul", ["v_in", "w"], ["m1"]),
        helper.make_node("Mul", ["v_in", "w"], ["m2"]),
        helper.make_node("Add", ["m1", "m2"], ["s"]),
        helper.make_node("Div", ["s", "four"], ["v_out"]),
        helper.make_node("Identity", ["v_out"], ["scan_t"]),
        helper.make_node("Neg", ["v_in"], ["dead"]),
    ]
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _f("v_in", [3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _f("v_out", [3]),
         _f("scan_t", [3])])
    nodes = [
        helper.make_node("Mul", ["x", "half"], ["w"]),
        helper.make_node("Loop", ["n", "", "x"], ["v_final", "v_all"], body=body),
    ]
    graph = helper.make_graph(
        nodes, "loop", [helper.make_tensor_value_info("n", TensorProto.INT64, []), _f("x", [3])],
        [_f("v_final", [3]), _f("v_all", [None, 3])], initializer=[c])
    return _model(graph, 13)


def nested_model() -> onnx.ModelProto:
    """An If inside a Loop body whose branches read body values and outer values."""
    then_g = helper.make_graph([helper.make_node("Identity", ["v_in"], ["t"])], "then", [],
                               [_f("t", [3])])
    else_g = helper.make_graph([helper.make_node("Add", ["v_in", "x"], ["e"])], "else", [],
                               [_f("e", [3])])
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["v_in"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "i_f"], ["big"]),
        helper.make_node("If", ["big"], ["picked"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Identity", ["picked"], ["v_out"]),
    ]
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _f("v_in", [3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _f("v_out", [3])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["v"], body=body)], "nested",
        [helper.make_tensor_value_info("n", TensorProto.INT64, []), _f("x", [3])],
        [_f("v", [3])])
    return _model(graph, 13)


def _scan_expected(feeds: dict[str, np.ndarray], states: int) -> list[np.ndarray]:
    """Running sum (state 0) and running max (state 1) over the scan axis, in numpy."""
    xs = feeds["xs"]
    axis = xs.ndim - 2
    finals, emitted = [], []
    for k, op in enumerate([np.add, np.maximum][:states]):
        state, steps = feeds[f"init{k}"], []
        for t in range(xs.shape[axis]):
            state = op(state, np.take(xs, t, axis=axis))
            steps.append(state)
        finals.append(state)
        emitted.append(np.stack(steps, axis=axis))
    return finals + emitted


def _loop_expected(n: int, x: np.ndarray) -> list[np.ndarray]:
    w, v, steps = x * np.float32(0.5), x, []
    for _ in range(n):
        v = (v * w + v * w) / np.float32(4.0)
        steps.append(v)
    return [v, np.stack(steps)]


def _nested_expected(n: int, x: np.ndarray) -> list[np.ndarray]:
    v = x
    for i in range(n):
        v = v if v.sum() > i else v + x
    return [v]


def hand_built_cases() -> list[FlowCase]:
    """Scan at opset 8 and 9 with one and two states, shared-Identity If, Loop, nested; each
    with its outputs computed in numpy."""
    cases = []
    for opset in (8, 9):
        for states in (1, 2):
            feeds = _scan_feeds(opset, states, seed=opset * 10 + states)
            cases.append(FlowCase("hand-built", f"scan{opset}_{states}_state",
                                  scan_model(opset, states), feeds, _scan_expected(feeds, states)))
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    h = np.maximum(x, 0)
    for flag in (True, False):
        cases.append(FlowCase("hand-built", f"if_shared_identity_{str(flag).lower()}",
                              if_shared_identity_model(), {"c": np.array(flag), "x": x},
                              [h + (-h if flag else x), h]))
    v = np.array([1.0, -2.0, 0.5], np.float32)
    cases.append(FlowCase("hand-built", "loop_body_rewrites", loop_model(),
                          {"n": np.array(3, np.int64), "x": v}, _loop_expected(3, v)))
    cases.append(FlowCase("hand-built", "if_in_loop", nested_model(),
                          {"n": np.array(4, np.int64), "x": v}, _nested_expected(4, v)))
    return cases


def torch_cases() -> list[FlowCase]:
    """The models exported from torch (files under tests/data/control_flow)."""
    cases = []
    for path in sorted(TORCH_DIR.glob("*.onnx")):
        with np.load(path.with_suffix(".npz")) as data:
            feeds = {k: data[k] for k in data.files}
        cases.append(FlowCase("torch", path.stem, onnx.load(str(path)), feeds))
    return cases


def collect() -> list[FlowCase]:
    """Every control-flow case."""
    return onnx_node_cases() + hand_built_cases() + torch_cases()


def _torch_models():
    import torch
    from torch._higher_order_ops.scan import scan
    from torch._higher_order_ops.while_loop import while_loop

    class Cond(torch.nn.Module):
        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda v: v.sin() + 1, lambda v: v.cos() * 2, (x,))

    class WhileLoop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            def body(i, v):
                return i + 1, torch.tanh(self.lin(v))
            return while_loop(lambda i, v: i < 3, body, (torch.zeros((), dtype=torch.int64), x))[1]

    class CumScan(torch.nn.Module):
        def forward(self, x):
            def combine(carry, xs):
                nxt = carry * 0.5 + xs
                return nxt, nxt.clone()
            return scan(combine, torch.zeros(x.shape[1]), x)

    class Recurrent(torch.nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.rnn = cell(4, 8, num_layers=2, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    class DecoderStep(torch.nn.Module):
        """One decoder step with state in and out: next-token logits and the new state."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.cell = torch.nn.GRUCell(4, 8)
            self.out = torch.nn.Linear(8, 10)

        def forward(self, token, state):
            new = self.cell(self.emb(token), state)
            return self.out(new), new

    torch.manual_seed(0)
    return {
        "cond": (Cond(), (torch.randn(3),)),
        "while_loop": (WhileLoop(), (torch.randn(2, 4),)),
        "scan": (CumScan(), (torch.randn(5, 4),)),
        "lstm": (Recurrent(torch.nn.LSTM), (torch.randn(2, 5, 4),)),
        "gru": (Recurrent(torch.nn.GRU), (torch.randn(2, 5, 4),)),
        "decoder_step": (DecoderStep(), (torch.tensor([1, 7]), torch.randn(2, 8))),
    }


def export_torch_models(folder: Path = TORCH_DIR) -> list[str]:
    """Export the torch models with torch.onnx.export(dynamo=True) into `folder`."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (module, args) in _torch_models().items():
        module.eval()
        program = torch.onnx.export(module, args, dynamo=True, verbose=False)
        program.save(str(folder / f"{name}.onnx"))
        names = [i.name for i in program.model_proto.graph.input]
        np.savez(folder / f"{name}.npz", **{n: a.numpy() for n, a in zip(names, args)})
        written.append(name)
    return written


if __name__ == "__main__":
    print("exported:", ", ".join(export_torch_models()))
