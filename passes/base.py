"""The pass contract: `Pass` and `AnalysisPass` on top of onnx-ir's PassBase, and the registry."""

from __future__ import annotations

import abc
import dataclasses
import importlib.metadata
from typing import Any, ClassVar

import onnx_ir as ir
from onnx_ir.passes import PassBase, PassResult

from winnow.errors import PassRegistrationError, PipelineError
from winnow.passes.config import EmptyConfig, build_config, config_fields
from winnow.passes.pipeline import PASS_NAME

__all__ = ["Pass", "AnalysisPass", "PassResult", "register_pass", "get_pass_class",
           "registered_passes", "plugin_problems", "ENTRY_POINT_GROUP", "ALL_ANALYSES"]

ENTRY_POINT_GROUP = "winnow.passes"
ALL_ANALYSES = frozenset({"*"})


class Pass(PassBase):
    """A winnow pass: a kebab-case `name`, a frozen `Config`, and `call(model) -> PassResult`.

    Subclasses set `name`, `description`, optionally `Config` (a frozen dataclass whose
    fields are declared with `winnow.passes.config.option`), `preserves` (names of
    analyses still valid after the pass; `ALL_ANALYSES` for passes that change nothing
    an analysis reads), `lossless` (False for passes that change the outputs) and `trains`
    (True for passes that train weights, as `distill` does: slow, and not repeatable when their
    training is bounded in seconds, so the search keeps the models such trials made instead of
    running their pipelines again).
    Shared state is reached through `PassContext.current()`. A pass that needs the model as
    the pipeline received it (a teacher, as `distill` does) defines
    `see_pipeline_input(model)`: the PassManager calls it before the first pass runs.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    preserves: ClassVar[frozenset[str]] = frozenset()
    lossless: ClassVar[bool] = True
    trains: ClassVar[bool] = False

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

    @classmethod
    def check_definition(cls) -> None:
        """Raise PassRegistrationError when the class cannot be registered: its `name` is not
        kebab-case, or its `Config` is not a dataclass whose every field has a default."""
        where = _class_origin(cls)
        if not isinstance(cls.name, str) or not PASS_NAME.match(cls.name):
            raise PassRegistrationError(
                f"pass name {cls.name!r} of {where} must be kebab-case (lowercase words and "
                "digits joined by '-', e.g. 'dedup-weights').")
        if not dataclasses.is_dataclass(cls.Config) or not cls.Config.__dataclass_params__.frozen:
            raise PassRegistrationError(
                f"{where}.Config must be a frozen dataclass (@dataclass(frozen=True)).")
        for f in dataclasses.fields(cls.Config):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PassRegistrationError(
                    f"option '{f.name}' of pass '{cls.name}' ({where}) has no default; declare "
                    "it with option(default, help) so the pass runs when the option is not given.")

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
_ORIGINS: dict[str, str] = {}  # pass name -> where its class came from (for duplicate messages)
_PLUGIN_PROBLEMS: dict[str, str] = {}  # entry-point name -> why that plugin was skipped
_ENTRY_POINTS_LOADED = False


def register_pass(cls: type[Pass], *, origin: str | None = None) -> type[Pass]:
    """Class decorator: register a pass under its kebab-case `name`.

    Raises PassRegistrationError when the class is malformed (`Pass.check_definition`) or the
    name is taken by another class; `origin` names where the class came from in that message.
    """
    origin = origin or _class_origin(cls)
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PassRegistrationError(f"{origin} is not a subclass of winnow.passes.Pass.")
    cls.check_definition()
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise PassRegistrationError(f"pass name '{cls.name}' of {origin} is already registered "
                                    f"by {_ORIGINS.get(cls.name, _class_origin(existing))}.")
    _REGISTRY[cls.name] = cls
    _ORIGINS.setdefault(cls.name, origin)
    return cls


def _class_origin(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


def _load_builtin_and_plugins() -> None:
    global _ENTRY_POINTS_LOADED
    import winnow.passes.analysis  # noqa: F401  (registers built-ins)
    import winnow.passes.rewrite  # noqa: F401

    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        problem = _load_plugin(ep)
        if problem:
            _PLUGIN_PROBLEMS[ep.name] = problem


def entry_point_origin(ep: importlib.metadata.EntryPoint) -> str:
    """'entry point 'NAME = module:Class' of distribution 'DIST VERSION'' for messages."""
    dist = getattr(ep, "dist", None)
    where = (f"distribution '{dist.name} {dist.version}'" if dist is not None
             else "an unknown distribution")
    return f"entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP}) of {where}"


def _load_plugin(ep: importlib.metadata.EntryPoint) -> str | None:
    """Import and register one plugin; the sentence saying why it was skipped, or None."""
    origin = entry_point_origin(ep)
    dist = getattr(ep, "dist", None)
    fix = f"fix or uninstall '{dist.name}'" if dist is not None else "fix or uninstall it"
    try:
        cls = ep.load()
    except Exception as exc:  # noqa: BLE001 - any import-time failure of foreign code
        detail = (str(exc).strip().splitlines() or [""])[0]
        return f"{origin} failed to import ({type(exc).__name__}: {detail}); {fix}."
    try:
        if isinstance(cls, type) and issubclass(cls, Pass):
            cls.check_definition()  # a bad name or Config is the problem to report, if any
            if cls.name != ep.name:
                raise PassRegistrationError(
                    f"it names pass '{ep.name}' but {_class_origin(cls)} is named '{cls.name}'.")
        register_pass(cls, origin=origin)
    except PassRegistrationError as exc:
        return f"{origin} was skipped: {str(exc).rstrip('.')}; {fix}."
    return None


def plugin_problems() -> list[str]:
    """One sentence per `winnow.passes` plugin that could not be registered (the rest are)."""
    _load_builtin_and_plugins()
    return list(_PLUGIN_PROBLEMS.values())


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name: built-ins and `winnow.passes` entry-point plugins."""
    _load_builtin_and_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    """The pass class registered under `name`; a PipelineError listing valid names, or the
    plugin's PassRegistrationError when the plugin that declares `name` failed to load."""
    passes = registered_passes()
    if name in passes:
        return passes[name]
    if name in _PLUGIN_PROBLEMS:
        raise PassRegistrationError(f"pass '{name}' is unavailable: {_PLUGIN_PROBLEMS[name]}")
    skipped = (f" ({len(_PLUGIN_PROBLEMS)} plugin(s) failed to load; `winnow passes` lists why)"
               if _PLUGIN_PROBLEMS else "")
    raise PipelineError(f"unknown pass '{name}'; registered passes are: {', '.join(passes)}"
                        f"{skipped}.")
