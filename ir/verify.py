"""Verify a model: ONNX checker, strict shape inference, and a structural lint of the IR."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from winnow.errors import VerificationError

_CHECKER_LIMIT = 2 * 1024**3 - 1


def lint(model: ir.Model) -> list[str]:
    """Structural problems: values without producers, dangling outputs, cycles, missing inputs,
    in the main graph and in every If/Loop/Scan body (which may read enclosing scopes)."""
    return _lint_graph(model.graph, set())


def _lint_graph(graph: ir.Graph, outer: set[int]) -> list[str]:
    """Problems of one graph; `outer` holds the ids of values its enclosing scopes define."""
    problems: list[str] = []
    where = "" if not outer else f" in subgraph '{graph.name}'"
    known = set(outer) | {id(v) for v in graph.inputs}
    known |= {id(v) for v in graph.initializers.values()}
    seen_nodes = set()
    for node in graph:
        for value in node.inputs:
            if value is None or id(value) in known:
                continue
            if value.producer() is None:
                problems.append(f"node '{node.name}' ({node.op_type}){where} reads "
                                f"'{value.name}', which has no producer and is not an input or "
                                "initializer")
            elif id(value.producer()) not in seen_nodes:
                problems.append(f"node '{node.name}' ({node.op_type}){where} reads "
                                f"'{value.name}' before it is produced (cycle, unsorted graph, "
                                "or a value from another graph)")
        seen_nodes.add(id(node))
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                problems += _lint_graph(attr.as_graph(), known)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    problems += _lint_graph(sub, known)
        known.update(id(v) for v in node.outputs)
    for out in graph.outputs:
        if id(out) not in known:
            problems.append(f"graph output '{out.name}'{where} is never produced")
    names = [v.name for v in graph.outputs]
    if len(set(names)) != len(names):
        problems.append(f"graph{where} has two outputs of one name ({', '.join(names)})")
    return problems


def verify(model: ir.Model, *, check_shapes: bool = True) -> None:
    """Raise VerificationError naming the first problem when the model is not sound."""
    problems = lint(model)
    if problems:
        raise VerificationError(f"model failed the structural lint: {problems[0]}"
                                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    proto = ir.serde.serialize_model(model)
    _external_as_inputs(proto.graph)
    too_big = proto.ByteSize() > _CHECKER_LIMIT
    try:
        if not too_big:
            onnx.checker.check_model(proto, full_check=False)
            if check_shapes:
                onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise VerificationError(f"model failed the ONNX checker or shape inference: {first}") from exc


def _external_as_inputs(graph: onnx.GraphProto) -> None:
    """Turn initializers kept in external files into typed graph inputs: the checker would look
    for their files beside a model path a proto lacks (the loader checked those files)."""
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    inputs = {i.name for i in graph.input}
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                       for t in external if t.name not in inputs)
    kept = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del graph.initializer[:]
    graph.initializer.extend(kept)
