"""What is public API, listed in one place, and a warning when code outside winnow reads a private
(underscore) name from one of the public modules.

Public names keep working across minor versions (a change is announced by a DeprecationWarning
first); everything else — other modules, names starting with `_` — may change without notice.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from pathlib import Path

PUBLIC_API: dict[str, tuple[str, ...]] = {
    "winnow": ("load", "compile", "analyze", "evaluate", "zoo", "Pass", "AnalysisPass",
               "PassContext", "PassManager", "register_pass", "option", "WinnowError",
               "__version__"),
    "winnow.passes": ("ALL_ANALYSES", "AnalysisPass", "Pass", "PassResult", "get_pass_class",
                      "plugin_problems", "register_pass", "registered_passes", "option",
                      "DEFAULT_PIPELINE", "LOSSLESS_PIPELINE", "PassContext", "PassManager",
                      "PassSpec",
                      "format_pipeline", "parse_pipeline", "RulePass", "CheckedRewrite"),
    "winnow.passes.instruments": ("Instrument", "TimingInstrument", "DumpIRInstrument",
                                  "VerifyInstrument", "RecordInstrument"),
    "winnow.testing": ("mlp", "transformer_block", "gqa_attention", "conv_block", "random_inputs",
                       "assert_equivalent", "assert_valid", "run_pass", "PassRun", "OPSET"),
    "winnow.ir.execute": ("run",),
    "winnow.ir.inputs": ("random_feeds", "feeds_for"),
    "winnow.ir.verify": ("verify", "lint"),
    "winnow.ir.regions": ("find_regions", "Region", "RegionMap"),
    "winnow.errors": ("WinnowError", "SourceError", "ModelFormatError", "UnsupportedModelError",
                      "PipelineError", "PassConfigError", "PassRegistrationError",
                      "PassFailedError", "VerificationError", "ExecutionError", "OutputError",
                      "FidelityError", "MissingExtraError"),
}

# The namespaces whose private names warn when read from outside winnow.
GUARDED_MODULES = ("winnow", "winnow.passes", "winnow.testing")

_PACKAGE_ROOT = Path(__file__).resolve().parent
_OUTSIDE_FOLDERS = {".venv", "venv", "examples", "build"}  # under the source tree, not winnow


class PrivateNameWarning(FutureWarning):
    """A private winnow name was imported from outside winnow; it may change without notice."""


def _is_outside_winnow(frame: types.FrameType | None) -> bool:
    """True when `frame` runs code that is neither winnow's nor Python's import machinery."""
    while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
        frame = frame.f_back
    if frame is None:
        return False
    if frame.f_code.co_filename.startswith("<"):  # exec'd text, an interactive prompt
        return True
    try:
        inside = Path(frame.f_code.co_filename).resolve().relative_to(_PACKAGE_ROOT)
    except ValueError:
        return True
    return inside.parts[0] in _OUTSIDE_FOLDERS


class _GuardedModule(types.ModuleType):
    """A module whose underscore names warn when read from outside winnow."""

    def __getattribute__(self, name: str):
        value = super().__getattribute__(name)  # a name that is not there raises, unwarned
        if name[:1] == "_" and name[:2] != "__" and _is_outside_winnow(sys._getframe(1)):
            module = super().__getattribute__("__name__")
            warnings.warn(f"{module}.{name} is private and may change without notice; use the "
                          f"public API listed in winnow.public_api.PUBLIC_API.",
                          PrivateNameWarning, stacklevel=2)
        return value


def guard_private_names(module_name: str) -> None:
    """Make reading an underscore name of `module_name` from outside winnow warn."""
    module = sys.modules[module_name]
    if type(module) is types.ModuleType:
        module.__class__ = _GuardedModule


def missing_public_names() -> list[str]:
    """Names PUBLIC_API lists that their module does not define (a test keeps this empty)."""
    missing = []
    for module_name, names in PUBLIC_API.items():
        module = importlib.import_module(module_name)
        missing += [f"{module_name}.{n}" for n in names if not hasattr(module, n)]
    return missing
