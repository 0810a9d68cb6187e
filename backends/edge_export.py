"""`winnow export OUT --edge`: a self-contained folder to copy to a device.

ORT artifacts give `model.ort` with `model.required_operators.config` (the operator set of ONNX
Runtime's minimal build); TVM artifacts give `model.so`, cross-compiled for the target when the
artifact was built for another one (from the shape-bound `model.onnx` it keeps). Every bundle
holds sample inputs, the host's outputs on them (ONNX Runtime running the artifact's
`model.onnx`), a manifest with checksums, a README and `run.py`, which checks the bundle on the
device with numpy and the runtime only.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from winnow.backends.manifest import (
    BUNDLE_FORMAT,
    MANIFEST_FILE,
    file_entries,
    read_manifest,
    staging,
    verify_files,
    write_manifest,
)
from winnow.errors import ModelFormatError, SourceError, TargetError

RUNNER_FILE = "run.py"
SAMPLES_FILE = "samples.npz"
EXPECTED_FILE = "expected.npz"
README_FILE = "README.md"
TOLERANCE = 1e-4  # max abs error over max(1, max |expected|): another CPU's kernels, same math
EDGE_TARGETS = {"host": None, "aarch64": "aarch64-linux-gnu"}


@dataclasses.dataclass
class Bundle:
    """A written edge bundle: its folder, files and manifest."""

    path: Path
    manifest: dict[str, Any]

    def sizes(self) -> dict[str, int]:
        """Bytes of each file in the bundle."""
        return {name: (self.path / name).stat().st_size for name in
                [*self.manifest["files"], MANIFEST_FILE]}

    def table(self) -> str:
        """The bundle's files and sizes, model and runtime configuration first."""
        lines = [f"wrote     {self.path}/ ({self.manifest['backend']} bundle for "
                 f"{self.manifest['target']})"]
        total = 0
        for name, size in self.sizes().items():
            total += size
            lines.append(f"  {name:<34} {size:>12,} B")
        deploy = sum(self.sizes()[n] for n in self.manifest["deploy_files"])
        lines.append(f"  {'total':<34} {total:>12,} B  (model + runtime config: {deploy:,} B)")
        lines.append(f"check on the device: cd {self.path.name} && python3 {RUNNER_FILE}")
        return "\n".join(lines)


def sample_feeds(manifest: dict[str, Any]) -> tuple[dict[str, np.ndarray], str]:
    """Inputs for the samples: the zoo model's held-out data when its shapes fit the artifact's,
    else random feeds; fixed dims as the artifact has them, symbolic ones batch 1."""
    from winnow.driver.bench import build_feeds

    specs = manifest.get("inputs") or []
    first = (specs[0].get("shape") or [1]) if specs else [1]
    batch = first[0] if isinstance(first[0], int) and first[0] > 0 else 1
    seq = first[1] if len(first) > 1 and isinstance(first[1], int) else None
    try:
        feeds, described = build_feeds(manifest, batch, seq)
    except SourceError:
        feeds, described = None, ""
    if feeds is None or not _fits(specs, feeds):
        feeds, described = build_feeds(manifest, batch, seq, random=True)
    return feeds, described


def _fits(specs: list[dict[str, Any]], feeds: dict[str, np.ndarray]) -> bool:
    """True when every fixed dim of every input matches the feeds."""
    for spec in specs:
        shape = np.shape(feeds[spec["name"]])
        dims = spec.get("shape") or []
        if len(shape) != len(dims) or any(isinstance(d, int) and d != s
                                          for d, s in zip(dims, shape)):
            return False
    return True


