"""ZooModel: a named model with real calibration / held-out data and a task metric."""

from __future__ import annotations

import abc

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir

from winnow.errors import ExecutionError

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Runner = Callable[[Mapping[str, np.ndarray]], Outputs]
KINDS = ("text-embedding", "image-classifier", "causal-lm", "ocr-det", "ocr-rec", "onnx-test")
SPLITS = ("calibration", "heldout", "train")
_EXPORT_MEMO: dict[str, tuple[bytes, dict]] = {}
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE)


@dataclass(frozen=True)
class TaskMetric:
    """A zoo model's task metric over one split: call it with the outputs of every batch."""

    name: str
    higher_is_better: bool
    compute: Callable[[Sequence[Outputs]], dict[str, float]]

    def __call__(self, outputs: Sequence[Outputs]) -> dict[str, float]:
        """All metric values for these outputs (the primary one under `self.name`)."""
        return self.compute(outputs)


def first(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The first output of a runner (metrics read outputs by position, not by name)."""
    return next(iter(outputs.values()))


class ZooModel(abc.ABC):
    """Base of every zoo entry; subclasses say how to build, feed and score the model."""

    kind: str = "onnx-test"
    metric_name: str | None = None
    higher_is_better: bool = True
    output_kind: str = "values"
    description: str = ""
    has_training_split: bool = False

    def __init__(self, name: str) -> None:
        self.name = name
        self._splits: dict[str, list[Feeds]] = {}
        self._reference_outputs: dict[str, list[Outputs]] = {}

    def __repr__(self) -> str:
        return f"ZooModel({self.name!r}, kind={self.kind!r})"

    # -- data ---------------------------------------------------------------------------
    @abc.abstractmethod
    def make_split(self, split: str) -> list[Feeds]:
        """Build the feeds of one split (subclasses override)."""

    def split(self, split: str) -> list[Feeds]:
        """The feed batches of `split` ('calibration' or 'heldout'), built once per process."""
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}.")
        if split not in self._splits:
            self._splits[split] = self.make_split(split)
        return self._splits[split]

    def calibration(self) -> list[Feeds]:
        """Calibration batches of real data (feed dicts keyed by ONNX input names)."""
        return self.split("calibration")

    def training(self) -> list[Feeds] | None:
        """Unlabelled batches to train on (distillation), disjoint from the held-out split; None
        when the model has no split of its own for that (passes then train on calibration)."""
        return self.split("train") if self.has_training_split else None

    def heldout(self) -> list[Feeds]:
        """Held-out batches of real data, disjoint from calibration and training data."""
        return self.split("heldout")

    def example_feeds(self) -> Feeds:
        """One small batch of real inputs for export and smoke runs."""
        return {k: v.copy() for k, v in self.heldout()[0].items()}

    # -- model --------------------------------------------------------------------------
    @abc.abstractmethod
    def builder(self) -> Any:
        """The original model: an nn.Module (eval mode) or the path of an ONNX file."""

    @abc.abstractmethod
    def reference(self) -> Runner:
        """A runner of the original model: feeds -> outputs (numpy)."""

    @abc.abstractmethod
    def export_ir(self) -> ir.Model:
        """Capture the original model into the IR (subclasses override)."""

    def load_ir(self) -> ir.Model:
        """A fresh IR copy of the model with example feeds and its zoo name attached."""
        from winnow.frontend import EXAMPLE_FEEDS_KEY

        key = f"{self.name}:{self.cache_key()}"
        if key not in _EXPORT_MEMO:
            exported = self.export_ir()
            _EXPORT_MEMO[key] = (ir.serde.serialize_model(exported).SerializeToString(),
                                 dict(exported.meta))
        data, meta = _EXPORT_MEMO[key]
        model = ir.serde.deserialize_model(onnx.load_from_string(data))
        model.meta.update(meta)
        model.meta[EXAMPLE_FEEDS_KEY] = self.example_feeds()
        model.metadata_props["winnow.source"] = self.source
        model.metadata_props["winnow.zoo"] = self.name
        return model

    @property
    def source(self) -> str:
        """The name to give `winnow.load` for this model."""
        return f"{'onnx' if self.kind == 'onnx-test' else 'zoo'}:{self.name}"

    def cache_key(self) -> str:
        """A key that changes when the model's weights would (trained models override)."""
        return "shipped"

    def is_cached(self) -> bool | None:
        """Whether trained weights are cached (None for models shipped as files)."""
        return None

    @abc.abstractmethod
    def num_params(self) -> int:
        """Number of weight elements."""

    # -- metric -------------------------------------------------------------------------
    def compute_metric(self, outputs: Sequence[Outputs], split: str) -> dict[str, float]:
        """Metric values of `outputs` (one per batch of `split`); subclasses with a metric override."""
        return {}

    def task_loss(self, outputs: Outputs, feeds: Feeds) -> float | None:
        """A per-batch loss of the task (lower is better) computable from outputs and feeds
        alone, or None when the model has none (DAS then falls back to fidelity loss)."""
        return None

    def task_metric(self, split: str = "heldout") -> TaskMetric | None:
        """The task metric over `split` as a callable on outputs, or None when there is none."""
        if self.metric_name is None:
            return None
        return TaskMetric(self.metric_name, self.higher_is_better,
                          functools.partial(self._checked_metric, split=split))

    def _checked_metric(self, outputs: Sequence[Outputs], split: str) -> dict[str, float]:
        if len(outputs) != len(self.split(split)):
            raise ValueError(f"{self.name}: got outputs for {len(outputs)} batches, the "
                             f"{split} split has {len(self.split(split))}.")
        return self.compute_metric(outputs, split)

    def reference_outputs(self, split: str) -> list[Outputs]:
        """Outputs of the original model on every batch of `split` (computed once)."""
        if split not in self._reference_outputs:
            runner = self.reference()
            self._reference_outputs[split] = [runner(f) for f in self.split(split)]
        return self._reference_outputs[split]

    def score(self, runner: Runner | None = None, split: str = "heldout") -> dict[str, float]:
        """The task metric of `runner` (default: the original model) over `split`."""
        if runner is None:
            outputs = self.reference_outputs(split)
        else:
            outputs = [runner(f) for f in self.split(split)]
        metric = self.task_metric(split)
        return metric(outputs) if metric else {}


class TorchZooModel(ZooModel):
    """A zoo model defined as a PyTorch module."""

    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ("output",)

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: Any = None

    @abc.abstractmethod
    def build_module(self) -> Any:
        """Create the module with its weights (subclasses override)."""

    def builder(self) -> Any:
        """The nn.Module in eval mode (built, loaded or trained once per process)."""
        if self._module is None:
            self._module = self.build_module().eval()
        return self._module

    def dynamic_shapes(self) -> Any:
        """torch.export dynamic shapes for the inputs (None: all static)."""
        return None

    def example_inputs(self) -> tuple:
        """The example feeds as a tuple of torch tensors in input order."""
        import torch

        feeds = self.example_feeds()
        return tuple(torch.from_numpy(feeds[n]) for n in self.input_names)

    def reference(self) -> Runner:
        """Run the PyTorch module without gradients."""
        import torch

        module = self.builder()

        def run(feeds: Mapping[str, np.ndarray]) -> Outputs:
            with torch.no_grad():
                out = module(*(torch.from_numpy(np.asarray(feeds[n])) for n in self.input_names))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return {n: o.detach().numpy() for n, o in zip(self.output_names, outs)}

        return run

    def export_ir(self) -> ir.Model:
        """Export with torch.export + the dynamo ONNX exporter (winnow's torch frontend)."""
        from winnow.frontend.torch_export import load_module

        return load_module(self.builder(), self.example_inputs(),
                           dynamic_shapes=self.dynamic_shapes(),
                           output_names=list(self.output_names), label=self.name)

    def shape_module(self) -> Any:
        """A module with the right parameter shapes (trained models give an untrained one)."""
        return self.builder()

    def num_params(self) -> int:
        """Number of parameter elements of the module (never trains)."""
        module = self._module if self._module is not None else self.shape_module()
        return int(sum(p.numel() for p in module.parameters()))


class OnnxZooModel(ZooModel):
    """A zoo model shipped as an ONNX file."""

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.path = Path(path)

    def builder(self) -> Path:
        """The path of the ONNX file."""
        return self.path

    def reference(self) -> Runner:
        """Run the original file with ONNX Runtime (default optimizations, CPU)."""
        import onnxruntime as ort

        from winnow.ir.execute import session_options

        try:
            session = ort.InferenceSession(str(self.path), session_options(optimize=True),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
            raise ExecutionError(f"ONNX Runtime cannot load {self.source} ('{self.path}'): "
                                 f"{str(exc).strip().splitlines()[0]}") from None
        names = [o.name for o in session.get_outputs()]
        inputs = {i.name for i in session.get_inputs()}

        def run(feeds: Mapping[str, np.ndarray]) -> Outputs:
            values = session.run(names, {k: v for k, v in feeds.items() if k in inputs})
            return dict(zip(names, values))

        return run

    def export_ir(self) -> ir.Model:
        """Load the file with winnow's ONNX frontend."""
        from winnow.frontend.onnx_file import load_onnx

        return load_onnx(self.path)

    def num_params(self) -> int:
        """Weight elements: float initializers, Constant nodes and ConstantOfShape-made weights."""
        graph = onnx.load(str(self.path), load_external_data=False).graph
        inits = {t.name: t for t in graph.initializer}
        tensors = [t for t in inits.values() if t.data_type in _FLOAT_TYPES]
        tensors += [a.t for n in graph.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value" and a.t.data_type in _FLOAT_TYPES]
        count = sum(int(np.prod(t.dims)) for t in tensors)
        for node in graph.node:  # the onnx package's "light" models build weights from shapes
            if node.op_type == "ConstantOfShape" and node.input[0] in inits:
                count += int(np.prod(onnx.numpy_helper.to_array(inits[node.input[0]])))
        return count
