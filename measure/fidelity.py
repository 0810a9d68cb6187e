"""Fidelity: one evaluator for every lossy change (cosine, top-1, KL, max error, task metric)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.errors import FidelityError

Feeds = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Runner = Callable[[Feeds], Mapping[str, np.ndarray]]
Metric = Callable[[Sequence[Outputs]], Mapping[str, float]]
OUTPUT_KINDS = ("auto", "logits", "probs", "values")
_EPS = 1e-12


@dataclasses.dataclass
class OutputFidelity:
    """Agreement of one output: per-sample cosine, max abs error, and for scores top-1 and KL."""

    name: str
    kind: str
    cosine: float
    max_abs_error: float
    top1: float | None = None
    kl: float | None = None
    nonfinite_mismatch: int = 0


@dataclasses.dataclass
class Fidelity:
    """How closely a candidate follows the reference (worst output) plus the task metric of both."""

    cosine: float
    max_abs_error: float
    top1: float | None
    kl: float | None
    batches: int
    samples: int
    outputs: dict[str, OutputFidelity]
    metric_name: str | None = None
    higher_is_better: bool = True
    reference_metric: float | None = None
    candidate_metric: float | None = None
    reference_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    candidate_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    nonfinite_mismatch: int = 0

    @property
    def metric_drop(self) -> float | None:
        """How much worse the candidate's task metric is (positive = worse, whatever the sign)."""
        if self.reference_metric is None or self.candidate_metric is None:
            return None
        diff = self.reference_metric - self.candidate_metric
        return diff if self.higher_is_better else -diff

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (manifests, reports, `--json`)."""
        out = dataclasses.asdict(self)
        out["metric_drop"] = self.metric_drop
        return out

    def summary(self) -> str:
        """One line for people: cosine, top-1, KL, max error and the task metric."""
        parts = [f"cosine {self.cosine:.5f}"]
        if self.top1 is not None:
            parts.append(f"top-1 {self.top1:.4f}")
        if self.kl is not None:
            parts.append(f"KL {self.kl:.2e}")
        parts.append(f"max|err| {self.max_abs_error:.2e}")
        if self.nonfinite_mismatch:
            parts.append(f"{self.nonfinite_mismatch} NaN/inf entries the reference lacks")
        if self.metric_name and self.candidate_metric is not None:
            ref = "" if self.reference_metric is None else f"{self.reference_metric:.4f} -> "
            parts.append(f"{self.metric_name} {ref}{self.candidate_metric:.4f}")
        return ", ".join(parts)


LOSSLESS_TOL = 1e-4


def nonfinite_mismatch(ref: np.ndarray, cand: np.ndarray) -> int:
    """How many entries are NaN, +inf or -inf in one array but not the same in the other."""
    a, b = np.asarray(ref), np.asarray(cand)
    if a.dtype.kind != "f" or b.dtype.kind != "f":
        return 0
    a, b = a.astype(np.float64), b.astype(np.float64)
    differs = (np.isnan(a) != np.isnan(b)) | ((np.isinf(a) | np.isinf(b)) & (a != b))
    return int(np.count_nonzero(differs))


def array_agreement(ref: np.ndarray, cand: np.ndarray) -> dict[str, Any]:
    """Max abs error, cosine and non-finite mismatches of two same-shape numeric arrays.

    Equal entries (NaN with NaN, inf with the same inf) count as no error; a NaN or inf that the
    other array lacks makes the max abs error inf and the cosine 0. The cosine is taken over the
    entries finite in both (1 when both are zero there).
    """
    a, b = np.asarray(ref, np.float64).ravel(), np.asarray(cand, np.float64).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        diff = np.nan_to_num(np.where(same, 0.0, np.abs(a - b)), nan=np.inf)
    bad = nonfinite_mismatch(a, b)
    finite = np.isfinite(a) & np.isfinite(b)
    return {"max_abs_error": float(diff.max()) if diff.size else 0.0,
            "cosine": 0.0 if bad else _flat_cosine(a[finite], b[finite]), "nonfinite_mismatch": bad}


def _flat_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def lossless_mismatch(reference: Mapping[str, Any], outputs: Mapping[str, Any],
                      tol: float = LOSSLESS_TOL) -> dict[str, Any] | None:
    """None when `outputs` match `reference` (by position) within `tol`, absolute and relative,
    with NaN and inf at the same places; else the worst max abs error and cosine and which output
    differs first."""
    if len(reference) != len(outputs):
        return {"detail": f"{len(outputs)} outputs instead of {len(reference)}"}
    errors, cosines, first = [], [], None
    for (name, ref), got in zip(reference.items(), outputs.values()):
        problem = _value_mismatch(ref, got, tol, errors, cosines)
        if problem and first is None:
            first = f"output '{name}': {problem}"
    if first is None:
        return None
    return {"max_abs_error": max(errors, default=None), "min_cosine": min(cosines, default=None),
            "detail": first}


def _value_mismatch(ref: Any, got: Any, tol: float, errors: list, cosines: list) -> str | None:
    """Why one output (tensor, sequence or optional) differs, collecting error and cosine."""
    if ref is None or got is None:
        return None if ref is None and got is None else "present in one model only"
    if isinstance(ref, (list, tuple)) or isinstance(got, (list, tuple)):
        if not isinstance(ref, (list, tuple)) or not isinstance(got, (list, tuple)) \
                or len(ref) != len(got):
            return "sequences of different lengths"
        found = [_value_mismatch(r, g, tol, errors, cosines) for r, g in zip(ref, got)]
        return next((f for f in found if f), None)
    a, b = np.asarray(ref), np.asarray(got)
    if a.shape != b.shape:
        return f"shape {list(b.shape)} instead of {list(a.shape)}"
    if a.dtype.kind not in "biuf" or b.dtype.kind not in "biuf":
        return None if np.array_equal(a, b) else "different values"
    stats = array_agreement(a, b)
    errors.append(stats["max_abs_error"])
    cosines.append(stats["cosine"])
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.allclose(b.astype(np.float64), a.astype(np.float64), rtol=tol, atol=tol,
                            equal_nan=True)
    if stats["nonfinite_mismatch"]:
        return f"{stats['nonfinite_mismatch']} NaN/inf entries differ"
    return None if close else f"max abs error {stats['max_abs_error']:.3g}"


def as_runner(model: Any) -> Runner:
    """A feeds -> outputs callable for an ir.Model, an artifact folder or a callable. A model
    runs as it will be deployed, with ORT's graph optimizations: a static-int8 digits-cnn judged
    without them kept its accuracy, and lost 1.1 points in the optimized session."""
    if isinstance(model, ir.Model):
        from winnow.ir.execute import run

        return lambda feeds: run(model, feeds, optimize=True)
    if isinstance(model, (str, Path)):
        from winnow.backends.ort import run_artifact

        return lambda feeds: run_artifact(model, feeds)
    if callable(model):
        return model
    raise TypeError(f"cannot run a {type(model).__name__}; give an ir.Model, an artifact folder "
                    "or a callable taking feeds and returning outputs.")


def collect(model: Any, data: Sequence[Feeds]) -> list[Outputs]:
    """Outputs of `model` on every batch; a list of output dicts passes through unchanged."""
    if isinstance(model, (list, tuple)):
        if len(model) != len(data):
            raise ValueError(f"got {len(model)} precomputed outputs for {len(data)} batches.")
        return [dict(o) for o in model]
    runner = as_runner(model)
    return [{k: np.asarray(v) for k, v in runner(feeds).items()} for feeds in data]


def _per_sample(x: np.ndarray) -> np.ndarray:
    """[samples, features] view: the first axis is the batch (a scalar or vector is one sample)."""
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(x.shape[0], -1)


def cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Cosine of each sample's flattened outputs (1 when both are zero, 0 when one is), over the
    entries finite in both; 0 for a sample where NaN/inf entries differ between the two."""
    a, b = _per_sample(ref), _per_sample(cand)
    finite = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):
        differs = (np.isnan(a) != np.isnan(b)) | ((np.isinf(a) | np.isinf(b)) & (a != b))
    a, b = np.where(finite, a, 0.0), np.where(finite, b, 0.0)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    out = dot / np.maximum(na * nb, _EPS)
    out[(na < _EPS) & (nb < _EPS)] = 1.0
    out[differs.any(axis=1)] = 0.0
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _log_probs(x: np.ndarray, kind: str) -> np.ndarray:
    """Log-probabilities over the last axis of logits or of (renormalized) probabilities."""
    if kind == "logits":
        return log_softmax(x)
    p = np.clip(np.asarray(x, dtype=np.float64), _EPS, None)
    return np.log(p / p.sum(axis=-1, keepdims=True))


