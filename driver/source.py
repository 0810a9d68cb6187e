"""A source resolved once: the model and everything the driver judges it with (data splits,
reference outputs, task metric, task loss), so search, evaluation and emit share one object."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.measure.fidelity import Fidelity, evaluate, evaluate_zoo
from winnow.frontend import load
from winnow.passes.analysis.calibration import pick_calibration, task_options, zoo_entry

Feeds = dict[str, np.ndarray]
JUDGE_SAMPLES = 256  # calibration samples a zoo model's search trials are judged on


@dataclasses.dataclass
class Source:
    """The model plus its fitting data (for lossy passes), the data search trials are judged on,
    and the held-out data finalists are judged on; `calibration` is every calibration batch
    (what a plain compile fits on when it judges elsewhere), `options` the pass-context options
    (a zoo model's task loss) and `zoo` its zoo entry (looked up once; None unless it has a
    held-out split)."""

    spec: Any
    name: str
    model: ir.Model
    fit: list[Feeds]
    judge: list[Feeds]
    heldout: list[Feeds]
    origin: str
    options: dict[str, Any]
    zoo: Any = None
    calibration: list[Feeds] = dataclasses.field(default_factory=list)
    training: Any = None  # a zoo model's unlabelled training batches, fetched when asked for
    _references: dict[str, list[dict[str, np.ndarray]]] = dataclasses.field(
        default_factory=dict, repr=False)

    @property
    def in_sample(self) -> bool:
        """True when there is no data to judge on but the data lossy passes fit on."""
        return self.zoo is None and self.judge == self.fit

    @property
    def judged_on(self) -> dict[str, str]:
        """Which data judged the trials and the finalists, in words (for summary and manifest)."""
        if self.judges_by_metric:
            return {"trials": f"{self.zoo.metric_name} drop on the {self.zoo.name} calibration "
                              "split",
                    "finalists": f"the {self.zoo.name} held-out split ({self.zoo.metric_name})"}
        if self.zoo is not None:
            return {"trials": f"1 - mean output cosine on {sum(_rows(b) for b in self.judge)} "
                              f"samples of the {self.zoo.name} calibration split",
                    "finalists": f"the {self.zoo.name} held-out split "
                                 f"({self.zoo.metric_name or 'cosine'})"}
        if self.in_sample:
            return {"trials": f"the {self.origin} (in-sample: too little data to hold any out)",
                    "finalists": f"the {self.origin} (in-sample)"}
        return {"trials": f"the last {len(self.judge)} of the {self.origin} batches (not fitted on)",
                "finalists": f"the last {len(self.heldout)} of the {self.origin} batches "
                             "(not fitted on)"}

    def score(self, candidate: Any, split: str) -> Fidelity:
        """Fidelity of `candidate` against the source on 'judge' or 'heldout' data (a zoo model's
        held-out split with its task metric, and its calibration split too when
        `judges_by_metric`; otherwise by output cosine)."""
        if self.zoo is not None and split == "heldout":
            return evaluate_zoo(self.zoo, candidate, "heldout")
        if split == "judge" and self.judges_by_metric:
            return evaluate_zoo(self.zoo, candidate, "calibration")
        data = self.judge if split == "judge" else self.heldout
        return evaluate(self.references(split), candidate, data)

    @property
    def judges_by_metric(self) -> bool:
        """True when trials are judged by the zoo's task metric on its calibration split: when it
        has one and the split is no larger than the judging sample (a bigger split, MiniLM's 724
        sentences, would triple every trial; its trials are judged by output cosine instead)."""
        return (self.zoo is not None and bool(self.zoo.metric_name)
                and sum(_rows(b) for b in self.calibration) <= JUDGE_SAMPLES)

    def references(self, split: str) -> list[dict[str, np.ndarray]]:
        """The source's outputs on the 'judge' or 'heldout' data (computed once; a trial need
        not pay for them)."""
        if split == "judge" and self.judges_by_metric:
            return self.zoo.reference_outputs("calibration")
        if split not in self._references:
            from winnow.ir.execute import run

            data = self.judge if split == "judge" else self.heldout
            self._references[split] = [run(self.model, feeds) for feeds in data]
        return self._references[split]


def fidelity_drop(fid: Fidelity, relative: bool = False) -> float:
    """The drop the budget is judged by: the task-metric drop when there is one (with `relative`,
    as a fraction of the source's metric), else 1 - cosine; NaN or inf anywhere makes it
    infinite."""
    drop = fid.metric_drop if fid.metric_drop is not None else 1.0 - fid.cosine
    if relative and fid.metric_drop is not None:
        drop = relative_drop(drop, fid.reference_metric)
    if not np.isfinite(drop) or not np.isfinite(fid.cosine) or not np.isfinite(fid.max_abs_error):
        return float("inf")
    return float(drop)


def relative_drop(drop: float, reference: float | None) -> float:
    """A task-metric drop as a fraction of the source's metric (infinite when that is 0 and the
    drop is not)."""
    scale = abs(float(reference)) if reference is not None else 0.0
    if scale == 0.0:
        return 0.0 if drop <= 0 else float("inf")
    return float(drop) / scale


def parse_max_drop(value: Any, allow_one: bool = True) -> tuple[float, bool]:
    """A fidelity budget as (drop, relative): a number from 0 to 1 (below 1 unless `allow_one`)
    is an absolute task-metric drop (or 1 - cosine), 'N%' a drop of N percent of the source's
    metric (1 - cosine for a model without one). ValueError says what is accepted."""
    text = value.strip() if isinstance(value, str) else value
    relative = isinstance(text, str) and text.endswith("%")
    try:
        number = float(text[:-1]) / 100.0 if relative else float(text)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not (0.0 <= number <= 1.0 and (allow_one or number < 1.0)):
        bound = "from 0 to 1" if allow_one else "in [0, 1)"
        raise ValueError(f"--max-drop must be a number {bound} (the largest task-metric drop, or "
                         f"1 - cosine, to accept) or a percentage of the source's metric such "
                         f"as 5%; got {value!r}.")
    return number, relative


def max_drop_text(max_drop: float, relative: bool) -> str:
    """A budget as people write it: '0.01' or '5%'."""
    return f"{max_drop * 100:g}%" if relative else f"{max_drop:g}"


def resolve(spec: Any, calibration: Any = None, user_inputs: Any = None,
            example_inputs: Any = None, dynamic_shapes: Any = None) -> Source:
    """Load `spec` and its data once (`example_inputs`/`dynamic_shapes` go to `winnow.load` for
    an nn.Module). Zoo models judge on their calibration and held-out splits; other models
    split their calibration batches into fitting, judging and held-out parts."""
    model = load(spec, example_inputs, dynamic_shapes)
    if user_inputs is not None:  # --input-shapes / --example-inputs: the data to judge on
        user_inputs.attach(model)
    zoo = zoo_entry(spec, model)
    batches, origin = pick_calibration(spec, model, calibration, zoo=zoo)
    name = source_name(spec, model)
    options = task_options(spec, model, zoo=zoo)
    if zoo is not None and zoo.split("heldout"):
        judge = _first_samples(batches, JUDGE_SAMPLES)
        training = zoo.training if zoo.has_training_split and calibration is None else None
        return Source(spec, name, model, batches, judge, zoo.split("heldout"), origin, options,
                      zoo, batches, training)
    fit, judge, heldout = split_batches(batches, dynamic_batch(model))
    return Source(spec, name, model, fit, judge, heldout, origin, options, None, batches)


def source_name(spec: Any, model: ir.Model) -> str:
    """How a source is named in summaries and manifests: its path or zoo name, else the name
    the frontend recorded, else its type."""
    if isinstance(spec, (str, Path)):
        return str(spec)
    return model.metadata_props.get("winnow.source") or type(spec).__name__


def _rows(feeds: Mapping[str, np.ndarray]) -> int:
    return int(np.shape(next(iter(feeds.values())))[0]) if feeds else 0


def _first_samples(batches: Sequence[Feeds], limit: int) -> list[Feeds]:
    """Whole batches from the start until `limit` samples (at least one batch)."""
    out, total = [], 0
    for batch in batches:
        if out and total >= limit:
            break
        out.append(batch)
        total += _rows(batch)
    return out


def dynamic_batch(model: ir.Model) -> bool:
    """True when every input's first dim is symbolic (a batch can be cut into smaller ones)."""
    shapes = [v.shape for v in model.graph.inputs if v.name not in model.graph.initializers]
    return all(s is not None and len(s) > 0 and not isinstance(s[0], int) for s in shapes)


