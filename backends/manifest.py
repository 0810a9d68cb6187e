"""Artifact folders: model descriptions, checksums, manifest.json and atomic output folders."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.errors import ModelFormatError, OutputError, OutputExistsError, SourceError
from winnow.ir.user_inputs import model_input_specs, value_spec

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "winnow-artifact"
MANIFEST_VERSION = 1
BUNDLE_FORMAT = "winnow-edge-bundle"
OUTPUT_KINDS = {MANIFEST_FORMAT: "winnow compile artifact", "winnow-analysis": "winnow analyze report",
                BUNDLE_FORMAT: "winnow edge bundle"}


@dataclasses.dataclass
class Artifact:
    """A written artifact folder: its path, the files in it, and its manifest."""

    path: Path
    files: list[str]
    manifest: dict[str, Any]


def io_spec(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    """The model's real inputs (initializer-backed inputs left out) and its outputs."""
    return {"inputs": model_input_specs(model),
            "outputs": [value_spec(v) for v in model.graph.outputs]}


def node_count(model: ir.Model) -> int:
    """Nodes in the model, subgraphs included."""
    return sum(len(graph) for graph in model.graphs())


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Node count per op type (`domain::Op` outside the default domain), most frequent first."""
    counts = collections.Counter(
        node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        for graph in model.graphs() for node in graph)
    return dict(counts.most_common())


def param_stats(model: ir.Model) -> dict[str, int]:
    """Parameter count and bytes, summed over the initializers of every graph."""
    count = size = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None:
                count += math.prod(tensor.shape.numpy())
                size += tensor.nbytes
    return {"count": count, "bytes": size}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of each named file in `folder`."""
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
            for name in names}


def jsonable(obj: Any) -> Any:
    """A copy that strict JSON can hold: non-finite floats as strings, numpy scalars as Python."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def artifact_manifest(model: ir.Model, backend: str, folder: Path, names: list[str], *,
                      pipeline_text: str, source: str | None, passes: list[dict[str, Any]] | None,
                      fidelity: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest fields every backend writes: format, backend, source, pipeline, what each
    pass did, the model's inputs/outputs, node and parameter counts, checksums of `names`."""
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "backend": backend,
        "source": source if source is not None else model.metadata_props.get("winnow.source"),
        "pipeline": pipeline_text,
        "passes": passes or [],
        "ir_version": model.ir_version,
        "opset_imports": dict(model.opset_imports),
        **io_spec(model),
        "nodes": node_count(model),
        "params": param_stats(model),
        "files": file_entries(folder, names),
        "fidelity": fidelity,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` (strict JSON, sorted keys) into `folder`."""
    text = json.dumps(jsonable(manifest), indent=2, sort_keys=True, allow_nan=False, default=str)
    (folder / MANIFEST_FILE).write_text(text + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and validate the manifest of an artifact folder."""
    folder = Path(folder)
    if folder.is_file():
        raise SourceError(f"'{folder}' is a file, not an artifact folder; give the folder "
                          "`winnow compile` wrote (compile the file first: winnow compile "
                          f"{folder} -o OUT).")
    if not folder.is_dir():
        raise SourceError(f"artifact folder '{folder}' does not exist; give a folder written by "
                          "`winnow compile`.")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise SourceError(f"'{folder}' is not a winnow artifact: {MANIFEST_FILE} is missing; give "
                          "a folder written by `winnow compile`.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"'{path}' is not valid JSON ({exc}); recompile the artifact.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ModelFormatError(f"'{path}' is not a winnow manifest (no format "
                               f"'{MANIFEST_FORMAT}'); recompile the artifact.")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise ModelFormatError when a file listed in the manifest is missing or altered."""
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelFormatError(f"manifest of '{folder}' lists '{name}', outside the folder.")
        if not path.is_file():
            raise ModelFormatError(f"artifact '{folder}' is incomplete: '{name}' is missing; "
                                   "recompile it.")
        if sha256_file(path) != entry.get("sha256"):
            raise ModelFormatError(f"'{name}' in '{folder}' does not match its manifest checksum; "
                                   "the artifact was modified or is incomplete, recompile it.")


def check_output(out: Path, overwrite: bool, kind: str = MANIFEST_FORMAT) -> None:
    """Raise OutputError when `out` cannot become a new (or replaced) output folder of `kind`
    (a manifest format: a compile artifact replaces only a compile artifact, and so on)."""
    if out.exists() or out.is_symlink():
        found = _existing_kind(out)
        if found is not None and found != kind:
            raise OutputError(f"output folder '{out}' holds a {OUTPUT_KINDS.get(found, found)}, "
                              f"not a {OUTPUT_KINDS.get(kind, kind)}; choose another path (winnow "
                              "replaces an output only with one of the same kind).")
        if not overwrite:
            raise OutputExistsError(out, "an earlier " + OUTPUT_KINDS.get(kind, kind)
                                    if found else "an empty folder")
    ancestor = Path(os.path.abspath(out)).parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create output folder '{out}': '{ancestor}' is a file, not a "
                          "folder; choose another path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output folder '{out}': '{ancestor}' is not writable; "
                          "choose a folder you can write to.")


def _existing_kind(out: Path) -> str | None:
    """The manifest format of an existing output folder; None for an empty one; OutputError
    for anything winnow did not write (a file, a link, a folder without a manifest)."""
    if not out.is_dir() or out.is_symlink():
        raise OutputError(f"output path '{out}' exists and is not a folder; choose another path.")
    if not any(out.iterdir()):
        return None
    try:
        found = json.loads((out / MANIFEST_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        found = None
    if not isinstance(found, str):
        raise OutputError(f"output folder '{out}' already exists and is not a winnow artifact "
                          f"(no readable {MANIFEST_FILE}); winnow only replaces its own output "
                          "folders, choose another path.")
    return found


def _make_parents(folder: Path) -> list[Path]:
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    for path in reversed(missing):
        path.mkdir()
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for path in folders:
        with contextlib.suppress(OSError):
            path.rmdir()


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.{secrets.token_hex(4)}.old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging(out: str | Path, overwrite: bool = False,
            kind: str = MANIFEST_FORMAT) -> Iterator[Path]:
    """A fresh folder next to `out`; it becomes `out` only when the block completes."""
    out = Path(out)
    check_output(out, overwrite, kind)
    target = Path(os.path.abspath(out))
    created: list[Path] = []
    try:
        created = _make_parents(target.parent)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
        tmp.mkdir()
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"cannot create output folder '{out}': {exc.strerror or exc}; choose a "
                          "folder you can write to.") from None
    try:
        yield tmp
        _swap_into_place(tmp, target)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile, ...
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        file = f" ({exc.filename})" if exc.filename else ""
        raise OutputError(f"cannot write output folder '{out}'{file}: {exc.strerror or exc}; "
                          "free space or choose a folder you can write to.") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
