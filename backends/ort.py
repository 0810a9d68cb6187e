"""ONNX Runtime backend: write `model.onnx`, `model.ort` and `manifest.json`; run artifacts."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from winnow.backends.manifest import (
    MANIFEST_FILE,
    Artifact,
    artifact_manifest,
    param_stats,
    read_manifest,
    staging,
    verify_files,
    write_manifest,
)
from winnow.errors import ExecutionError, runtime_detail
from winnow.frontend.onnx_file import check_external_data
from winnow.ir.execute import (
    LARGE_MODEL_BYTES,
    check_feed_names,
    has_external_data,
    release_large_sessions,
    session_options,
    weight_bytes,
)

__all__ = ["emit", "load_artifact", "run_artifact", "write_model", "convert_to_ort", "Artifact"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ORT_FILE = "model.ort"
OPS_CONFIG_FILE = "model.required_operators.config"
# Protobuf caps a model at 2 GiB; leave room for the graph itself next to the weights.
EXTERNAL_DATA_ABOVE = 2 * 1024**3 - 256 * 1024**2
# The .ort format is one flatbuffer, which holds at most 2 GiB (weights included).
ORT_FORMAT_LIMIT = 2 * 1024**3
DATA_ALIGNMENT = 4096  # page-aligned weights: ONNX Runtime maps them instead of reading a copy

# ORT's converter logs "Created config in <temp folder>" at INFO; the manifest says it instead.
logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)


def emit(model: ir.Model, out_dir: str | Path, *, pipeline_text: str,
         fidelity: dict[str, Any] | None = None, source: str | None = None,
         overwrite: bool = False, external_data: bool | None = None,
         passes: list[dict[str, Any]] | None = None,
         runtime_feeds: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> Artifact:
    """Write the ORT artifact folder `out_dir` atomically and return what was written; `passes`
    (what each pass did, with its report) goes into the manifest. With `runtime_feeds` (feeds by
    batch label) the written model's fastest thread count per batch is measured here and
    recorded as the manifest's `runtime` section, which winnow's runners follow."""
    with staging(out_dir, overwrite) as tmp:
        names = write_model(model, tmp, external_data)
        release_large_sessions()  # the converter loads the weights once more
        ort_format = (convert_to_ort(tmp / MODEL_FILE) if weight_bytes(model) < ORT_FORMAT_LIMIT
                      else _too_big_for_ort_format(model))
        names += ort_format.pop("files")
        manifest = {**artifact_manifest(model, "ort", tmp, names, pipeline_text=pipeline_text,
                                        source=source, passes=passes, fidelity=fidelity),
                    **_versions(), "ort_format": ort_format}
        if runtime_feeds:
            manifest["runtime"] = tune_runtime(model, tmp / MODEL_FILE, runtime_feeds)
        write_manifest(tmp, manifest)
    return Artifact(Path(out_dir), [*names, MANIFEST_FILE], manifest)


def tune_runtime(model: ir.Model, path: Path,
                 feeds: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """The `runtime` manifest section: the fastest intra-op thread count per batch label, or why
    it was not measured (the default, every CPU, then applies)."""
    from winnow.measure.threads import fastest_threads

    if weight_bytes(model) > LARGE_MODEL_BYTES:
        return {"intra_op_num_threads": {}, "note": "not tuned: a large model (one session per "
                "thread count would hold its weights again); every CPU"}
    try:
        return fastest_threads(path, feeds).to_dict()
    except (TypeError, AttributeError, NameError):
        raise  # a mistake in winnow's tuning code, not a model ORT refuses
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"intra_op_num_threads": {}, "note": f"not tuned: {reason}"}


def _versions() -> dict[str, str]:
    from winnow import __version__

    return {"winnow_version": __version__, "onnxruntime_version": ort.__version__,
            "onnx_ir_version": ir.__version__}


def _too_big_for_ort_format(model: ir.Model) -> dict[str, Any]:
    return {"file": None, "files": [],
            "error": f"not converted: the weights ({weight_bytes(model) / 1e9:.2f} GB) exceed the "
                     f"2 GiB a .ort file (one flatbuffer) holds; run model.onnx with "
                     f"{DATA_FILE} instead"}


def write_model(model: ir.Model, folder: Path, external_data: bool | None = None) -> list[str]:
    """Save `model.onnx` in `folder`, its weights in `model.onnx.data` when they are large or
    the source kept them in external files; returns file names.

    Tensors the source keeps in external files are always copied in (streamed, page aligned):
    an artifact never points outside its own folder.
    """
    if external_data is None:
        external_data = (param_stats(model)["bytes"] > EXTERNAL_DATA_ABOVE
                         or has_external_data(model))
    threshold = 256 if external_data else sys.maxsize  # sys.maxsize: inline every tensor
    ir.save(model, folder / MODEL_FILE, external_data=DATA_FILE, size_threshold_bytes=threshold,
            alignment=DATA_ALIGNMENT)
    data = folder / DATA_FILE
    if data.is_file() and data.stat().st_size == 0:
        data.unlink()
    return [MODEL_FILE] + ([DATA_FILE] if data.is_file() else [])


def convert_to_ort(model_path: Path) -> dict[str, Any]:
    """Convert with ORT's own converter; a model ORT refuses is recorded, not raised."""
    # onnxruntime.tools imports torch when installed (seconds): only when converting.
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    folder = model_path.parent
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            convert_onnx_models_to_ort(model_path, output_dir=folder,
                                       optimization_styles=[OptimizationStyle.Fixed])
    except (TypeError, AttributeError, NameError):
        raise  # a mistake in how winnow calls the converter, not a model ORT refuses
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        for name in (ORT_FILE, OPS_CONFIG_FILE):
            (folder / name).unlink(missing_ok=True)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"file": None, "error": f"{type(exc).__name__}: {reason}", "files": []}
    files = [name for name in (ORT_FILE, OPS_CONFIG_FILE) if (folder / name).is_file()]
    return {"file": ORT_FILE, "error": None, "optimization_style": "Fixed", "files": files}


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read an artifact folder's manifest and (by default) check every file's checksum."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return Artifact(path, [*manifest.get("files", {}), MANIFEST_FILE], manifest)


