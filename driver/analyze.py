"""The analyze API: load a model, run analysis passes on calibration data, and write
`analysis.json` and a self-contained `report.html` (plots embedded) into an output folder."""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassBase

from winnow import progress
from winnow.backends.manifest import (
    MANIFEST_FILE,
    file_entries,
    io_spec,
    jsonable,
    node_count,
    op_histogram,
    param_stats,
    staging,
)
from winnow.errors import PipelineError, require_extra
from winnow.driver.source import resolve
from winnow.ir.user_inputs import UserInputs, user_inputs_record
from winnow.passes.base import AnalysisPass
from winnow.passes.instruments import TimingInstrument
from winnow.passes.manager import PassContext, PassManager, pass_label
from winnow.passes.pipeline import PassSpec

DEFAULT_ANALYSES = "layer-similarity,das-skip"
ANALYSIS_FILE = "analysis.json"
REPORT_FILE = "report.html"
ANALYSIS_FORMAT = "winnow-analysis"
ANALYSIS_VERSION = 1

Feeds = dict[str, np.ndarray]


@dataclasses.dataclass
class AnalysisResult:
    """What an analysis wrote: the folder, the analysis.json data and the plots in the report."""

    path: Path
    data: dict[str, Any]
    plots: list[str]
    files: list[str]

    @property
    def analyses(self) -> dict[str, Any]:
        """Each analysis pass's result by pass name."""
        return self.data["analyses"]

    @property
    def blocks(self) -> list[dict[str, Any]]:
        """The residual blocks found (each with its sub-layers)."""
        return self.data["regions"]["blocks"]

    def file_sizes(self) -> dict[str, int]:
        """Bytes of each file written into the output folder."""
        return {name: (self.path / name).stat().st_size for name in self.files}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (the CLI's `--json` output): analysis.json plus where it went."""
        return {**self.data, "out": str(self.path), "files": self.file_sizes(),
                "plots": self.plots}


def analysis_passes(passes: str | Sequence[PassSpec | PassBase]) -> PassManager:
    """A PassManager for `passes`; PipelineError when one of them is not an analysis pass."""
    manager = PassManager(passes)
    if not manager.passes:
        raise PipelineError("no analysis passes given; name at least one, e.g. "
                            f"'{DEFAULT_ANALYSES}'.")
    for p in manager.passes:
        if not isinstance(p, AnalysisPass):
            raise PipelineError(f"'{pass_label(p)}' is not an analysis pass; `winnow analyze` only "
                                "measures (e.g. layer-similarity, das-skip); run rewrites with "
                                "`winnow compile --pipeline`.")
    return manager


def _samples(batches: Sequence[Feeds]) -> int:
    total = 0
    for b in batches:
        first = next((v for v in b.values() if np.ndim(v) >= 1), None)
        total += int(np.shape(first)[0]) if first is not None else 1
    return total


def _json_default(obj: Any) -> Any:
    """Arrays (e.g. from a third-party analysis) as lists, anything else as its text."""
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return str(obj)


def _model_info(model: ir.Model) -> dict[str, Any]:
    return {"ir_version": model.ir_version, "opset_imports": dict(model.opset_imports),
            **io_spec(model), "nodes": node_count(model), "params": param_stats(model),
            "ops": op_histogram(model)}


def suggest_compile(source: str, analyses: dict[str, Any]) -> str | None:
    """The `winnow compile` command that applies what the analyses found: drop das-skip's
    selected regions (with its replacement), else layer-similarity's top-ranked block; None
    when nothing was ranked."""
    das = analyses.get("das-skip") if isinstance(analyses.get("das-skip"), dict) else {}
    similarity = analyses.get("layer-similarity")
    similarity = similarity if isinstance(similarity, dict) else {}
    regions, replacement = list(das.get("selected") or []), das.get("replacement", "identity")
    if not regions:
        regions = (similarity.get("ranking") or {}).get("block", [])[:1]
        replacement = "identity"
    if not regions:
        return None
    options = f"regions=[{','.join(regions)}]"
    if replacement != "identity":
        options += f",replacement={replacement}"
    return (f"winnow compile {shlex.quote(source)} -o OUT "
            f"--pipeline {shlex.quote(f'drop-layers{{{options}}}')}")


def analyze_model(source: Any, out: str | Path, *,
                  passes: str | Sequence[PassSpec | PassBase] = DEFAULT_ANALYSES,
                  calibration: Any = None, overwrite: bool = False, example_inputs: Any = None,
                  dynamic_shapes: Any = None, user_inputs: UserInputs | None = None
                  ) -> AnalysisResult:
    """Load `source`, run the analysis passes and write analysis.json + report.html to `out`.

    Calibration data: `calibration` (a feed dict or a list of them) when given, else the zoo
    model's calibration split for 'zoo:NAME' / 'onnx:NAME', else the frontend's example feeds
    (random feeds when there are none); `user_inputs` (--input-shapes / --example-inputs) come
    before the zoo's split and the frontend's feeds. `example_inputs`/`dynamic_shapes` go to
    `winnow.load` (needed for an nn.Module source). `out` is written atomically: on any failure
    nothing is left.
    """
    from winnow import __version__
    from winnow.backends.manifest import check_output
    from winnow.ir.regions import find_regions
    from winnow.driver.report_html import render

    require_extra("winnow analyze (the plots of report.html)", "report", ("matplotlib",))
    check_output(Path(out), overwrite, ANALYSIS_FORMAT)
    timer = TimingInstrument()
    manager = analysis_passes(passes)
    manager.instruments.append(timer)
    timings: dict[str, Any] = {}
    start = time.perf_counter()
    with progress.step("loading the model and its calibration data"):
        src = resolve(source, calibration, user_inputs, example_inputs, dynamic_shapes)
    model, batches, origin = src.model, src.calibration, src.origin
    given = user_inputs_record(model)
    timings["load"] = time.perf_counter() - start
    mark = time.perf_counter()
    regions = find_regions(model).to_dict()
    timings["regions"] = time.perf_counter() - mark
    ctx = PassContext(calibration=batches, options=dict(src.options))
    manager.run(model, ctx)
    timings["passes"] = {name: seconds for name, seconds, _ in timer.records}
    data: dict[str, Any] = {
        "format": ANALYSIS_FORMAT, "format_version": ANALYSIS_VERSION,
        "winnow_version": __version__,
        "source": src.name,
        "passes": manager.text,
        "model": _model_info(model),
        "calibration": {"source": origin, "batches": len(batches), "samples": _samples(batches),
                        **({"shapes": given["shapes"]} if given else {})},
        "regions": regions,
        "analyses": {pass_label(p): ctx.analyses.get(pass_label(p)) for p in manager.passes},
        "timings": timings,
    }
    data["next"] = suggest_compile(data["source"], data["analyses"])
    mark = time.perf_counter()
    with progress.step(f"writing {out}"), staging(out, overwrite, ANALYSIS_FORMAT) as tmp:
        page, plots = render(jsonable(data))
        (tmp / REPORT_FILE).write_text(page, encoding="utf-8")
        timings["report"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - start
        data = jsonable(data)
        text = json.dumps(data, indent=2, allow_nan=False, default=_json_default)
        (tmp / ANALYSIS_FILE).write_text(text + "\n", encoding="utf-8")
        names = [ANALYSIS_FILE, REPORT_FILE]
        manifest = {"format": ANALYSIS_FORMAT, "format_version": ANALYSIS_VERSION,
                    "kind": "analysis", "source": data["source"], "passes": data["passes"],
                    "winnow_version": __version__, "plots": plots,
                    "files": file_entries(tmp, names)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return AnalysisResult(Path(out), data, plots, [*names, MANIFEST_FILE])
