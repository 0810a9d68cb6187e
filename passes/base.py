"""The pass contract: `Pass` and `AnalysisPass` on top of onnx-ir's PassBase, and the registry."""

from __future__ import annotations

import abc
import importlib.metadata
from typing import Any, ClassVar

import onnx_ir as ir
from onnx_ir.passes import PassBase, PassResult

from winnow.errors import PipelineError
from winnow.passes.config import EmptyConfig, build_config, config_fields

__all__ = ["Pass", "AnalysisPass", "PassResult", "register_pass", "get_pass_class",
           "registered_passes", "ENTRY_POINT_GROUP", "ALL_ANALYSES"]

ENTRY_POINT_GROUP = "winnow.passes"
ALL_ANALYSES = frozenset({"*"})


class Pass(PassBase):
    """A winnow pass: a kebab-case `name`, a frozen `Config`, and `call(model) -> PassResult`.

    Subclasses set `name`, `description`, optionally `Config` (a frozen dataclass whose
    fields are declared with `winnow.passes.config.option`), `preserves` (names of
    analyses still valid after the pass; `ALL_ANALYSES` for passes that change nothing
    an analysis reads) and `lossless` (False for passes that change the outputs).
    Shared state is reached through `PassContext.current()`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    preserves: ClassVar[frozenset[str]] = frozenset()
    lossless: ClassVar[bool] = True

    def __init__(self, config: Any = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("give either a Config instance or keyword options, not both")
        if config is None:
            config = build_config(self.name, self.Config, options)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} expects {self.Config.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config
        self.given_options = tuple(options)  # printed back in pipelines even at their defaults

    @property
    def in_place(self) -> bool:
        """winnow passes edit the model they are given."""
        return True

    @property
    def changes_input(self) -> bool:
        """winnow passes edit the model they are given."""
        return True

    def options(self) -> dict[str, Any]:
        """The config values that differ from their defaults (used to print a pipeline)."""
        return {f["name"]: getattr(self.config, f["name"]) for f in config_fields(self.Config)
                if getattr(self.config, f["name"]) != f["default"]}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class AnalysisPass(Pass):
    """A pass that measures and never edits: its result goes to `ctx.analyses[name]`."""

    preserves = ALL_ANALYSES

    @abc.abstractmethod
    def analyze(self, model: ir.Model) -> Any:
        """Compute the analysis result for the model (a JSON-able dict is best)."""

    def call(self, model: ir.Model) -> PassResult:
        """Run the analysis and store its result in the current context."""
        from winnow.passes.manager import PassContext

        ctx = PassContext.current()
        result = self.analyze(model)
        ctx.analyses[self.name] = result
        ctx.analysis_configs[self.name] = self.config
        ctx.report[self.name] = result
        return PassResult(model, modified=False)


_REGISTRY: dict[str, type[Pass]] = {}
_ENTRY_POINTS_LOADED = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: register a pass under its kebab-case `name`."""
    name = getattr(cls, "name", "")
    if not name or name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"pass name {name!r} of {cls.__name__} must be kebab-case")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"pass name '{name}' is already registered by {existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _load_builtin_and_plugins() -> None:
    global _ENTRY_POINTS_LOADED
    import winnow.passes.analysis  # noqa: F401  (registers built-ins)
    import winnow.passes.rewrite  # noqa: F401

    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Pass):
            register_pass(obj)


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name: built-ins and `winnow.passes` entry-point plugins."""
    _load_builtin_and_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    """The pass class registered under `name`, or a PipelineError listing valid names."""
    passes = registered_passes()
    if name not in passes:
        raise PipelineError(
            f"unknown pass '{name}'; registered passes are: {', '.join(passes)}.")
    return passes[name]