def _session(path: Path, threads: int = 0) -> ort.InferenceSession:
    check_external_data(onnx.load(str(path), load_external_data=False), path.parent)
    try:
        return ort.InferenceSession(str(path), session_options(threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise ExecutionError(f"ONNX Runtime cannot load '{path}': "
                             f"{str(exc).strip().splitlines()[0]}") from exc


def run_artifact(path: str | Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an artifact's `model.onnx` with ONNX Runtime, at the thread count its manifest records
    for this batch (ORT's default when none); returns outputs by name."""
    from winnow.measure.threads import batch_rows, threads_for

    artifact = load_artifact(path)
    session = _session(artifact.path / MODEL_FILE,
                       threads_for(artifact.manifest.get("runtime"), batch_rows(feeds), default=0))
    required = [i.name for i in session.get_inputs()]
    optional = [i.name for i in session.get_overridable_initializers()]
    unknown = sorted(set(feeds) - set(required) - set(optional))
    if unknown:
        takes = ", ".join(required) or ("no required inputs" if optional else "no inputs")
        extra = f" and optionally {', '.join(optional)}" if optional else ""
        raise ExecutionError(f"unknown input(s) {', '.join(unknown)}; the model takes "
                             f"{takes}{extra}.")
    check_feed_names(required, feeds, allow_extra=True)
    names = [o.name for o in session.get_outputs()]
    try:
        outs = session.run(names, dict(feeds))
    except Exception as exc:  # noqa: BLE001
        raise ExecutionError(f"ONNX Runtime failed to run '{artifact.path}': "
                             f"{runtime_detail(exc)}.") from exc
    return dict(zip(names, outs))
