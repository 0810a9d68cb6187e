"""The pass SDK: registry, typed configs, context, analysis cache and invalidation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tests.graphs import DEAD, DUPLICATED, model
from winnow.errors import PassConfigError, PassFailedError
from winnow.passes import (
    AnalysisPass,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    option,
    register_pass,
    registered_passes,
)
from winnow.passes.config import config_fields


@register_pass
class CountNodesAnalysis(AnalysisPass):
    """Test analysis: counts nodes (and how often it ran)."""

    name = "test-count-nodes"
    description = "count nodes"
    runs = 0

    def analyze(self, m: ir.Model) -> dict:
        type(self).runs += 1
        return {"nodes": len(list(m.graph))}


@register_pass
class ScaleOutputsPass(Pass):
    """Test rewrite: multiplies the first output by `factor` (lossy on purpose)."""

    name = "test-scale-outputs"
    description = "scale outputs"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        """Options of test-scale-outputs."""

        factor: float = option(2.0, "multiplier", min=0.0)
        mode: str = option("mul", "how to scale", choices=("mul", "add"))
        names: tuple[str, ...] = option((), "which outputs")

    def call(self, m: ir.Model) -> PassResult:
        out = m.graph.outputs[0]
        const = ir.node("Constant", [], attributes={"value": ir.tensor(np.float32(self.config.factor))})
        m.graph.append(const)
        scaled = ir.node("Mul", [out, const.outputs[0]])
        m.graph.append(scaled)
        scaled.outputs[0].name = out.name + "_scaled"
        scaled.outputs[0].dtype = out.dtype
        scaled.outputs[0].shape = out.shape
        m.graph.outputs[0] = scaled.outputs[0]
        return PassResult(m, True)


@register_pass
class BoomPass(Pass):
    """Test pass that always raises."""

    name = "test-boom"
    description = "raises"

    def call(self, m: ir.Model) -> PassResult:
        raise RuntimeError("kaboom")


def test_builtins_are_registered_with_descriptions():
    passes = registered_passes()
    for name in ("fold-constants", "cse", "dce", "shape-inference", "canonicalize"):
        assert name in passes
        assert passes[name].description


def test_registering_a_bad_or_duplicate_name_fails():
    class Bad(Pass):
        name = "Bad_Name"

        def call(self, m):
            return PassResult(m, False)

    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(Bad)

    class Dup(Pass):
        name = "cse"

        def call(self, m):
            return PassResult(m, False)

    with pytest.raises(ValueError, match="already registered"):
        register_pass(Dup)


def test_config_is_typed_frozen_and_validated():
    p = ScaleOutputsPass(factor="3.5", names="[a,b]")
    assert p.config.factor == 3.5 and p.config.names == ("a", "b")
    with pytest.raises(Exception):
        p.config.factor = 1.0  # frozen
    with pytest.raises(PassConfigError, match="'factor' must be in"):
        ScaleOutputsPass(factor=-1)
    with pytest.raises(PassConfigError, match="'mode' must be one of mul, add"):
        ScaleOutputsPass(mode="div")
    with pytest.raises(PassConfigError, match="'factor' expects float"):
        ScaleOutputsPass(factor="lots")
    assert isinstance(PassConfigError("x"), ValueError)


def test_config_fields_describe_each_option():
    fields = {f["name"]: f for f in config_fields(ScaleOutputsPass.Config)}
    assert fields["factor"]["default"] == 2.0 and fields["factor"]["help"] == "multiplier"
    assert fields["names"]["type"] == "list[str]"


def test_analysis_is_cached_until_a_rewrite_modifies_the_model():
    m = model(DUPLICATED)
    CountNodesAnalysis.runs = 0
    ctx = PassContext()
    with ctx:
        first = ctx.get_analysis("test-count-nodes", m)
        again = ctx.get_analysis("test-count-nodes", m)
    assert first is again and CountNodesAnalysis.runs == 1
    PassManager("cse").run(m, ctx)
    assert "test-count-nodes" not in ctx.analyses
    assert ctx.get_analysis("test-count-nodes", m)["nodes"] == 2


def test_analysis_with_other_options_is_recomputed():
    from winnow.passes.analysis.layer_similarity import LayerSimilarityPass  # noqa: F401

    m = model(DUPLICATED)
    ctx = PassContext()
    with ctx:
        ctx.get_analysis("layer-similarity", m, samples=2)
        first = ctx.analyses["layer-similarity"]
        assert ctx.get_analysis("layer-similarity", m, samples=2) is first
        assert ctx.get_analysis("layer-similarity", m) is first
        assert ctx.get_analysis("layer-similarity", m, samples=3) is not first
    assert ctx.analysis_configs["layer-similarity"].samples == 3


def test_preserving_pass_keeps_analyses():
    m = model(DUPLICATED)
    ctx = PassContext()
    PassManager("test-count-nodes,shape-inference").run(m, ctx)
    assert "test-count-nodes" in ctx.analyses
    assert ctx.report["test-count-nodes"] == {"nodes": 3}


def test_context_is_reachable_from_inside_a_pass():
    seen = {}

    class Peek(Pass):
        name = "test-peek"

        def call(self, m):
            seen["target"] = PassContext.current().target
            return PassResult(m, False)

    PassManager([Peek()]).run(model(DEAD), PassContext(target="x86-avx2"))
    assert seen["target"] == "x86-avx2"


def test_foreign_onnx_ir_pass_runs_in_a_pipeline():
    m = model(DEAD)
    result = PassManager([RemoveUnusedNodesPass(), ScaleOutputsPass()]).run(m)
    assert result.modified
    assert [n.op_type for n in m.graph] == ["Relu", "Constant", "Mul"]


def test_failure_names_the_pass_and_those_before_it():
    with pytest.raises(PassFailedError) as err:
        PassManager("cse,dce,test-boom").run(model(DEAD))
    assert "pass 'test-boom' failed (passes run before it: cse, dce): kaboom" in str(err.value)
