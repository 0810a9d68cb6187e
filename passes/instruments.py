"""Pass instruments: hooks around each pass for timing, IR dumps and verification."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from winnow.errors import OutputError


class Instrument:
    """Base instrument: override `before_pass` and/or `after_pass`."""

    def before_pass(self, index: int, name: str, model: ir.Model) -> None:
        """Called before pass number `index` runs."""

    def after_pass(self, index: int, name: str, model: ir.Model, modified: bool) -> None:
        """Called after pass number `index` ran."""


class TimingInstrument(Instrument):
    """Records wall time per pass: `records` is a list of (name, seconds, modified)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, bool]] = []
        self._start = 0.0

    def before_pass(self, index: int, name: str, model: ir.Model) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def after_pass(self, index: int, name: str, model: ir.Model, modified: bool) -> None:
        """Stop the clock and record."""
        self.records.append((name, time.perf_counter() - self._start, modified))

    def table(self) -> str:
        """A plain-text table of the recorded timings."""
        width = max([len(n) for n, _, _ in self.records] + [4])
        lines = [f"{'pass':<{width}}  {'seconds':>8}  modified"]
        for name, seconds, modified in self.records:
            lines.append(f"{name:<{width}}  {seconds:>8.3f}  {'yes' if modified else 'no'}")
        total = sum(s for _, s, _ in self.records)
        lines.append(f"{'total':<{width}}  {total:>8.3f}")
        return "\n".join(lines)


_DUMP_NAME = re.compile(r"^\d{2,}-[^/]+\.(before|after)\.txt$")


def _clear_dump_folder(directory: Path) -> None:
    """Remove an earlier run's dumps from `directory`; OutputError when it holds other files."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise OutputError(f"the IR dump path '{directory}' is a file, not a folder; give a folder.")
    entries = list(directory.iterdir())
    others = [p.name for p in entries if not (p.is_file() and _DUMP_NAME.match(p.name))]
    if others:
        raise OutputError(f"the IR dump folder '{directory}' holds files that are not IR dumps "
                          f"({', '.join(sorted(others)[:3])}); give an empty or new folder.")
    for path in entries:
        path.unlink()


class DumpIRInstrument(Instrument):
    """Writes the IR as text before and after each pass: `DIR/NN-name.before.txt`/`.after.txt`.

    The dumps of an earlier run in DIR are removed first (two runs never mix); a DIR that holds
    anything else is refused."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        _clear_dump_folder(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _write(self, index: int, name: str, stage: str, model: ir.Model) -> None:
        path = self.directory / f"{index:02d}-{name}.{stage}.txt"
        path.write_text(str(model))

    def before_pass(self, index: int, name: str, model: ir.Model) -> None:
        """Dump the IR the pass receives."""
        self._write(index, name, "before", model)

    def after_pass(self, index: int, name: str, model: ir.Model, modified: bool) -> None:
        """Dump the IR the pass produced."""
        self._write(index, name, "after", model)


class VerifyInstrument(Instrument):
    """Verifies the model (checker, shape inference, lint) after every pass that changed it;
    `verified` lists the indices of the passes whose result passed."""

    def __init__(self) -> None:
        self.verified: list[int] = []

    def after_pass(self, index: int, name: str, model: ir.Model, modified: bool) -> None:
        """Raise VerificationError when the pass left an invalid model."""
        from winnow.ir.verify import verify

        if modified:
            verify(model)
            self.verified.append(index)


class RecordInstrument(Instrument):
    """What each pass did, for the manifest: seconds, whether it changed the model, node counts
    before and after, and the report it wrote into the pass context (`ctx.report[name]`)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._start, self._nodes, self._report = 0.0, 0, None

    def before_pass(self, index: int, name: str, model: ir.Model) -> None:
        """Note the clock, the node count and the report the pass would overwrite."""
        from winnow.passes.manager import PassContext

        self._report = PassContext.current().report.get(name)
        self._nodes = _node_count(model)
        self._start = time.perf_counter()

    def after_pass(self, index: int, name: str, model: ir.Model, modified: bool) -> None:
        """Record the pass (its report only when it wrote one in this run)."""
        from winnow.passes.manager import PassContext

        seconds = time.perf_counter() - self._start
        report = PassContext.current().report.get(name)
        self.records.append({"index": index, "name": name, "modified": modified,
                             "seconds": seconds,
                             "nodes": {"before": self._nodes, "after": _node_count(model)},
                             "report": report if report is not self._report else None})


def _node_count(model: ir.Model) -> int:
    return sum(len(graph) for graph in model.graphs())


class LosslessGuard:
    """Checks the model after each lossless pass; the PassManager rolls back a pass it rejects.

    `run(model)` gives the model's outputs on the check inputs (raising WinnowError when it
    cannot run); `compare(reference, outputs)` gives None when they match, else a dict saying
    how they differ (`max_abs_error`, `min_cosine`). The reference is the source's outputs
    until a lossy pass changes the model (`rebase`). `rolled_back` lists the rejected passes;
    with `strict`, the first one fails the run.
    """

    def __init__(self, run: Callable[[ir.Model], Any],
                 compare: Callable[[Any, Any], dict[str, Any] | None], reference: Any,
                 strict: bool = False) -> None:
        self.run, self.compare, self.reference, self.strict = run, compare, reference, strict
        self.rolled_back: list[dict[str, Any]] = []
        self._last: dict[str, Any] = {}

    def accept(self, name: str, model: ir.Model) -> bool:
        """True when the model after pass `name` still matches; else records the rejection."""
        from winnow.errors import WinnowError

        try:
            outputs = self.run(model)
        except WinnowError as exc:
            problem: dict[str, Any] | None = {"error": str(exc)}
        else:
            problem = self.compare(self.reference, outputs)
        if problem is None:
            return True
        self._last = {"pass": name, **problem}
        if not self.strict:
            self.rolled_back.append(self._last)
        return False

    def record_crash(self, name: str, exc: Exception) -> None:
        """Record that pass `name` raised (the PassManager then rolls it back)."""
        first = (str(exc).strip().splitlines() or [""])[0]
        self._last = {"pass": name, "raised": f"{type(exc).__name__}: {first}"}
        self.rolled_back.append(self._last)

    def rebase(self, model: ir.Model) -> None:
        """Judge later passes against this model (after a lossy pass changed it on purpose)."""
        from winnow.errors import WinnowError

        try:
            self.reference = self.run(model)
        except WinnowError:
            self.reference = None

    def describe(self, name: str, done: list[str]) -> str:
        """One sentence naming the rejected pass and how the outputs differ."""
        return (f"lossless pass '{name}' (passes run before it: {', '.join(done) or 'none'}) "
                f"{difference_text(self._last)}; drop it from the pipeline or compile without "
                "--strict to roll it back.")


def difference_text(record: dict[str, Any]) -> str:
    """How a rejected lossless pass changed the model, as a clause ('changed the outputs ...')."""
    if record.get("raised"):
        return f"failed ({record['raised']})"
    if record.get("error"):
        return f"left a model ONNX Runtime cannot run ({record['error']})"
    err, cos = record.get("max_abs_error"), record.get("min_cosine")
    parts = [f"max abs error {err:.3g}" if err is not None else None,
             f"min cosine {cos:.6f}" if cos is not None else None, record.get("detail")]
    return "changed the outputs (" + ", ".join(p for p in parts if p) + ")"
