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

__all__ = ["load", "compile", "analyze", "evaluate", "zoo", "Pass", "AnalysisPass", "PassContext", "PassManager",
           "register_pass", "option", "WinnowError", "__version__"]


def compile(source: Any, out: Any, **kwargs: Any) -> Any:  # noqa: A001 - the public verb
    """Load, optimize and emit a deployable artifact; see `winnow.driver.compile.compile_model`."""
    from winnow.driver.compile import compile_model

    return compile_model(source, out, **kwargs)


def analyze(source: Any, out: Any, **kwargs: Any) -> Any:
    """Run analysis passes and write analysis.json + report.html; see `winnow.driver.analyze.analyze_model`."""
    from winnow.driver.analyze import analyze_model

    return analyze_model(source, out, **kwargs)


def evaluate(reference: Any, candidate: Any, data: Any, **kwargs: Any) -> Any:
    """Fidelity of `candidate` against `reference` on `data`; see `winnow.measure.fidelity.evaluate`."""
    from winnow.measure.fidelity import evaluate as evaluate_fidelity

    return evaluate_fidelity(reference, candidate, data, **kwargs)


def __getattr__(name: str) -> Any:
    """`winnow.zoo` is the model zoo (`winnow.zoo.get("minilm")`), imported on first use."""
    if name == "zoo":
        from winnow import models_zoo

        return models_zoo
    raise AttributeError(f"module 'winnow' has no attribute {name!r}")


def _guard_public_namespaces() -> None:
    """Reading an underscore name of winnow or winnow.passes from outside winnow warns."""
    from winnow.public_api import guard_private_names

    for name in ("winnow", "winnow.passes"):
        guard_private_names(name)


_guard_public_namespaces()
