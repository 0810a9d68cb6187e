"""PassContext (shared state, TVM style) and PassManager (runs a pipeline with instruments)."""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
from onnx_ir.passes import PassBase, PassResult

from winnow.errors import LosslessPassError, PassFailedError, PipelineError, WinnowError
from winnow.passes.base import ALL_ANALYSES, AnalysisPass, Pass, get_pass_class
from winnow.passes.instruments import Instrument, LosslessGuard
from winnow.passes.pipeline import PassSpec, format_pipeline, format_value, parse_pipeline

DEFAULT_PIPELINE = "shape-inference,fold-constants,canonicalize,cse,dce"
# Lossless, checked passes that go after the structural ones: fuse-convs folds what pruning and
# distill read in its exported form; split-skip-norms keeps residual adds and layer norms apart
# (ORT's fused SkipLayerNormalization CPU kernel is the slower form); trim-padding crops the sequence axis at run time, which leaves
# the shapes that pruning, fusion, distill and the cost model read unknown. They go before the
# numerics passes: dynamic int8 takes its scales over every position of a tensor, padding included,
# so on a quantized model cropping changes the outputs and is refused.
FINISHING_PIPELINE = "fuse-convs,split-skip-norms,trim-padding"
NUMERICS_PASSES = ("smooth-activations", "split-outliers", "quantize", "bfp", "lmul")


def finished(pipeline: str, at_end: bool = False) -> str:
    """`pipeline` with those finishing passes it lacks before its first numerics pass (at its end
    when it has none, or with `at_end`: a model already made by the whole pipeline)."""
    specs = parse_pipeline(pipeline) if pipeline.strip() else []
    present = {s.name for s in specs}
    missing = [f for f in parse_pipeline(FINISHING_PIPELINE) if f.name not in present]
    if not missing:
        return pipeline
    at = len(specs) if at_end else next(
        (i for i, s in enumerate(specs) if s.name in NUMERICS_PASSES), len(specs))
    return format_pipeline(specs[:at] + missing + specs[at:])


# What `winnow compile` runs without --pipeline on the ORT backend.
LOSSLESS_PIPELINE = finished(DEFAULT_PIPELINE)

_CURRENT: contextvars.ContextVar[PassContext | None] = contextvars.ContextVar(
    "winnow_pass_context", default=None)


@dataclasses.dataclass
class PassContext:
    """State shared by the passes of one run: target, calibration data, analyses, report."""

    target: str | None = None
    calibration: Any = None
    training: Any = None  # unlabelled batches (or a callable giving them) that distill trains on
    analyses: dict[str, Any] = dataclasses.field(default_factory=dict)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    analysis_configs: dict[str, Any] = dataclasses.field(default_factory=dict)
    _tokens: list = dataclasses.field(default_factory=list, repr=False)

    @classmethod
    def current(cls) -> PassContext:
        """The active context; a fresh empty one when no PassManager is running."""
        ctx = _CURRENT.get()
        if ctx is None:
            ctx = cls()
            _CURRENT.set(ctx)
        return ctx

    def __enter__(self) -> PassContext:
        self._tokens.append(_CURRENT.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self._tokens.pop())

    def get_analysis(self, name: str, model: ir.Model, **options: Any) -> Any:
        """The cached result of analysis `name` when it was computed with these `options`
        (any cached result when none are given), otherwise computed now."""
        analysis = get_pass_class(name)(**options)
        cached = self.analysis_configs.get(name)
        matches = cached is not None and all(
            getattr(cached, key) == getattr(analysis.config, key) for key in options)
        if name not in self.analyses or not matches:
            with self:
                analysis(model)
        return self.analyses[name]

    def invalidate(self, preserved: frozenset[str]) -> None:
        """Drop every cached analysis not in `preserved`."""
        if preserved == ALL_ANALYSES:
            return
        for name in list(self.analyses):
            if name not in preserved:
                del self.analyses[name]
                self.analysis_configs.pop(name, None)


def build_pass(spec: PassSpec) -> Pass:
    """Instantiate the registered pass for one pipeline element."""
    cls = get_pass_class(spec.name)
    return cls(**dict(spec.options))


def build_pipeline(pipeline: str | Sequence[PassSpec | PassBase]) -> list[PassBase]:
    """Turn pipeline text, specs or pass objects into pass instances (errors name the pass)."""
    items = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    passes: list[PassBase] = []
    for item in items:
        if isinstance(item, str):  # a list may mix pipeline text and pass objects
            passes += [build_pass(spec) for spec in parse_pipeline(item)]
        elif isinstance(item, PassSpec):
            passes.append(build_pass(item))
        elif isinstance(item, PassBase):
            passes.append(item)
        else:
            raise PipelineError(f"pipeline element {item!r} is neither a pass, a pass name nor "
                                "a pass spec.")
    return passes


