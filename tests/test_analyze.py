"""`winnow analyze`: analysis.json, the HTML report with embedded plots (rendered in headless
Chromium), models without blocks, and bad input."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner

import winnow
from tests.tiny_models import TinyTransformer, zero_block_branches
from winnow.driver.analyze import analyze_model
from winnow.cli import cli
from winnow.errors import OutputError, PipelineError, SourceError
from winnow.ir.regions import find_regions

ZEROED = "blocks.1"
PASSES = "layer-similarity,das-skip{steps=40}"
PLOTS = ["similarity-blocks", "similarity-sublayers", "das-curve", "das-logits"]
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
CHROMIUM = Path("/usr/bin/chromium")
ATTENTION_RGB, MLP_RGB = (0x4C, 0x72, 0xB0), (0xDD, 0x84, 0x52)


def invoke(*args: object):
    """Run the CLI in-process (quiet) and return click's Result."""
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def calibration(batches: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((2, 8, 32)).astype(np.float32)} for _ in range(batches)]


@pytest.fixture(scope="module")
def tiny_ir() -> ir.Model:
    """A 4-block pre-norm transformer whose block 1 is an exact identity."""
    net = TinyTransformer(layers=4).eval()
    zero_block_branches(net, 1)
    return winnow.load(net, (torch.randn(2, 8, 32),))


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    ir.save(tiny_ir, path)
    return path


@pytest.fixture(scope="module")
def analysis(tiny_ir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "out"
    return analyze_model(tiny_ir, out, passes=PASSES, calibration=calibration())


def test_analysis_json_has_both_analyses_and_ranks_the_zeroed_block_first(analysis, tiny_ir):
    out = analysis.path
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "manifest.json",
                                                     "report.html"]
    data = json.loads((out / "analysis.json").read_text())
    assert data["passes"] == PASSES
    assert data["regions"] == find_regions(tiny_ir).to_dict()
    assert [b["name"] for b in data["regions"]["blocks"]] == [f"blocks.{i}" for i in range(4)]
    assert data["calibration"] == {"source": "explicit", "batches": 3, "samples": 6}
    assert data["model"]["inputs"][0]["name"] == "x" and data["model"]["nodes"] > 0
    assert set(data["analyses"]) == {"layer-similarity", "das-skip"}
    assert set(data["timings"]["passes"]) == {"layer-similarity", "das-skip"}

    similarity = data["analyses"]["layer-similarity"]
    assert similarity["ranking"]["block"][0] == ZEROED
    assert set(similarity["ranking"]["sublayer"][:2]) == {f"{ZEROED}.attn", f"{ZEROED}.mlp"}
    scores = {r["name"]: r for r in similarity["regions"]}
    assert scores[ZEROED]["cos"] == pytest.approx(1.0, abs=1e-6)
    assert scores[ZEROED]["angular"] == pytest.approx(0.0, abs=1e-3)
    assert all(scores[f"blocks.{i}"]["cos"] < 0.999 for i in (0, 2, 3))

    das = data["analyses"]["das-skip"]
    assert [r["name"] for r in das["regions"]] == [f"blocks.{i}" for i in range(4)]
    assert len(das["curve"]["reward"]) == len(das["curve"]["loss"]) == 40
    assert das["selected"] == [das["ranking"][0]]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "winnow-analysis" and manifest["plots"] == PLOTS
    assert set(manifest["files"]) == {"analysis.json", "report.html"}


def test_report_embeds_a_png_for_each_plot(analysis):
    from PIL import Image

    page = (analysis.path / "report.html").read_text()
    assert analysis.plots == PLOTS
    images = IMG.findall(page)
    assert len(images) == len(PLOTS) == page.count("<img")
    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(png)) as img:
            assert img.width > 300 and img.height > 200
    # Self-contained: no scripts, stylesheets or images fetched from anywhere.
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page
    for text in ("Layer similarity", "DAS skip search", "Rankings", "Regions", "4 × 8",
                 f"{ZEROED}.attn", "Per sub-layer"):
        assert text in page


def test_cli_prints_a_summary_and_json(tiny_onnx, tmp_path):
    out = tmp_path / "report"
    result = invoke("analyze", tiny_onnx, "-o", out,
                    "--passes", "layer-similarity,das-skip{steps=10}")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for needle in ("regions   4 blocks, 8 sub-layers", f"block      {ZEROED} (cos 1.0000)",
                   "das-skip", "selected", f"wrote     {out}/", "report.html", "analysis.json"):
        assert needle in text, text
    again = invoke("analyze", tiny_onnx, "-o", out, "--json", "--force-overwrite",
                   "--passes", "layer-similarity")
    assert again.exit_code == 0, again.output
    info = json.loads(again.stdout)
    assert list(info["analyses"]) == ["layer-similarity"]
    assert info["analyses"]["layer-similarity"]["ranking"]["block"][0] == ZEROED
    assert info["files"]["report.html"] == (out / "report.html").stat().st_size
    assert info["plots"] == ["similarity-blocks", "similarity-sublayers"]


