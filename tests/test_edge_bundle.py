"""Edge bundles: self-contained (the runner works from an empty folder with winnow unimportable),
aarch64 libraries are Arm ELF files with TVM's entry points, and the aarch64 bundles compute the
host's outputs under qemu-user (opt-in: WINNOW_EMULATION_TESTS=1, `make test-edge`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from winnow.cli import cli

ELF_MACHINE_AARCH64 = 183
# Run a bundle's run.py with every import of winnow failing: proof it needs nothing of winnow.
ISOLATED_RUNNER = ("import runpy, sys; sys.modules['winnow'] = None; sys.argv = ['run.py']; "
                   "runpy.run_path('run.py', run_name='__main__')")


def small_cnn() -> onnx.ModelProto:
    """Conv + Relu + Gemm on 6x6 images, symbolic batch."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("k", (4, 2, 3, 3)), ("kb", (4,)), ("w", (3, 144)), ("b", (3,)))]
    nodes = [helper.make_node("Conv", ["x", "k", "kb"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def invoke(*args):
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """An ORT artifact and a host TVM artifact of the small CNN (batch 2)."""
    folder = tmp_path_factory.mktemp("artifacts")
    src = folder / "cnn.onnx"
    onnx.save(small_cnn(), src)
    found = {}
    for backend in ("ort", "tvm"):
        if backend == "tvm":
            pytest.importorskip("tvm", reason="the TVM backend needs the extra winnow[tvm]")
        out = folder / backend
        result = invoke("compile", src, "-o", out, "--backend", backend,
                        "--input-shapes", "x=2,2,6,6")
        assert result.exit_code == 0, result.output
        found[backend] = out
    return found


def copy_to_empty(bundle: Path, tmp_path: Path) -> Path:
    """The bundle copied alone into a new folder (as onto a device)."""
    device = tmp_path / "device"
    device.mkdir()
    return Path(shutil.copytree(bundle, device / "bundle"))


def run_isolated(folder: Path) -> subprocess.CompletedProcess:
    """The bundle's runner under this Python, isolated (-I), with winnow unimportable."""
    return subprocess.run([sys.executable, "-I", "-c", ISOLATED_RUNNER], cwd=folder,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_host_bundle_runs_alone(artifacts, tmp_path, backend):
    if backend not in artifacts:
        pytest.skip("no TVM")
    out = tmp_path / "bundle"
    result = invoke("export", artifacts[backend], "--edge", "-o", out)
    assert result.exit_code == 0, result.output
    assert "model + runtime config" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "winnow-edge-bundle" and manifest["target"] == "host"
    expected_files = {"ort": {"model.ort", "model.required_operators.config"},
                      "tvm": {"model.so"}}[backend]
    assert expected_files <= set(manifest["files"]) and set(manifest["deploy_files"]) == expected_files
    device = copy_to_empty(out, tmp_path)
    ran = run_isolated(device)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "passed" in ran.stdout
    if backend == "tvm":
        return  # the check below is the runner's own logic, the same for both backends
    # The check can fail: a wrong expected output makes the runner exit 1.
    with np.load(device / "expected.npz") as data:
        wrong = {k: data[k] + 1.0 for k in data.files}
    np.savez(device / "expected.npz", **wrong)
    manifest["files"]["expected.npz"]["sha256"] = hashlib.sha256(
        (device / "expected.npz").read_bytes()).hexdigest()
    (device / "manifest.json").write_text(json.dumps(manifest))
    ran = run_isolated(device)
    assert ran.returncode == 1 and "FAIL" in ran.stdout


def test_ort_operator_config_lists_the_models_ops(artifacts, tmp_path):
    out = tmp_path / "bundle"
    assert invoke("export", artifacts["ort"], "--edge", "-o", out,
                  "--target", "aarch64").exit_code == 0
    config = (out / "model.required_operators.config").read_text()
    assert "Gemm" in config and "Conv" in config
    assert "--include_ops_by_config" in (out / "README.md").read_text()


def _elf_machine(path: Path) -> int:
    """e_machine of an ELF file (little endian, 64-bit)."""
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return struct.unpack_from("<H", header, 18)[0]


def test_aarch64_tvm_bundle_is_an_arm_library(artifacts, tmp_path):
    if "tvm" not in artifacts:
        pytest.skip("no TVM")
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc is not installed (apt-get install gcc-aarch64-linux-gnu)")
    out = tmp_path / "bundle"
    result = invoke("export", artifacts["tvm"], "--edge", "-o", out, "--target", "aarch64")
    assert result.exit_code == 0, result.output
    library = out / "model.so"
    assert _elf_machine(library) == ELF_MACHINE_AARCH64
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-D", "--defined-only", str(library)],
                             capture_output=True, text=True, check=True).stdout
    assert "__tvm_ffi__library_bin" in symbols and "__tvm_ffi_fused_conv2d" in symbols
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["target"] == "aarch64" and manifest["triple"] == "aarch64-linux-gnu"


def test_bad_exports_write_nothing(artifacts, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    result = invoke("export", artifacts["ort"], "--edge", "-o", out, "--target", "riscv128")
    assert result.exit_code == 2 and "unknown target 'riscv128'" in result.output
    result = invoke("export", tmp_path / "no-such-artifact", "--edge", "-o", out)
    assert result.exit_code == 2 and "does not exist" in result.output
    if "tvm" in artifacts:
        monkeypatch.setenv("PATH", str(tmp_path))  # no aarch64-linux-gnu-gcc on it
        result = invoke("export", artifacts["tvm"], "--edge", "-o", out, "--target", "aarch64")
        assert result.exit_code == 2 and "apt-get install gcc-aarch64-linux-gnu" in result.output
    assert not out.exists() and os.listdir(tmp_path) == []


# ---- on an emulated Arm CPU ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("WINNOW_EMULATION_TESTS") != "1",
                    reason="emulated aarch64 runs take minutes: make test-edge "
                           "(WINNOW_EMULATION_TESTS=1)")
@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_aarch64_bundle_matches_host_under_qemu(artifacts, tmp_path, backend):
    from tests import aarch64_userland as arm

    problem = arm.unavailable()
    if problem:
        pytest.skip(problem)
    if not arm.PYTHON.is_file():
        arm.build()
    if backend not in artifacts:
        pytest.skip("no TVM")
    out = tmp_path / "bundle"
    result = invoke("export", artifacts[backend], "--edge", "-o", out, "--target", "aarch64")
    assert result.exit_code == 0, result.output
    device = copy_to_empty(out, tmp_path)
    ran = arm.run(device / "run.py")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "bundle check on aarch64" in ran.stdout and "passed" in ran.stdout