def kl_divergence(ref: np.ndarray, cand: np.ndarray, kind: str = "logits") -> np.ndarray:
    """KL(reference || candidate) per position over the last axis."""
    lp, lq = _log_probs(ref, kind), _log_probs(cand, kind)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def guess_kind(x: np.ndarray) -> str:
    """'probs' when rows are distributions, 'logits' for other float scores, else 'values'."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) or x.ndim < 2 or x.shape[-1] < 2:
        return "values"
    if x.min() >= 0 and x.max() <= 1 and np.allclose(x.sum(-1), 1.0, atol=1e-3):
        return "probs"
    return "logits"


def compare_output(name: str, ref: Sequence[np.ndarray], cand: Sequence[np.ndarray],
                   kind: str = "auto") -> OutputFidelity:
    """Fidelity of one output over all batches."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind must be one of {', '.join(OUTPUT_KINDS)}, not '{kind}'.")
    for r, c in zip(ref, cand):
        if np.shape(r) != np.shape(c):
            raise FidelityError(f"output '{name}' has shape {list(np.shape(c))} in the candidate "
                                f"but {list(np.shape(r))} in the reference; they cannot be compared.")
    kind = guess_kind(ref[0]) if kind == "auto" else kind
    cos = np.concatenate([cosines(r, c) for r, c in zip(ref, cand)])
    stats = [array_agreement(r, c) for r, c in zip(ref, cand)]
    result = OutputFidelity(name, kind, float(cos.mean()),
                            max(s["max_abs_error"] for s in stats),
                            nonfinite_mismatch=sum(s["nonfinite_mismatch"] for s in stats))
    if kind in ("logits", "probs"):
        same = np.concatenate([(np.argmax(r, -1) == np.argmax(c, -1)).ravel()
                               for r, c in zip(ref, cand)])
        kl = np.concatenate([kl_divergence(r, c, kind).ravel() for r, c in zip(ref, cand)])
        result.top1, result.kl = float(same.mean()), float(max(kl.mean(), 0.0))
    return result