def host_outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime's outputs of the artifact's model.onnx on this host: what the device must
    reproduce."""
    import onnxruntime as ort

    from winnow.ir.execute import session_options

    session = ort.InferenceSession(str(model_path), session_options(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _check_target(target: str) -> str:
    if target not in EDGE_TARGETS:
        raise TargetError(f"unknown target '{target}'; valid targets are: "
                          f"{', '.join(EDGE_TARGETS)}.")
    return target


def _ort_files(artifact: Path, manifest: dict[str, Any], tmp: Path) -> tuple[str, list[str]]:
    """Copy the ORT-format model and its operator config; returns (model, deploy files)."""
    from winnow.backends.ort import OPS_CONFIG_FILE, ORT_FILE

    if ORT_FILE not in manifest.get("files", {}):
        reason = (manifest.get("ort_format") or {}).get("error") or "it was not written"
        raise ModelFormatError(f"artifact '{artifact}' has no {ORT_FILE} ({reason}); an ORT edge "
                               "bundle needs it: recompile, or compile with --backend tvm.")
    names = [ORT_FILE] + ([OPS_CONFIG_FILE] if OPS_CONFIG_FILE in manifest["files"] else [])
    for name in names:
        shutil.copy2(artifact / name, tmp / name)
    return ORT_FILE, names


def _tvm_files(artifact: Path, manifest: dict[str, Any], tmp: Path,
               target: str) -> tuple[str, list[str], dict[str, Any]]:
    """Copy the library when it was built for `target`, else build it from the artifact's
    shape-bound model.onnx; returns (model, deploy files, build description)."""
    import onnx_ir as ir

    from winnow.backends import tvm as tvm_backend

    built = manifest.get("tvm") or {}
    if built.get("target") == target:
        shutil.copy2(artifact / tvm_backend.LIBRARY_FILE, tmp / tvm_backend.LIBRARY_FILE)
        return tvm_backend.LIBRARY_FILE, [tvm_backend.LIBRARY_FILE], built
    spec = tvm_backend.resolve_target(target)
    model = ir.load(artifact / tvm_backend.MODEL_FILE)
    info = tvm_backend.compile_library(model, tmp, spec, built.get("schedules", "winnow"))
    return tvm_backend.LIBRARY_FILE, [tvm_backend.LIBRARY_FILE], info


def export_edge(artifact: str | Path, out: str | Path, *, target: str | None = None,
                overwrite: bool = False) -> Bundle:
    """Write the edge bundle of compiled artifact `artifact` for `target` (default: the
    artifact's own target) to `out`, atomically."""
    from winnow.backends.ort import MODEL_FILE

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    verify_files(artifact, manifest)
    backend = manifest.get("backend", "ort")
    target = _check_target(target or (manifest.get("tvm") or {}).get("target") or "host")
    if MODEL_FILE not in manifest.get("files", {}):
        raise ModelFormatError(f"artifact '{artifact}' has no {MODEL_FILE}; recompile it.")
    feeds, described = sample_feeds(manifest)
    expected = host_outputs(artifact / MODEL_FILE, feeds)
    with staging(out, overwrite, kind=BUNDLE_FORMAT) as tmp:
        if backend == "ort":
            model, deploy = _ort_files(artifact, manifest, tmp)
            build = None
        elif backend == "tvm":
            model, deploy, build = _tvm_files(artifact, manifest, tmp, target)
        else:
            raise ModelFormatError(f"artifact '{artifact}' names backend '{backend}', which has "
                                   "no edge bundle.")
        np.savez(tmp / SAMPLES_FILE, **feeds)
        names = [o["name"] for o in manifest.get("outputs") or []]
        np.savez(tmp / EXPECTED_FILE, **dict(zip(names, expected)))
        shutil.copy2(Path(__file__).with_name("edge_runner.py"), tmp / RUNNER_FILE)
        (tmp / README_FILE).write_text(readme(backend, target, model, deploy))
        files = [*deploy, SAMPLES_FILE, EXPECTED_FILE, RUNNER_FILE, README_FILE]
        bundle = {
            "format": BUNDLE_FORMAT, "format_version": 1, "backend": backend, "target": target,
            "triple": EDGE_TARGETS[target] or (build or {}).get("triple"),
            "model": model, "deploy_files": deploy, "samples": SAMPLES_FILE,
            "samples_from": described, "expected": EXPECTED_FILE,
            "expected_from": "onnxruntime on the artifact's model.onnx on the compiling host",
            "tolerance": {"abs": TOLERANCE, "scaled_by": "max(1, max |expected|)"},
            "inputs": manifest.get("inputs"), "outputs": manifest.get("outputs"),
            "source": manifest.get("source"), "pipeline": manifest.get("pipeline"),
            "artifact": str(artifact), "build": build,
            "files": file_entries(tmp, files),
        }
        write_manifest(tmp, bundle)
    return Bundle(Path(out), bundle)


def readme(backend: str, target: str, model: str, deploy: list[str]) -> str:
    """The bundle's README: what is in it, how to check it, how to build the runtime."""
    runtime = ("onnxruntime (pip install onnxruntime numpy)" if backend == "ort" else
               "the TVM runtime (pip install apache-tvm numpy; only its runtime is used)")
    text = [f"# winnow edge bundle ({backend}, {target})", "",
            f"- `{model}`: the model" + (" (ONNX Runtime's ORT format)" if backend == "ort"
                                         else " (a shared library for the Relax VM)"),
            *[f"- `{name}`: the operator set ONNX Runtime's minimal build needs"
              for name in deploy if name.endswith(".config")],
            f"- `{SAMPLES_FILE}`, `{EXPECTED_FILE}`: sample inputs and the compiling host's outputs",
            f"- `{RUNNER_FILE}`: checks the bundle on the device; `{MANIFEST_FILE}`: checksums, "
            "shapes, tolerance", "",
            f"Needs Python 3 with numpy and {runtime}; nothing of winnow.", "",
            f"    python3 {RUNNER_FILE}                              # exit 0: outputs match",
            f"    python3 {RUNNER_FILE} --inputs in.npz --out out.npz", ""]
    if backend == "ort":
        text += ["A smaller runtime: build ONNX Runtime with only these operators (from an "
                 "onnxruntime source checkout):", "",
                 "    ./build.sh --config MinSizeRel --minimal_build --build_wheel --skip_tests \\",
                 f"        --include_ops_by_config /path/to/{deploy[-1]} --parallel", ""]
        if target == "aarch64":
            text += ["Run it on the aarch64 device itself, or cross-compile by adding "
                     "`--cmake_extra_defines CMAKE_TOOLCHAIN_FILE=<a toolchain file for "
                     "aarch64-linux-gnu-gcc>`.", ""]
    return "\n".join(text)
