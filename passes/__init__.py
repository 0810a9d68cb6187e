"""The pass SDK: base classes, registry, pipeline text, context and manager."""

from winnow.passes.base import (
    ALL_ANALYSES,
    AnalysisPass,
    Pass,
    PassResult,
    get_pass_class,
    plugin_problems,
    register_pass,
    registered_passes,
)
from winnow.passes.config import option
from winnow.passes.manager import DEFAULT_PIPELINE, LOSSLESS_PIPELINE, PassContext, PassManager
from winnow.passes.pipeline import PassSpec, format_pipeline, parse_pipeline

__all__ = ["ALL_ANALYSES", "AnalysisPass", "Pass", "PassResult", "get_pass_class", "plugin_problems",
           "register_pass", "registered_passes", "option", "DEFAULT_PIPELINE", "LOSSLESS_PIPELINE",
           "PassContext", "PassManager",
           "PassSpec", "format_pipeline", "parse_pipeline", "RulePass", "CheckedRewrite"]


def __getattr__(name: str):
    """`RulePass` and `CheckedRewrite` are imported on first use (they import onnxscript's
    rewriter and ONNX Runtime)."""
    if name == "RulePass":
        from winnow.passes.rule_pass import RulePass

        return RulePass
    if name == "CheckedRewrite":
        from winnow.passes.checked import CheckedRewrite

        return CheckedRewrite
    raise AttributeError(f"module 'winnow.passes' has no attribute {name!r}")