def split_batches(batches: Sequence[Mapping[str, np.ndarray]], cut_samples: bool = True
                  ) -> tuple[list[Feeds], list[Feeds], list[Feeds]]:
    """Fitting / judging / held-out parts of a list of batches (by batch; a single batch is cut
    along its first axis when `cut_samples` and it has at least 3 samples, else every part is
    that one batch, and the judging is in-sample)."""
    batches = [dict(b) for b in batches]
    if len(batches) == 1 and cut_samples:
        batches = _split_samples(batches[0])
    n = len(batches)
    if n < 3:
        return batches, batches, batches
    cut_fit, cut_judge = max(1, n // 2), max(2, (3 * n) // 4)
    cut_judge = min(cut_judge, n - 1)
    return batches[:cut_fit], batches[cut_fit:cut_judge], batches[cut_judge:]


def _split_samples(feeds: Feeds) -> list[Feeds]:
    sizes = {np.shape(v)[0] for v in feeds.values() if np.ndim(v) >= 1}
    if len(sizes) != 1 or next(iter(sizes)) < 3:
        return [feeds]
    n = next(iter(sizes))
    edges = np.linspace(0, n, min(n, 4) + 1).astype(int)
    return [{k: v[a:b] for k, v in feeds.items()} for a, b in zip(edges[:-1], edges[1:])]