def test_public_api_can_be_called_repeatedly(tiny_ir, tmp_path):
    # `winnow.analyze` is a function; the module is `winnow.driver.analyze`, so importing it does not
    # replace the function on the package.
    for name in ("a", "b"):
        result = winnow.analyze(tiny_ir, tmp_path / name, passes="layer-similarity{samples=2}")
        # The torch frontend keeps the export's example inputs.
        assert result.data["calibration"]["source"] == "example inputs"
        assert result.analyses["layer-similarity"]["ranking"]["block"][0] == ZEROED
    assert callable(winnow.analyze)


def test_model_without_blocks_says_so_and_still_writes_a_report(tiny_model_path, tmp_path):
    out = tmp_path / "out"
    result = invoke("analyze", tiny_model_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert "no residual blocks detected" in result.stdout
    data = json.loads((out / "analysis.json").read_text())
    assert data["regions"]["blocks"] == []
    assert "no residual blocks" in data["analyses"]["layer-similarity"]["note"]
    assert data["analyses"]["das-skip"]["regions"] == [] and data["analyses"]["das-skip"]["note"]
    page = (out / "report.html").read_text()
    assert "No residual blocks were detected in this model." in page and "<img" not in page


def _fails_cleanly(result, out: Path, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert not out.exists()


def test_bad_inputs_exit_2_and_write_nothing(tiny_onnx, tmp_path):
    out = tmp_path / "out"
    _fails_cleanly(invoke("analyze", tmp_path / "missing.onnx", "-o", out), out,
                   "missing.onnx", "does not exist")
    _fails_cleanly(invoke("analyze", "zoo:no-such-model", "-o", out), out, "unknown zoo model")
    _fails_cleanly(invoke("analyze", tiny_onnx, "-o", out, "--passes", "no-such-pass"), out,
                   "unknown pass 'no-such-pass'")
    _fails_cleanly(invoke("analyze", tiny_onnx, "-o", out, "--passes", "cse"), out,
                   "'cse' is not an analysis pass")
    # Fails inside a pass, after the model is loaded: still nothing half-written.
    _fails_cleanly(invoke("analyze", tiny_onnx, "-o", out, "--passes", "das-skip{k=4}"), out,
                   "das-skip", "blocks.0, blocks.1, blocks.2, blocks.3")


def test_existing_output_is_kept_unless_forced(tiny_onnx, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    result = invoke("analyze", tiny_onnx, "-o", taken, "--passes", "layer-similarity",
                    "--force-overwrite")
    assert result.exit_code == 2 and "not a winnow artifact" in result.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]

    out = tmp_path / "out"
    assert invoke("analyze", tiny_onnx, "-o", out, "--passes", "layer-similarity").exit_code == 0
    before = (out / "analysis.json").read_text()
    result = invoke("analyze", tiny_onnx, "-o", out, "--passes", "das-skip{steps=5}")
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--force-overwrite" in result.stderr
    assert (out / "analysis.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_api_errors(tiny_ir, tmp_path):
    with pytest.raises(SourceError, match="feed dict"):
        analyze_model(tiny_ir, tmp_path / "a", calibration=42)
    with pytest.raises(PipelineError, match="not an analysis pass"):
        analyze_model(tiny_ir, tmp_path / "a", passes="dce")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    with pytest.raises(OutputError, match="already exists"):
        analyze_model(tiny_ir, tmp_path / "b")
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(not CHROMIUM.is_file(),
                    reason="Debian's chromium (/usr/bin/chromium) is not installed; `make install` "
                           "installs it when run as root with apt-get")
def test_report_renders_with_its_images_in_headless_chromium(analysis, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,2000", (analysis.path / "report.html").resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert shot.is_file(), (f"chromium wrote no screenshot (rc {proc.returncode}): "
                            f"{proc.stderr[-2000:]}")
    assert shot.stat().st_size > 50_000
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    colors = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colors) > 500, f"only {len(colors)} colours: a blank or text-only page"

    def near(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(pixels.astype(int) - rgb).sum(axis=2) < 30).sum())

    # The sub-layer similarity bars (attention blue, MLP orange) are drawn in the first 2000 px.
    assert near(ATTENTION_RGB) > 2000 and near(MLP_RGB) > 2000
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
