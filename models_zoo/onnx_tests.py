"""onnx:NAME: the model files the onnx package ships for its backend tests (no quality metric)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from winnow.models_zoo.base import Feeds, OnnxZooModel

GROUPS = ("light", "simple", "pytorch-converted", "pytorch-operator")


def data_root() -> Path:
    """onnx/backend/test/data inside the installed onnx package."""
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def _graph_inputs(path: Path) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are not initializers (the ones a caller feeds)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in inits]


def _dummy(value: onnx.ValueInfoProto, seed: int | None) -> np.ndarray:
    """The onnx test runner's input for a light model: arange/n, or uniform noise when seeded."""
    tensor_type = value.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    if seed is not None:
        return np.random.default_rng(seed).random(shape).astype(dtype)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / max(n, 1)).astype(dtype)


class OnnxTestModel(OnnxZooModel):
    """One shipped test model; its splits are the shipped inputs (or the runner's dummy inputs)."""

    kind = "onnx-test"

    def __init__(self, name: str, path: Path, group: str) -> None:
        super().__init__(name, path)
        self.group = group
        self.description = f"onnx package backend-test model ({group})"

    def _shipped(self) -> list[Feeds]:
        """Every test_data_set_*/input_*.pb next to the model, keyed by graph input name."""
        names = [v.name for v in _graph_inputs(self.path)]
        sets = []
        for folder in sorted(self.path.parent.glob("test_data_set_*")):
            files = sorted(folder.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
            arrays = [onnx.numpy_helper.to_array(onnx.load_tensor(str(f))) for f in files]
            sets.append(dict(zip(names, arrays)))
        return sets

    def make_split(self, split: str) -> list[Feeds]:
        """Shipped test inputs; light models get the runner's arange input (random for calibration)."""
        if self.group != "light":
            return self._shipped()
        seed = 0 if split == "calibration" else None
        return [{v.name: _dummy(v, seed) for v in _graph_inputs(self.path)}]

    def expected_outputs(self) -> list[np.ndarray] | None:
        """The shipped expected outputs of the held-out inputs, in graph-output order, if any."""
        if self.group == "light":
            files = sorted(self.path.parent.glob(f"{self.path.stem}_output_*.pb"))
        else:
            files = sorted((self.path.parent / "test_data_set_0").glob("output_*.pb"))
        if not files:
            return None
        return [onnx.numpy_helper.to_array(onnx.load_tensor(str(f))) for f in files]


def _aliases(root: Path) -> dict[str, str]:
    """real/test_NAME/data.json entries that point at a light model: test_NAME -> light_NAME."""
    out = {}
    for meta in sorted((root / "real").glob("*/data.json")):
        url = json.loads(meta.read_text()).get("url", "")
        if "/light/" in url:
            out[meta.parent.name] = Path(url).stem
    return out


def models() -> list[OnnxTestModel]:
    """Every shipped model: light_*.onnx, */model.onnx folders and test_* aliases of light models."""
    root = data_root()
    entries: dict[str, OnnxTestModel] = {}
    for path in sorted((root / "light").glob("*.onnx")):
        entries[path.stem] = OnnxTestModel(path.stem, path, "light")
    for group in GROUPS[1:]:
        for path in sorted((root / group).glob("*/model.onnx")):
            entries.setdefault(path.parent.name, OnnxTestModel(path.parent.name, path, group))
    for alias, target in _aliases(root).items():
        if target in entries and alias not in entries:
            entries[alias] = OnnxTestModel(alias, entries[target].path, "light")
    return list(entries.values())
