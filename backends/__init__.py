"""Backends: emit deployable artifacts (ONNX Runtime, TVM) and run them."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BACKENDS = {"ort": "winnow.backends.ort", "tvm": "winnow.backends.tvm"}


def backend_module(name: str) -> Any:
    """The module of backend `name`, or a WinnowError listing the valid backends."""
    from winnow.errors import WinnowError

    if name not in BACKENDS:
        raise WinnowError(f"unknown backend '{name}'; valid backends are: {', '.join(BACKENDS)}.")
    return importlib.import_module(BACKENDS[name])


def run_artifact(path: str | Path, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """Run an artifact folder with the backend its manifest names; returns outputs by name."""
    from winnow.backends.manifest import read_manifest

    return backend_module(read_manifest(path).get("backend", "ort")).run_artifact(path, feeds)