def _pair_names(ref: Outputs, cand: Outputs) -> list[tuple[str, str]]:
    """Match candidate outputs to reference outputs by name, else by position."""
    if set(ref) <= set(cand):
        return [(n, n) for n in ref]
    if len(ref) == len(cand):
        return list(zip(ref, cand))
    raise FidelityError(f"the candidate has outputs {', '.join(cand)} but the reference has "
                        f"{', '.join(ref)}; they cannot be compared.")


def _metric_values(metric: Metric | None, ref: list[Outputs], cand: list[Outputs]):
    """(name, higher_is_better, reference values, candidate values) of a task metric."""
    if metric is None:
        return None, True, {}, {}
    ref_values = {k: float(v) for k, v in metric(ref).items()}
    cand_values = {k: float(v) for k, v in metric(cand).items()}
    name = getattr(metric, "name", None) or next(iter(cand_values), None)
    return name, bool(getattr(metric, "higher_is_better", True)), ref_values, cand_values


def evaluate(reference: Any, candidate: Any, data: Sequence[Feeds], metric: Metric | None = None,
             output_kind: str | Mapping[str, str] = "auto") -> Fidelity:
    """Run reference and candidate on every batch of `data` and measure how closely they agree.

    `reference`/`candidate`: an ir.Model, a compiled artifact folder, a callable feeds -> outputs,
    or (reference only, typically) a precomputed list of outputs. `metric`: a zoo TaskMetric or
    any callable on the list of outputs returning named values (the first is the primary one).
    `output_kind`: 'logits', 'probs', 'values' or 'auto', for all outputs or per output name.
    """
    if not data:
        raise ValueError("evaluate needs at least one batch of data.")
    ref, cand = collect(reference, data), collect(candidate, data)
    pairs = _pair_names(ref[0], cand[0])
    per_output = {}
    for ref_name, cand_name in pairs:
        kind = (output_kind.get(ref_name, "auto") if isinstance(output_kind, Mapping)
                else output_kind)
        per_output[ref_name] = compare_output(ref_name, [o[ref_name] for o in ref],
                                              [o[cand_name] for o in cand], kind)
    # Task metrics read outputs by position; give the candidate's in the reference's order.
    ordered = [{r: o[c] for r, c in pairs} for o in cand]
    name, higher, ref_values, cand_values = _metric_values(metric, ref, ordered)
    scored = [f for f in per_output.values() if f.top1 is not None]
    return Fidelity(
        cosine=min(f.cosine for f in per_output.values()),
        max_abs_error=max(f.max_abs_error for f in per_output.values()),
        top1=min(f.top1 for f in scored) if scored else None,
        kl=max(f.kl for f in scored) if scored else None,
        batches=len(data), samples=sum(_per_sample(next(iter(o.values()))).shape[0] for o in ref),
        outputs=per_output, metric_name=name, higher_is_better=higher,
        reference_metric=ref_values.get(name) if name else None,
        candidate_metric=cand_values.get(name) if name else None,
        reference_metrics=ref_values, candidate_metrics=cand_values,
        nonfinite_mismatch=sum(f.nonfinite_mismatch for f in per_output.values()))


def evaluate_zoo(zoo_model: Any, candidate: Any, split: str = "heldout",
                 reference: Any = None) -> Fidelity:
    """Fidelity of `candidate` against a zoo model's original on its `split`, with its task metric.

    `zoo_model` is a ZooModel or a name ('minilm', 'zoo:minilm'); `reference` defaults to the
    original (PyTorch module or shipped ONNX file).
    """
    from winnow import models_zoo

    zm = models_zoo.get(zoo_model) if isinstance(zoo_model, str) else zoo_model
    data = zm.split(split)
    ref = zm.reference_outputs(split) if reference is None else reference
    kind = zm.output_kind if zm.output_kind in OUTPUT_KINDS else "values"
    return evaluate(ref, candidate, data, metric=zm.task_metric(split), output_kind=kind)
