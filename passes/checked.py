"""The checked lossless rewrite: a pass rewrites a copy of the model, the copy runs against the
model on calibration data, and it replaces the model only when every float output agrees within
`tolerance`; otherwise the model stays as it was, with the reason in the report.

`fuse`, `fuse-convs`, `split-skip-norms` and `trim-padding` are built on it: each says what it
needs (`precondition`), how it rewrites (`rewrite`) and, when it must, on which feeds it is
checked (`check_feeds`).
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from winnow.errors import ExecutionError
from winnow.ir.execute import run
from winnow.passes.base import Pass, PassResult
from winnow.passes.config import option
from winnow.passes.manager import PassContext

logger = logging.getLogger(__name__)
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class CheckOptions:
    """The options of every checked rewrite (a pass's Config inherits them)."""

    tolerance: float = option(1e-4, "largest absolute output difference the rewritten model may "
                              "show against the original on calibration data", min=0.0)
    samples: int = option(8, "calibration samples the check runs (0 = no check)", min=0)


class CheckedRewrite(Pass):
    """A lossless rewrite made on a copy and adopted only when the copy's outputs match."""

    Config: ClassVar[type] = CheckOptions
    # report fields when nothing was rewritten (beside "note" or "skipped")
    unchanged_report: ClassVar[dict[str, Any]] = {}
    # the rewrite runs third-party rewriters that raise on odd graphs: an error skips the pass
    fallible: ClassVar[bool] = False
    # what the check's feeds are, in the reason given when the outputs differ
    checked_on: ClassVar[str] = "calibration data"

    def precondition(self, model: ir.Model) -> str | None:
        """Why the pass has nothing to do on `model` (no copy is made then), else None."""
        return None

    @abc.abstractmethod
    def rewrite(self, model: ir.Model, feeds: list[Feeds]) -> dict[str, Any] | str:
        """Rewrite `model` (the copy) in place: the report fields of what changed, or a note
        saying why nothing did."""

    def check_feeds(self, model: ir.Model, ctx: PassContext) -> list[Feeds] | str:
        """The feeds the copy is checked on, or why there are none to check on."""
        return check_batches(model, ctx, self.config.samples)

    def call(self, model: ir.Model) -> PassResult:
        """Rewrite in place when the rewritten copy passes the check; else leave the model."""
        ctx = PassContext.current()
        note = self.precondition(model)
        if note is not None:
            return self._unchanged(ctx, model, "note", note)
        feeds = self.check_feeds(model, ctx)
        if isinstance(feeds, str):
            return self._skip(ctx, model, feeds)
        trial = model.clone()
        try:
            fields = self.rewrite(trial, feeds)
        except Exception as exc:  # noqa: BLE001 - only when fallible; re-raised otherwise
            if not self.fallible:
                raise
            return self._skip(ctx, model, f"{type(exc).__name__}: {exc}")
        if isinstance(fields, str):
            return self._unchanged(ctx, model, "note", fields)
        try:
            error = max_output_error(model, trial, feeds)
        except ExecutionError as exc:
            return self._skip(ctx, model, f"the rewritten model does not run: {exc}")
        if error > self.config.tolerance:
            return self._skip(ctx, model, f"the rewritten outputs differ by {error:.3g} (more "
                              f"than tolerance {self.config.tolerance:g}) on "
                              f"{self.checked_on}")
        adopt(model, trial)
        ctx.report[self.name] = {**fields, "max_abs_error": error,
                                 "checked_samples": _rows(feeds)}
        return PassResult(model, True)

    def _skip(self, ctx: PassContext, model: ir.Model, reason: str) -> PassResult:
        logger.warning("%s left the model as it was: %s", self.name, reason)
        return self._unchanged(ctx, model, "skipped", reason)

    def _unchanged(self, ctx: PassContext, model: ir.Model, key: str, text: str) -> PassResult:
        ctx.report[self.name] = {**self.unchanged_report, key: text}
        return PassResult(model, False)


def check_batches(model: ir.Model, ctx: PassContext, samples: int) -> list[Feeds]:
    """The first `samples` calibration samples a checked rewrite compares outputs on (none for
    0: no check)."""
    from winnow.passes.analysis.calibration import calibration_batches
    from winnow.passes.analysis.layer_similarity import limit_samples

    if samples == 0:
        return []
    return limit_samples(calibration_batches(model, ctx), samples)


def max_output_error(reference: ir.Model, candidate: ir.Model, batches: list[Feeds]) -> float:
    """Largest absolute difference of any floating output over the batches (0 with none)."""
    worst = 0.0
    for feeds in batches:
        want, got = run(reference, feeds), run(candidate, feeds)
        for name, r in want.items():
            if np.issubdtype(np.asarray(r).dtype, np.floating) and np.size(r):
                diff = np.abs(np.asarray(got[name], np.float64) - np.asarray(r, np.float64))
                worst = max(worst, float(np.nanmax(diff)) if not np.isnan(diff).all() else 0.0)
    return worst


def adopt(model: ir.Model, other: ir.Model) -> None:
    """Give `model` the graph, IR version and functions of `other` (its metadata stays)."""
    model.graph = other.graph
    model.ir_version = other.ir_version
    model.functions.clear()
    model.functions.update(other.functions)


def _rows(batches: list[Feeds]) -> int:
    return sum(int(next(iter(b.values())).shape[0]) for b in batches if b)
