"""The example plugin (examples/winnow-plugin-example) installed with pip and run through the CLI,
and plugins that fail: each is skipped with one sentence naming its distribution and entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from winnow import testing
from winnow.errors import PassRegistrationError
from winnow.passes import base

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "winnow-plugin-example"
WINNOW = [sys.executable, "-m", "winnow"]


def pip_install_target(source: Path, target: Path) -> Path:
    """`pip install` a package folder (copied first, so its tree stays clean) into `target`."""
    copy = target.parent / f"{source.name}-src"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(copy)],
                   check=True, capture_output=True, text=True)
    return target


def winnow_cli(args: list[str], pythonpath: Path | str) -> subprocess.CompletedProcess:
    """Run the winnow CLI in a subprocess with `pythonpath` in front (the plugin's install)."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([*WINNOW, *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """The example plugin, pip-installed into a temporary folder (the project's env untouched)."""
    return pip_install_target(EXAMPLE, tmp_path_factory.mktemp("plugin") / "site")


@pytest.fixture()
def example_on_path(monkeypatch):
    """The example plugin's modules importable in this process (for unit tests of its passes)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from winnow_plugin_example.dedup_weights import DedupWeightsPass
    from winnow_plugin_example.fold_scales import FoldScalesPass

    return DedupWeightsPass, FoldScalesPass


def shared_layer_model() -> tuple[ir.Model, int]:
    """A two-block transformer whose block 1 holds copies of block 0's tensors (a shared layer
    exported twice), and the number of copies."""
    model = testing.transformer_block(layers=2, seed=3)
    inits = model.graph.initializers
    copies = 0
    for name, value in list(inits.items()):
        twin = inits.get(name.replace("blocks.0.", "blocks.1.")) if name.startswith("blocks.0.") else None
        if twin is not None and not np.array_equal(twin.const_value.numpy(), value.const_value.numpy()):
            twin.const_value = ir.tensor(value.const_value.numpy().copy(), name=twin.name)
            copies += 1
    return model, copies


def scaled_conv_model(per_channel: bool) -> ir.Model:
    """Conv -> Mul(s) -> Relu with s a scalar or a [C, 1, 1] constant (on the left of the Mul)."""
    rng = np.random.default_rng(0)
    scale = (rng.random((4, 1, 1)) + 0.5) if per_channel else np.array([1.7])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         onnx.helper.make_node("Mul", ["s", "c"], ["m"]),
         onnx.helper.make_node("Relu", ["m"], ["y"])], "scaled-conv",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 6, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4, 6, 6])],
        initializer=[onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
            ("w", rng.standard_normal((4, 3, 3, 3))), ("b", rng.standard_normal(4)), ("s", scale))])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)],
                                   ir_version=8)
    return ir.serde.deserialize_model(proto)


def duplicate_count(model: ir.Model) -> int:
    """How many initializers repeat an earlier one's dtype, shape and bytes."""
    arrays = [v.const_value.numpy() for v in model.graph.initializers.values()]
    return len(arrays) - len({(a.dtype.str, a.shape, a.tobytes()) for a in arrays})


def test_dedup_weights_merges_the_copies_of_a_shared_layer(example_on_path):
    dedup, _ = example_on_path
    model, copies = shared_layer_model()
    plain = testing.transformer_block(layers=2, seed=3)
    assert duplicate_count(model) - duplicate_count(plain) == copies > 0
    result = testing.run_pass(dedup(), model)
    assert result.report["dedup-weights"]["merged"] == duplicate_count(model)
    assert len(result.model.graph.initializers) == len(model.graph.initializers) - duplicate_count(model)
    assert duplicate_count(result.model) == 0
    testing.assert_equivalent(model, result.model, rtol=0, atol=0)
    bigger = testing.run_pass(dedup(min_elements=64), model)  # only the shared layer's weights
    assert bigger.report["dedup-weights"]["merged"] == sum(
        1 for v in model.graph.initializers.values() if v.name.startswith("blocks.1.")
        and v.const_value.size >= 64)


@pytest.mark.parametrize("per_channel", [False, True])
def test_fold_scales_folds_a_mul_after_a_conv(example_on_path, per_channel):
    _, fold = example_on_path
    model = scaled_conv_model(per_channel)
    result = testing.run_pass(fold(), model)
    assert result.report["fold-scales"] == {"rewrites": 1, "by_rule": {"ConvScale": 1}}
    assert [n.op_type for n in result.model.graph] == ["Conv", "Relu"]
    testing.assert_equivalent(model, result.model, rtol=1e-5, atol=1e-5)


