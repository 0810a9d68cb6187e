"""Pass instruments: hooks around each pass for timing, IR dumps and verification."""

from __future__ import annotations

import time
from pathlib import Path

import onnx_ir as ir


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


class DumpIRInstrument(Instrument):
    """Writes the IR as text before and after each pass: `DIR/NN-name.before.txt`/`.after.txt`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
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
    """Verifies the model (checker, shape inference, lint) after every pass that changed it."""

    def after_pass(self, index: int, name: str, model: ir.Model, modified: bool) -> None:
        """Raise VerificationError when the pass left an invalid model."""
        from winnow.ir.verify import verify

        if modified:
            verify(model)
