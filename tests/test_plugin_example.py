"""The example plugin (examples/winnow-plugin-example) installed with pip and run through the CLI,
and plugins that fail: each is skipped with one sentence naming its distribution and entry point."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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


def example_tests():
    """The example's own test module (examples/winnow-plugin-example/tests/test_passes.py)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        spec = importlib.util.spec_from_file_location("winnow_plugin_example_tests",
                                                      EXAMPLE / "tests" / "test_passes.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE))
    return module


EXAMPLE_TESTS = example_tests()


@pytest.mark.parametrize("name", [n for n in vars(EXAMPLE_TESTS) if n.startswith("test_")])
def test_the_example_plugins_own_tests(name):
    getattr(EXAMPLE_TESTS, name)()


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
    assert reports["dedup-weights"]["merged"] == EXAMPLE_TESTS.duplicate_count(folded) > 0
    assert EXAMPLE_TESTS.duplicate_count(ir.load(out / "model.onnx")) == 0


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
    base.registered_passes()  # the built-ins, before the registry is copied
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