def scaled_conv_count(proto: onnx.ModelProto) -> int:
    """Mul nodes with one Conv input and one constant input (what fold-scales folds)."""
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    consts = {i.name for i in proto.graph.initializer} | {
        o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return sum(1 for n in proto.graph.node if n.op_type == "Mul"
               and any(producers.get(i) == "Conv" for i in n.input)
               and any(i in consts for i in n.input))


@pytest.mark.slow
def test_pip_installed_example_runs_through_the_cli(installed_example, tmp_path):
    """Both passes on PP-OCR's recogniser: its 28 Conv scales folded, the duplicate constants that
    fold-constants leaves merged, outputs equal to the source (--strict)."""
    out = tmp_path / "rec"
    done = winnow_cli(["compile", "zoo:ppocr-rec", "-o", str(out), "--strict",
                       "--pipeline", "fold-constants,dedup-weights,fold-scales"], installed_example)
    assert done.returncode == 0, done.stderr
    reports = {p["name"]: p["report"] for p in json.loads((out / "manifest.json").read_text())["passes"]}
    assert reports["fold-scales"]["rewrites"] == scaled_conv_count(onnx.load(_ppocr_rec_path())) == 28
    assert scaled_conv_count(onnx.load(out / "model.onnx")) == 0
    folded = testing.run_pass("fold-constants", ir.load(_ppocr_rec_path()), verify=False).model
    assert reports["dedup-weights"]["merged"] == duplicate_count(folded) > 0
    assert duplicate_count(ir.load(out / "model.onnx")) == 0


def _ppocr_rec_path() -> Path:
    from winnow import models_zoo

    return Path(models_zoo.get("ppocr-rec").path)


BAD_PLUGINS = {
    "broken-import": ("broken_import_plugin.py", "import no_such_module_anywhere\n",
                      "broken-import = broken_import_plugin:Whatever"),
    "bad-name": ("bad_name_plugin.py", textwrap.dedent("""
        from winnow.passes import Pass, PassResult
        class BadName(Pass):
            name = "Bad_Name"
            description = "a pass whose name is not kebab-case"
            def call(self, model):
                return PassResult(model, False)
        """), "bad-name = bad_name_plugin:BadName"),
    "no-defaults": ("no_defaults_plugin.py", textwrap.dedent("""
        from dataclasses import dataclass
        from winnow.passes import Pass, PassResult
        class NoDefaults(Pass):
            name = "no-defaults"
            description = "a Config field without a default"
            @dataclass(frozen=True)
            class Config:
                threshold: float
            def call(self, model):
                return PassResult(model, False)
        """), "no-defaults = no_defaults_plugin:NoDefaults"),
    "twin-a": ("twin_a_plugin.py", textwrap.dedent("""
        from winnow.passes import Pass, PassResult
        class Twin(Pass):
            name = "twin-pass"
            description = "registered by two distributions"
            def call(self, model):
                return PassResult(model, False)
        """), "twin-pass = twin_a_plugin:Twin"),
    "twin-b": ("twin_b_plugin.py", "from twin_a_plugin import Twin as _T\nclass Twin(_T):\n    pass\n",
               "twin-pass = twin_b_plugin:Twin"),
    "good": ("good_plugin.py", textwrap.dedent("""
        from winnow.passes import Pass, PassResult
        class Good(Pass):
            name = "good-pass"
            description = "a plugin that loads"
            def call(self, model):
                return PassResult(model, False)
        """), "good-pass = good_plugin:Good"),
}


@pytest.fixture()
def bad_plugins(tmp_path, monkeypatch) -> Path:
    """Six distributions (dist-info + module) on sys.path: four broken ways and two that load."""
    for dist, (module, source, entry) in BAD_PLUGINS.items():
        (tmp_path / module).write_text(source)
        info = tmp_path / f"winnow_{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: winnow-{dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[winnow.passes]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_ORIGINS", dict(base._ORIGINS))
    monkeypatch.setattr(base, "_PLUGIN_PROBLEMS", {})
    return tmp_path


def test_bad_plugins_are_skipped_with_their_distribution_and_entry_point_named(bad_plugins):
    passes = base.registered_passes()
    assert "good-pass" in passes and "twin-pass" in passes and "cse" in passes
    problems = "\n".join(base.plugin_problems())
    assert len(base.plugin_problems()) == 4
    assert ("entry point 'broken-import = broken_import_plugin:Whatever' (group winnow.passes) of "
            "distribution 'winnow-broken-import 0.1' failed to import (ModuleNotFoundError: No module "
            "named 'no_such_module_anywhere'); fix or uninstall 'winnow-broken-import'.") in problems
    assert "'winnow-bad-name 0.1' was skipped: pass name 'Bad_Name'" in problems
    assert "must be kebab-case" in problems
    assert "option 'threshold' of pass 'no-defaults'" in problems and "has no default" in problems
    assert "pass name 'twin-pass' of entry point" in problems
    assert "'winnow-twin-a 0.1'" in problems and "'winnow-twin-b 0.1'" in problems
    with pytest.raises(PassRegistrationError, match="pass 'broken-import' is unavailable: entry "
                                                    "point 'broken-import = "):
        base.get_pass_class("broken-import")


def test_winnow_passes_lists_everything_else_and_warns(bad_plugins):
    from click.testing import CliRunner

    from winnow.cli import cli

    listing = CliRunner().invoke(cli, ["passes"])
    assert listing.exit_code == 0, listing.output
    names = {line.split()[0] for line in listing.stdout.splitlines() if line and not line[0].isspace()}
    assert {"good-pass", "twin-pass", "cse", "fold-constants"} <= names
    assert not names & {"broken-import", "Bad_Name", "no-defaults"}
    warnings = [line for line in listing.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 4
    assert all("distribution 'winnow-" in w and "entry point '" in w for w in warnings)
    path = bad_plugins / "mlp.onnx"
    ir.save(testing.mlp(), path)
    bad = CliRunner().invoke(cli, ["compile", str(path), "-o", str(bad_plugins / "out"),
                                   "--pipeline", "no-defaults"])
    assert bad.exit_code == 2 and "error: pass 'no-defaults' is unavailable: entry point" in bad.stderr
    assert not (bad_plugins / "out").exists()
