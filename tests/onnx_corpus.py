"""The ONNX models the onnx package ships under onnx/backend/test/data, with their test data."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

DATA_ROOT = Path(onnx.__file__).parent / "backend" / "test" / "data"
GROUPS = ("light", "simple", "pytorch-converted", "pytorch-operator", "real")

# Outcome of each corpus case, filled by the round-trip test and printed at the end of the run.
OUTCOMES: Counter = Counter()
SKIP_REASONS: Counter = Counter()


@dataclasses.dataclass(frozen=True)
class CorpusCase:
    """One shipped model and where its inputs and expected outputs live."""

    group: str
    name: str
    model_path: Path

    @property
    def id(self) -> str:
        """A short test id: group/name."""
        return f"{self.group}/{self.name}"

    def _data_files(self, kind: str) -> list[Path]:
        folder = self.model_path.parent / "test_data_set_0"
        if self.group == "light":
            return sorted(self.model_path.parent.glob(f"{self.name}_{kind}_*.pb"))
        return sorted(folder.glob(f"{kind}_*.pb"))

    def inputs(self, input_names: list[str]) -> dict[str, np.ndarray] | None:
        """The shipped inputs keyed by graph input name, or None when none are shipped."""
        files = self._data_files("input")
        if not files:
            return None
        return {n: onnx.numpy_helper.to_array(onnx.load_tensor(str(f)))
                for n, f in zip(input_names, files)}

    def expected_outputs(self) -> list[np.ndarray] | None:
        """The shipped expected outputs in graph-output order, or None."""
        files = self._data_files("output")
        if not files:
            return None
        return [onnx.numpy_helper.to_array(onnx.load_tensor(str(f))) for f in files]


def collect() -> list[CorpusCase]:
    """Every shipped model: light_*.onnx files and */model.onnx folders."""
    cases = []
    for group in GROUPS:
        folder = DATA_ROOT / group
        if not folder.is_dir():
            continue
        if group == "light":
            cases += [CorpusCase(group, p.stem, p) for p in sorted(folder.glob("*.onnx"))]
        else:
            cases += [CorpusCase(group, p.parent.name, p) for p in sorted(folder.glob("*/model.onnx"))]
    return cases


def outputs_close(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> bool:
    """Equal within `tol` (absolute and relative); NaNs must match NaNs; non-numeric exactly."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return False
    if not np.issubdtype(want.dtype, np.number) and want.dtype != np.bool_:
        return bool(np.array_equal(got, want))
    return bool(np.allclose(got.astype(np.float64), want.astype(np.float64), atol=tol, rtol=tol,
                            equal_nan=True))
