"""winnow: a model compiler that finds and removes redundancy from neural networks."""

from __future__ import annotations

from typing import Any

from winnow.errors import WinnowError
from winnow.frontend import load
from winnow.passes import (
    AnalysisPass,
    Pass,
    PassContext,
    PassManager,
    option,
    register_pass,
)

__version__ = "0.1.0"

__all__ = ["load", "compile", "analyze", "Pass", "AnalysisPass", "PassContext", "PassManager",
           "register_pass", "option", "WinnowError", "__version__"]


def compile(source: Any, out: Any, **kwargs: Any) -> Any:  # noqa: A001 - the public verb
    """Load, optimize and emit a deployable artifact; see `winnow.compiler.compile_model`."""
    from winnow.compiler import compile_model

    return compile_model(source, out, **kwargs)


def analyze(source: Any, out: Any, **kwargs: Any) -> Any:
    """Run analysis passes and write analysis.json + report.html; see `winnow.analyzer.analyze_model`."""
    from winnow.analyzer import analyze_model

    return analyze_model(source, out, **kwargs)
