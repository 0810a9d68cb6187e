"""Third-party passes through the `winnow.passes` entry point, and the pass instruments."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx_ir as ir
import pytest

from tests.graphs import DEAD, FOLDABLE, model
from winnow import testing
from winnow.errors import PassFailedError
from winnow.passes import Pass, PassManager, PassResult, base
from winnow.passes.instruments import DumpIRInstrument, TimingInstrument, VerifyInstrument

PLUGIN_SOURCE = '''
"""A third-party winnow pass shipped in its own distribution."""
from dataclasses import dataclass

import onnx_ir as ir
from winnow.passes import Pass, PassResult, option


class NegateTwicePass(Pass):
    """Inserts two Neg nodes before the first output (a no-op, for testing plugins)."""

    name = "demo-negate-twice"
    description = "insert Neg(Neg(y)) before the first output"

    @dataclass(frozen=True)
    class Config:
        times: int = option(1, "how many Neg pairs", min=1)

    def call(self, model):
        out = model.graph.outputs[0]
        value = out
        for _ in range(2 * self.config.times):
            node = ir.node("Neg", [value])
            model.graph.append(node)
            value = node.outputs[0]
        value.name, value.dtype, value.shape = out.name + "_nn", out.dtype, out.shape
        model.graph.outputs[0] = value
        return PassResult(model, True)
'''


@pytest.fixture()
def plugin_distribution(tmp_path, monkeypatch):
    """Install a tiny plugin distribution (dist-info + module) on sys.path for one test."""
    (tmp_path / "winnow_demo_plugin.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "winnow_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: winnow-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [winnow.passes]
        demo-negate-twice = winnow_demo_plugin:NegateTwicePass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)
    yield
    base._REGISTRY.pop("demo-negate-twice", None)


def test_entry_point_plugin_registers_and_runs(plugin_distribution):
    assert "demo-negate-twice" in base.registered_passes()
    source = model(DEAD)
    result = testing.run_pass("dce,demo-negate-twice{times=2}", source)
    assert [n.op_type for n in result.model.graph].count("Neg") == 4
    testing.assert_equivalent(source, result.model, {"x": np.array([1.0, -2.0], np.float32)},
                              rtol=0, atol=0)


def test_timing_instrument_records_every_pass():
    timing = TimingInstrument()
    PassManager("fold-constants,cse,dce", [timing]).run(model(FOLDABLE))
    assert [r[0] for r in timing.records] == ["fold-constants", "cse", "dce"]
    assert all(seconds >= 0 for _, seconds, _ in timing.records)
    assert "total" in timing.table()


def test_dump_ir_writes_before_and_after_each_pass(tmp_path):
    PassManager("fold-constants,dce", [DumpIRInstrument(tmp_path)]).run(model(FOLDABLE))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-fold-constants.after.txt", "00-fold-constants.before.txt",
                     "01-dce.after.txt", "01-dce.before.txt"]
    assert "Add" in (tmp_path / "00-fold-constants.before.txt").read_text()
    assert "Add" not in (tmp_path / "01-dce.after.txt").read_text()


class BreakGraphPass(Pass):
    """Leaves a node reading a value nobody produces (a broken rewrite)."""

    name = "test-break-graph"

    def call(self, m: ir.Model) -> PassResult:
        orphan = ir.Value(name="orphan")
        m.graph.append(ir.node("Relu", [orphan]))
        return PassResult(m, True)


def test_verify_each_catches_a_broken_rewrite_and_names_it():
    with pytest.raises(PassFailedError) as err:
        PassManager([base.registered_passes()["cse"](), BreakGraphPass()],
                    [VerifyInstrument()]).run(model(DEAD))
    message = str(err.value)
    assert "pass 'test-break-graph' failed (passes run before it: cse)" in message
    assert "orphan" in message
