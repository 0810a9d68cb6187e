"""The manifest says what was done: every pass's options, effect and report, the verification
trace of --verify-each; the CLI prints one line per lossy pass and the budget honestly; analyze
ends with the compile command that applies what it found."""

from __future__ import annotations

import json
import re
import shlex

import onnx
import pytest
from click.testing import CliRunner

import winnow
from tests.test_foreign_cnn import tiny_resnet
from winnow.driver.analyze import suggest_compile
from winnow.cli import cli
from winnow.ir.regions import find_regions


def invoke(*args: str):
    """Run the CLI in-process (quiet) and return click's Result."""
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


@pytest.fixture
def resnet_path(tmp_path):
    path = tmp_path / "tiny_resnet.onnx"
    onnx.save(tiny_resnet(), path)
    return path


def _values(path) -> set[str]:
    graph = onnx.load(str(path)).graph
    return {name for node in graph.node for name in node.output}


def test_manifest_records_each_pass_and_what_drop_layers_removed(resnet_path, tmp_path):
    out = tmp_path / "out"
    result = invoke("compile", resnet_path, "-o", out, "--verify-each", "--force",
                    "--pipeline", "fold-constants,drop-layers{count=1},dce")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    passes = manifest["passes"]
    assert [p["name"] for p in passes] == ["fold-constants", "drop-layers", "dce"]
    drop = passes[1]
    assert drop["lossless"] is False and drop["modified"] is True
    assert drop["options"]["count"] == 1 and drop["options"]["replacement"] == "identity"
    (dropped,) = drop["report"]["dropped"]
    assert drop["report"]["summary"] == f"removed {dropped} (identity)"
    # Against the graph itself: the dropped region's values are gone, the others are not.
    regions = find_regions(winnow.load(resnet_path))
    region = regions.get(dropped)
    assert region.droppable and dropped in ("block0", "block2")
    gone = {v.name for n in region.nodes for v in n.outputs} - {region.exit.name}
    written = _values(out / "model.onnx")
    assert gone and not gone & written
    assert {"b_short", "b2"} <= written  # the projection block stays
    assert drop["nodes"]["before"] - drop["nodes"]["after"] >= len(region.nodes) - 1
    assert passes[-1]["nodes"]["after"] == manifest["nodes"] == len(onnx.load(str(out / "model.onnx")).graph.node)
    # --verify-each leaves its trace: every pass that changed the model was verified.
    assert drop["verified"].startswith("passed")
    assert all(p["verified"].startswith("passed") == p["modified"] for p in passes)
    text = result.stdout
    assert f"lossy     drop-layers: removed {dropped} (identity)" in text
    assert "verified  after drop-layers" in text


def test_without_verify_each_the_manifest_claims_no_verification(resnet_path, tmp_path):
    out = tmp_path / "out"
    result = invoke("compile", resnet_path, "-o", out, "--pipeline", "cse,dce")
    assert result.exit_code == 0, result.output
    passes = json.loads((out / "manifest.json").read_text())["passes"]
    assert [p["name"] for p in passes] == ["cse", "dce"]
    assert all("verified" not in p and p["lossless"] for p in passes)
    assert "verified" not in result.stdout and "lossy" not in result.stdout


def _budget_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("budget"))


def test_forced_budget_says_exceeds(resnet_path, tmp_path):
    forced = invoke("compile", resnet_path, "-o", tmp_path / "a", "--force", "--max-drop", "0",
                    "--pipeline", "drop-layers{regions=[block0,block2]}")
    assert forced.exit_code == 0, forced.output
    line = _budget_line(forced.stdout)
    drop = float(re.search(r" (\d+\.\d+) exceeds 0\.0 \(forced\)$", line).group(1))
    assert drop > 0
    kept = invoke("compile", resnet_path, "-o", tmp_path / "b", "--max-drop", "1",
                  "--pipeline", "drop-layers{regions=[block0,block2]}")
    assert kept.exit_code == 0, kept.output
    assert _budget_line(kept.stdout).endswith(f"{drop:.4f} <= 1.0")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["fidelity"]["budget"]["drop"] == pytest.approx(drop, abs=1e-4)
    assert manifest["passes"][0]["report"]["dropped"] == ["block0", "block2"]


def test_analyze_ends_with_the_compile_command_that_applies_it(resnet_path, tmp_path):
    result = invoke("analyze", resnet_path, "-o", tmp_path / "report",
                    "--passes", "layer-similarity,das-skip{steps=4,batch_size=2}")
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("apply     winnow compile ")
    data = json.loads((tmp_path / "report" / "analysis.json").read_text())
    selected = data["analyses"]["das-skip"]["selected"]
    assert last == f"apply     {data['next']}"
    argv = shlex.split(last.removeprefix("apply     "))
    assert argv[:3] == ["winnow", "compile", str(resnet_path)]
    pipeline = argv[argv.index("--pipeline") + 1]
    assert pipeline == f"drop-layers{{regions=[{','.join(selected)}]}}"
    applied = invoke("compile", resnet_path, "-o", tmp_path / "applied", "--force",
                     "--pipeline", pipeline)
    assert applied.exit_code == 0, applied.output
    manifest = json.loads((tmp_path / "applied" / "manifest.json").read_text())
    assert manifest["passes"][0]["report"]["dropped"] == selected


def test_suggestion_from_layer_similarity_alone_or_nothing():
    ranked = {"layer-similarity": {"ranking": {"block": ["blocks.3", "blocks.1"]}}}
    assert suggest_compile("zoo:x", ranked) == \
        "winnow compile zoo:x -o OUT --pipeline 'drop-layers{regions=[blocks.3]}'"
    das = {"das-skip": {"selected": ["a.1", "a.2"], "replacement": "linear"}, **ranked}
    assert suggest_compile("my model.onnx", das) == ("winnow compile 'my model.onnx' -o OUT "
                                                     "--pipeline 'drop-layers{regions=[a.1,a.2],"
                                                     "replacement=linear}'")
    assert suggest_compile("m.onnx", {"layer-similarity": {"ranking": {"block": []}}}) is None


def test_analyze_of_degenerate_activations_names_the_reason_and_suggests_nothing(tmp_path):
    path = tmp_path / "zeroed.onnx"
    onnx.save(tiny_resnet(scale=0.0), path)
    result = invoke("analyze", path, "-o", tmp_path / "report", "--passes", "layer-similarity")
    assert result.exit_code == 0, result.output
    assert "none of the 3 regions is measurable on the calibration data" in result.stdout
    assert "(near) zero" in result.stdout and "apply" not in result.stdout
    data = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert data["next"] is None
    page = (tmp_path / "report" / "report.html").read_text()
    assert "not measurable: its input is (near) zero" in page
    assert "no: its shortcut is a projection" in page
