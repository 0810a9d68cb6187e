"""docs/writing-a-pass.md runs as written: its files are written, its commands run, in an empty
folder; the README's pass table is what `winnow passes --markdown` prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from winnow.passes import registered_passes
from winnow.passes.manager import build_pipeline
from winnow.passes.reference import builtin_passes, markdown_table, readme_table

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "writing-a-pass.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
FILE_MARK = re.compile(r"^# file: (\S+)\n")
GUIDE_PASSES = ("weight-stats", "drop-zero-adds", "wanda-prune", "div-to-mul")


def guide_blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced code block of the guide as (language, body), in order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def as_script(block: str, site: Path) -> str:
    """A shell block as a bash script; `pip install -e .` installs into `site`, not the venv."""
    install = (f'"{sys.executable}" -m pip install -q --no-deps --no-build-isolation '
               f'--target "{site}" .')
    return "set -euo pipefail\n" + block.replace("pip install -e .", install)


def test_every_block_is_a_file_or_a_command():
    blocks = guide_blocks(GUIDE.read_text())
    assert len(blocks) >= 10
    for lang, body in blocks:
        assert lang == "sh" or FILE_MARK.match(body), f"a {lang} block without '# file:': {body[:60]}"


@pytest.mark.slow
def test_the_guide_runs_as_written(tmp_path):
    work, site = tmp_path / "my-winnow-passes", tmp_path / "site"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(work)]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    outputs = []
    for lang, body in guide_blocks(GUIDE.read_text()):
        mark = FILE_MARK.match(body)
        if mark:
            path = work / mark.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            continue
        done = subprocess.run(["bash", "-c", as_script(body, site)], cwd=work, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{body}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        outputs.append(done.stdout)

    listed = [line.split()[0] for line in outputs[0].splitlines()[:len(GUIDE_PASSES)]]
    assert listed == sorted(GUIDE_PASSES)  # `winnow passes` sees the installed plugin
    analysis = json.loads((work / "analysis" / "analysis.json").read_text())["analyses"]
    assert analysis["weight-stats"]["count"] == 2 * 6  # q, k, v, out, up, down per block
    assert "weight-stats" in (work / "analysis" / "report.html").read_text()
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    reports = {p["name"]: p["report"] for p in manifest["passes"]}
    assert reports["drop-zero-adds"] == {"removed": 1}
    assert reports["div-to-mul"]["rewrites"] == 2  # each block's GELU divides by sqrt(2)
    # int(0.2 * rows) per column: q, k, v, out [32, 32]; up [32, 128]; down [128, 32]
    assert reports["wanda-prune"] == {"matmuls": 2 * 6, "zeroed": 2 * (4 * 6 * 32 + 6 * 128 + 25 * 32)}
    fidelity = manifest["fidelity"]
    assert fidelity["rolled_back"] == [] and fidelity["lossy_passes"] == ["wanda-prune"]
    assert 0 < fidelity["budget"]["drop"] <= 0.1
    assert "3 passed" in outputs[-1]


def test_readme_pass_table_is_generated_from_the_passes():
    expected = markdown_table(builtin_passes(registered_passes()))
    assert readme_table((ROOT / "README.md").read_text()) == expected, (
        "README.md's pass table is stale; replace it with `winnow passes --markdown` output")


def test_markdown_reference_names_kind_description_and_typed_options():
    table = markdown_table(builtin_passes(registered_passes())).splitlines()
    rows = {line.split(" | ")[0].strip("| `"): line for line in table[2:]}
    assert set(rows) == set(builtin_passes(registered_passes()))
    assert rows["cse"].startswith("| `cse` | lossless | Merge nodes that compute the same thing")
    assert "`size_limit`: int = `10`" in rows["cse"]
    assert "| analysis |" in rows["layer-similarity"] and "| lossy |" in rows["drop-layers"]
    assert "`regions`: list[str] = `[]`" in rows["drop-layers"]
    assert "\\|" in rows["channel-importance"]  # a | in a description cannot split the row


def test_winnow_passes_markdown_prints_the_reference():
    from click.testing import CliRunner

    from winnow.cli import cli

    done = CliRunner().invoke(cli, ["passes", "--markdown"])
    assert done.exit_code == 0, done.output
    assert done.stdout == markdown_table(registered_passes())


QUOTED_PIPELINE = re.compile(r"(?:--pipeline |--then |\bP=)'([^']+)'")


@pytest.mark.parametrize("doc", ["README.md", "docs/distill-on-a-gpu.md"])
def test_every_pipeline_the_docs_quote_builds(doc):
    pipelines = QUOTED_PIPELINE.findall((ROOT / doc).read_text())
    assert pipelines, f"{doc} quotes no pipeline any more: update this test"
    for text in pipelines:
        assert build_pipeline(text), text  # an unknown pass or option raises PassConfigError
