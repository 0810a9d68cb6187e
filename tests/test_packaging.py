"""Packaging: ranges in pyproject.toml, exact pins in constraints.txt, optional packages loaded
only when used, and the core (ONNX in, ORT artifact out) installed alone in a fresh venv."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {"onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "click", "networkx", "pyyaml",
        "tqdm"}
EXTRAS = {"torch", "hf", "tvm", "report", "zoo", "search", "cluster", "dev", "all"}
OPTIONAL_MODULES = ("torch", "transformers", "safetensors", "tokenizers", "sklearn", "scipy",
                    "matplotlib", "PIL", "tvm", "optuna")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _python(code: str, *args: str, python: str = sys.executable,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code, *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_pyproject_has_ranges_the_extras_and_python_3_11_to_3_13():
    project = _project()
    assert project["requires-python"] == ">=3.11,<3.14"
    core = {_name(r) for r in project["dependencies"]}
    assert core == CORE
    assert set(project["optional-dependencies"]) == EXTRAS
    every = project["dependencies"] + [r for reqs in project["optional-dependencies"].values()
                                       for r in reqs]
    assert not [r for r in every if "==" in r], "exact pins belong in constraints.txt"
    assert "torch" in {_name(r) for r in project["optional-dependencies"]["torch"]}
    assert "winnow[torch,hf,tvm,report,zoo,search,cluster]" in project["optional-dependencies"]["all"]


def test_constraints_pin_every_dependency_and_make_install_uses_them():
    pins = _pins()
    project = _project()
    names = {_name(r) for r in project["dependencies"]}
    names |= {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    names -= {"winnow"}
    assert not sorted(n for n in names if n not in pins), "every dependency needs a pin"
    assert pins["torch"] == "2.13.0" and "+" not in pins["torch"]
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt torch==2.13.0" in makefile
    assert "-c constraints.txt -e '.[all,dev]'" in makefile


def test_pyproject_lists_every_package_folder():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    folders = {"winnow." + ".".join(p.parent.relative_to(ROOT).parts)
               for p in ROOT.rglob("__init__.py")
               if p.parent != ROOT
               and not {"tests", "bench", "build", "examples"} & set(p.relative_to(ROOT).parts)
               and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)}
    assert folders - listed == set(), "a package folder the wheel would leave out"


LOAD_PLAIN = """
import sys
import winnow
model = winnow.load(sys.argv[1])
print(len(model.graph))
print(",".join(m for m in sys.argv[2].split(",") if m in sys.modules))
print(",".join(m for m in sys.modules if m.startswith("winnow.models_zoo")))
"""


def test_loading_a_plain_onnx_file_imports_no_optional_package(squeezenet_path):
    result = _python(LOAD_PLAIN, str(squeezenet_path), ",".join(OPTIONAL_MODULES))
    assert result.returncode == 0, result.stderr
    nodes, imported, zoo = result.stdout.splitlines()
    assert int(nodes) > 0
    assert imported == "" and zoo == ""


ZOO_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if the package were not installed
from winnow import models_zoo
from winnow.errors import WinnowError
for name in sys.argv[2].split(","):
    try:
        print(name, "ok", type(models_zoo.get(name)).__name__)
    except WinnowError as exc:
        print(name, "error", type(exc).__name__, exc)
"""


def test_a_zoo_model_does_not_need_the_packages_of_the_others():
    result = _python(ZOO_WITHOUT, "rapidocr_onnxruntime", "digits-cnn,tiny-gpt,ppocr-det")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "digits-cnn ok DigitsModel" and lines[1] == "tiny-gpt ok TinyGPTModel"
    assert lines[2].startswith("ppocr-det error SourceError") and "rapidocr-onnxruntime" in lines[2]


def test_a_missing_extra_is_one_sentence_naming_it():
    result = _python(ZOO_WITHOUT, "torch,sklearn", "digits-cnn,onnx:light_resnet50")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("digits-cnn error MissingExtraError zoo:digits-cnn needs the extra "
                        "winnow[zoo] (pip install 'winnow[zoo]'; missing: torch, sklearn).")
    assert lines[1] == "onnx:light_resnet50 ok OnnxTestModel"


CLI_WITHOUT = """
import sys
sys.modules["torch"] = None
sys.argv = ["winnow", "compile", "zoo:tiny-gpt", "-o", sys.argv[1]]
from winnow.cli import main
main()
"""


def test_cli_reports_a_missing_extra_with_exit_2(tmp_path):
    result = _python(CLI_WITHOUT, str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: zoo:tiny-gpt needs the extra winnow[zoo] (pip install "
                                     "'winnow[zoo]'; missing: torch).")
    assert not (tmp_path / "out").exists()


def _source_copy(dest: Path) -> Path:
    """The files a wheel is built from, copied (building in the shared work tree would write
    build/ and *.egg-info there)."""
    ignore = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests", "bench")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.mark.slow
def test_core_installs_alone_in_a_fresh_venv_and_compiles_an_onnx_file(tmp_path,
                                                                       squeezenet_path):
    """pip installs the core from the package index (constrained to the tested versions):
    about a minute with a warm pip cache."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)  # a plain venv: no system site-packages
    python = str(env_dir / "bin" / "python")
    src = _source_copy(tmp_path / "src")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "-c",
                              str(ROOT / "constraints.txt"), str(src)],
                             capture_output=True, text=True, timeout=900,
                             env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    probe = _python("import importlib.util, sys\n"
                    "print(','.join(m for m in sys.argv[1].split(',') "
                    "if importlib.util.find_spec(m)))", ",".join(OPTIONAL_MODULES), python=python,
                    cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.strip() == "", probe.stdout + probe.stderr
    winnow = str(env_dir / "bin" / "winnow")
    out = tmp_path / "out"
    compiled = subprocess.run([winnow, "--quiet", "compile", str(squeezenet_path), "-o", str(out)],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    assert {"model.onnx", "model.ort", "manifest.json"} <= {p.name for p in out.iterdir()}
    zoo = subprocess.run([winnow, "compile", "zoo:digits-cnn", "-o", str(tmp_path / "zoo")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert zoo.returncode == 2 and "needs the extra winnow[zoo]" in zoo.stderr, zoo.stderr


CORE_CODE = ("ir", "passes", "backends", "cost_model", "driver", "measure", "cli.py", "errors.py",
             "progress.py", "frontend/__init__.py", "frontend/onnx_file.py")
# The TVM backend is the `tvm` extra's code (it calls require_extra first), as the zoo is `zoo`'s
# and the report page's plots (matplotlib) are `report`'s, and distill's training (torch) `torch`'s.
EXTRA_CODE = ("backends/tvm.py", "backends/tvm_schedules.py", "backends/tvm_tuning.py",
              "backends/edge_runner.py", "driver/report_html.py", "ir/torch_exec.py",
              "passes/rewrite/distill.py")


def test_core_code_never_imports_an_optional_package():
    """Not even lazily: a pass, the IR, a backend or the driver must run on the core alone
    (the zoo, the torch / Hugging Face frontends and the report's plots are the extras' code)."""
    import ast

    found = []
    for entry in CORE_CODE:
        path = ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if str(file.relative_to(ROOT)) in EXTRA_CODE:
                continue
            for node in ast.walk(ast.parse(file.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{file.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in OPTIONAL_MODULES and n.split(".")[0] != "optuna"]
    assert found == []