def pass_label(p: PassBase) -> str:
    """The name a pass has in pipelines and messages (class name for foreign passes)."""
    return getattr(p, "name", "") or type(p).__name__


def describe_pipeline(passes: Sequence[PassBase]) -> str:
    """Pipeline text for instantiated passes (foreign onnx-ir passes print as class names)."""
    specs = []
    for p in passes:
        opts = _printed_options(p)
        specs.append(PassSpec(pass_label(p), tuple((k, format_value(v)) for k, v in opts.items())))
    return format_pipeline(specs)


def _printed_options(p: PassBase) -> dict[str, Any]:
    """The options to print: every one the user gave (even at its default, in the order given),
    then the others that differ from their defaults."""
    if not isinstance(p, Pass):
        return {}
    given = [k for k in getattr(p, "given_options", ()) if hasattr(p.config, k)]
    return {**{k: getattr(p.config, k) for k in given}, **p.options()}


class PassManager:
    """Runs passes in order under a PassContext, with instruments around each pass."""

    def __init__(self, pipeline: str | Sequence[PassSpec | PassBase] = DEFAULT_PIPELINE,
                 instruments: Sequence[Instrument] = ()) -> None:
        self.passes = build_pipeline(pipeline)
        self.instruments = list(instruments)

    @property
    def text(self) -> str:
        """The pipeline as text."""
        return describe_pipeline(self.passes)

    def run(self, model: ir.Model, ctx: PassContext | None = None,
            guard: LosslessGuard | None = None) -> PassResult:
        """Run every pass on `model` in place; a failure names the pass and those before it.

        With a `guard`, the model is checked after every lossless rewrite pass; a pass the
        guard rejects, or one that raised, is rolled back (when the guard is strict, it fails
        the run instead).
        """
        ctx = ctx or _CURRENT.get() or PassContext()  # a surrounding `with PassContext()`
        modified_any = False
        done: list[str] = []
        with ctx:
            for p in self.passes:  # passes that need the model as the pipeline received it
                if hasattr(p, "see_pipeline_input"):
                    p.see_pipeline_input(model)
            for index, p in enumerate(self.passes):
                label = pass_label(p)
                for inst in self.instruments:
                    inst.before_pass(index, label, model)
                model, result = _apply(p, label, model, guard, done)
                modified_any |= result.modified
                if result.modified:
                    ctx.invalidate(getattr(p, "preserves", frozenset()))
                for inst in self.instruments:
                    try:
                        inst.after_pass(index, label, model, result.modified)
                    except WinnowError as exc:
                        raise _pass_failure(label, done, exc) from exc
                done.append(label)
        return PassResult(model, modified_any)


def _apply(p: PassBase, label: str, model: ir.Model, guard: LosslessGuard | None,
           done: list[str]) -> tuple[ir.Model, PassResult]:
    """Run one pass; under a guard, a lossless rewrite that changed the outputs or raised is
    rolled back to a copy taken before it (or fails the run when the guard is strict)."""
    guarded = guard is not None and getattr(p, "lossless", True) and not isinstance(p, AnalysisPass)
    snapshot = clone_model(model) if guarded else None
    try:
        result = p(model)
    except Exception as exc:  # noqa: BLE001 - re-raised with the pass named
        if not guarded or guard.strict or isinstance(exc, WinnowError):
            raise _pass_failure(label, done, exc) from exc
        guard.record_crash(label, exc)
        return snapshot, PassResult(snapshot, False)
    if not guarded:
        if guard is not None and result.modified:
            guard.rebase(result.model)
        return result.model, result
    if guard.accept(label, result.model):
        return result.model, result
    if guard.strict:
        raise LosslessPassError(guard.describe(label, done))
    return snapshot, PassResult(snapshot, False)


def clone_model(model: ir.Model) -> ir.Model:
    """A structural copy of `model` that shares its tensors (weights are not copied)."""
    copy = model.clone()
    copy.meta.update(model.meta)
    return copy


def _pass_failure(label: str, done: list[str], exc: Exception) -> PassFailedError:
    before = ", ".join(done) if done else "none"
    reason = str(exc).strip() or type(exc).__name__
    return PassFailedError(f"pass '{label}' failed (passes run before it: {before}): {reason}")
