"""Verify a model: ONNX checker, strict shape inference, and a structural lint of the IR."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from winnow.errors import VerificationError

_CHECKER_LIMIT = 2 * 1024**3 - 1


def lint(model: ir.Model) -> list[str]:
    """Structural problems: values without producers, dangling outputs, cycles, missing inputs."""
    graph = model.graph
    problems: list[str] = []
    known = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    seen_nodes = set()
    for node in graph:
        for value in node.inputs:
            if value is None:
                continue
            if id(value) not in known and value.producer() is None:
                problems.append(f"node '{node.name}' ({node.op_type}) reads '{value.name}', "
                                "which has no producer and is not an input or initializer")
            elif value.producer() is not None and id(value.producer()) not in seen_nodes:
                problems.append(f"node '{node.name}' ({node.op_type}) reads '{value.name}' before "
                                "it is produced (cycle or unsorted graph)")
        seen_nodes.add(id(node))
        known.update(id(v) for v in node.outputs)
    for out in graph.outputs:
        if id(out) not in known:
            problems.append(f"graph output '{out.name}' is never produced")
    return problems


def verify(model: ir.Model, *, check_shapes: bool = True) -> None:
    """Raise VerificationError naming the first problem when the model is not sound."""
    problems = lint(model)
    if problems:
        raise VerificationError(f"model failed the structural lint: {problems[0]}"
                                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    proto = ir.serde.serialize_model(model)
    too_big = proto.ByteSize() > _CHECKER_LIMIT
    try:
        if not too_big:
            onnx.checker.check_model(proto, full_check=False)
            if check_shapes:
                onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise VerificationError(f"model failed the ONNX checker or shape inference: {first}") from exc
