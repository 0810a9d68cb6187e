"""`distill`: train the float weights of the model so its outputs come back to those of the model
the pipeline started from (knowledge distillation on the calibration split, in PyTorch through
`ir/torch_exec.py`). What pruning and dropping removed stays removed; distill re-tunes what is
left, the step the closed-form refits cannot take (they fit one projection at a time).

The teacher is the model as the pipeline received it, run once on the calibration batches when
the pipeline starts. One sample in eight of every calibration batch (at least one; whole batches when the model's
batch size is fixed) is held back: the weights kept are those
of the step with the lowest held-back loss, so distill never returns a model that does worse on
data it did not train on than the one it received; a check that finds no improvement returns to
the best weights and halves the learning rate, so one `lr` serves small and pretrained models.
With `hidden` > 0 the student also learns the teacher's hidden states: the outputs of the
normalization layers both models share (same value name and shape; what pruning or dropping
removed or resized is left out), a far richer signal than the final outputs alone (feature
distillation). The held-back check still judges the outputs only.
Run it after the lossy structural passes and before `fuse` / `quantize` (their contrib and
integer ops are not trainable)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow import progress
from winnow.errors import PassConfigError, require_extra
from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext

NORMALIZATION_OPS = ("LayerNormalization", "BatchNormalization", "InstanceNormalization",
                     "GroupNormalization", "RMSNormalization")


@register_pass
class DistillPass(Pass):
    """Knowledge distillation of the remaining float weights against the pipeline's input."""

    name = "distill"
    description = ("train the remaining float weights to reproduce the outputs of the model the "
                   "pipeline started from (knowledge distillation on calibration data, PyTorch); "
                   "recovers fidelity after pruning")
    lossless = False

    @dataclass(frozen=True)
    class Config:
        """Options of distill."""

        steps: int = option(150, "optimizer steps (one calibration batch each)", min=1)
        lr: float = option(5e-5, "Adam learning rate", min=0.0)
        samples: int = option(512, "calibration samples to train and validate on", min=2)
        check_every: int = option(10, "steps between held-back evaluations", min=1)
        seed: int = option(0, "seed of the batch order")
        max_seconds: float = option(0.0, "stop training after this many seconds, keeping the "
                                    "best held-back step so far (0: no limit)", min=0.0)
        device: str = option("cpu", "where to train: cpu, cuda, or auto (cuda when PyTorch sees a "
                             "GPU); the model that comes out runs wherever it did before",
                             choices=("cpu", "cuda", "auto"))
        embeddings: bool = option(False, "train the lookup tables (Gather'ed initializers, such "
                                  "as token embeddings) too")
        hidden: float = option(0.0, "weight of matching the hidden states (outputs of the "
                               "normalization layers the model shares with the teacher) beside "
                               "the outputs; 0: outputs only", min=0.0)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._train: list[tuple[dict, dict]] = []
        self._valid: list[tuple[dict, dict]] = []
        self._hidden: list[str] = []
        self._seen = False

    def see_pipeline_input(self, model: ir.Model) -> None:
        """Record the teacher: the outputs of the model the pipeline received on the calibration
        batches, each split into rows to train on and rows held back (called by the PassManager
        before the first pass runs)."""
        from winnow.ir.execute import run
        from winnow.passes.analysis.calibration import calibration_batches
        from winnow.passes.analysis.layer_similarity import limit_samples

        batches = limit_samples(calibration_batches(model, PassContext.current()),
                                self.config.samples)
        names = [v.name for v in model.graph.outputs]
        self._hidden = hidden_states(model) if self.config.hidden else []
        pieces = _split_rows(batches) if _batch_is_dynamic(model) else _split_batches(batches)
        self._train, self._valid = ([(feeds, _teacher(run(model, feeds, self._hidden), names))
                                     for feeds in progress.bar(part, "distill: teacher outputs")]
                                    for part in pieces)
        self._seen = True

    def call(self, model: ir.Model) -> PassResult:
        """Train the float initializers in place; keeps the best held-back step."""
        require_extra("the distill pass (it trains in PyTorch)", "torch", ("torch",))
        import torch

        from winnow.ir.torch_exec import TorchGraph

        ctx = PassContext.current()
        if not self._seen:
            self.see_pipeline_input(model)  # run alone: the model itself is the teacher
        if not self._valid or not self._train:
            raise PassConfigError("distill needs calibration batches of at least 2 samples, or "
                                  "at least 2 batches for a model of fixed batch size (one part "
                                  "in eight is held back to choose the weights kept); give more "
                                  "calibration data")
        device = _device(self.config.device)
        frozen = frozenset() if self.config.embeddings else lookup_tables(model)
        net = TorchGraph(model, device, frozen)
        train = [(_tensors(f, device), _tensors(t, device)) for f, t in self._train]
        valid = [(_tensors(f, device), _tensors(t, device)) for f, t in self._valid]
        names = [v.name for v in model.graph.outputs]
        hidden = _shared_hidden(net, model, self._hidden, train[0])
        weight = self.config.hidden / max(len(hidden), 1)
        order = np.random.default_rng(self.config.seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=self.config.lr)
        first = best = _loss(net, valid, names)
        best_step, best_state = 0, _state(net)
        stop = time.monotonic() + self.config.max_seconds if self.config.max_seconds else None
        done = 0
        bar = progress.counter("distill", self.config.steps)
        running = None
        for step in range(1, self.config.steps + 1):
            feeds, target = train[int(order.integers(len(train)))]
            optimizer.zero_grad()
            outputs = net(feeds, hidden)
            loss = _batch_loss(outputs, target, names) \
                + weight * _batch_loss(outputs[len(names):], target, hidden)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            running = value if running is None else 0.9 * running + 0.1 * value
            done = step
            bar.update()
            out_of_time = stop is not None and time.monotonic() > stop
            if step % self.config.check_every == 0 or step == self.config.steps or out_of_time:
                current = _loss(net, valid, names)
                if current < best:
                    best, best_step, best_state = current, step, _state(net)
                else:  # back to the best weights with half the step size
                    net.load_state_dict(best_state)
                    lr = optimizer.param_groups[0]["lr"] / 2
                    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
                bar.set_postfix_str(f"train {running:.4g}, held back {first:.4g} -> {best:.4g} "
                                    f"(step {best_step}), lr {optimizer.param_groups[0]['lr']:.2g}")
            if out_of_time:
                break
        bar.close()
        net.load_state_dict(best_state)
        changed = net.write_back() if best_step else 0
        ctx.report[self.name] = {"steps": done, "best_step": best_step,
                                 "held_back_loss": [round(first, 6), round(best, 6)],
                                 "trained_tensors": changed, "hidden_states": len(hidden),
                                 "parameters": int(sum(p.numel() for p in net.parameters()))}
        return PassResult(model, bool(changed))


def hidden_states(model: ir.Model) -> list[str]:
    """The names of the values the normalization layers of the main graph produce (the hidden
    states feature distillation matches), in graph order."""
    return [node.outputs[0].name for node in model.graph
            if node.domain in ("", "ai.onnx") and node.op_type in NORMALIZATION_OPS]


def _teacher(values: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """The teacher's graph outputs as they are, its hidden states in float16 (memory)."""
    return {k: v if k in outputs or v.dtype != np.float32 else v.astype(np.float16)
            for k, v in values.items()}


def _shared_hidden(net: Any, model: ir.Model, names: list[str],
                   sample: tuple[dict, dict]) -> list[str]:
    """The teacher's hidden states the student still computes, with the same shape."""
    import torch

    produced = {value.name for node in model.graph for value in node.outputs}
    names = [n for n in names if n in produced]
    if not names:
        return []
    feeds, target = sample
    with torch.no_grad():
        values = net(feeds, names)[len(model.graph.outputs):]
    return [n for n, v in zip(names, values) if tuple(v.shape) == tuple(target[n].shape)]


def _batch_is_dynamic(model: ir.Model) -> bool:
    """Whether every graph input takes any number of rows (its first dimension is symbolic)."""
    return all(v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int)
               for v in model.graph.inputs)


def _split_rows(batches: list[dict]) -> tuple[list[dict], list[dict]]:
    """Each batch's last eighth of rows (at least one) held back, the rest trained on."""
    train, valid = [], []
    for batch in batches:
        rows = next(iter(batch.values())).shape[0]
        held = rows // 8 or (1 if rows > 1 else 0)
        train.append({k: v[:rows - held] for k, v in batch.items()})
        if held:
            valid.append({k: v[rows - held:] for k, v in batch.items()})
    return train, valid


def _split_batches(batches: list[dict]) -> tuple[list[dict], list[dict]]:
    """The last eighth of the batches (at least one) held back whole: the batch size is fixed."""
    held = len(batches) // 8 or (1 if len(batches) > 1 else 0)
    return batches[:len(batches) - held], batches[len(batches) - held:]


def lookup_tables(model: ir.Model) -> frozenset[str]:
    """The initializers that Gather nodes index (embedding tables): rows are looked up, not
    multiplied, so distill leaves them as they are unless asked."""
    return frozenset(node.inputs[0].name for node in model.graph
                     if node.op_type == "Gather" and node.inputs[0] is not None
                     and node.inputs[0].is_initializer())


def _device(choice: str) -> str:
    """The torch device of the `device` option; a clear error when CUDA is asked for but absent."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise PassConfigError("distill{device=cuda}: PyTorch sees no CUDA GPU here; use "
                              "device=cpu or device=auto")
    return choice


def _tensors(arrays: dict[str, np.ndarray], device: str = "cpu") -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


def _state(net: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _batch_loss(outputs: list[Any], target: dict[str, Any], names: list[str]) -> Any:
    """Mean over float outputs of the squared error relative to the teacher's mean square."""
    total = 0.0
    for name, out in zip(names, outputs):
        ref = target[name]
        if not ref.is_floating_point():
            continue
        ref = ref.to(out.dtype)
        total = total + ((out - ref) ** 2).mean() / (ref**2).mean().clamp_min(1e-12)
    return total


def _loss(net: Any, pairs: list[tuple[dict, dict]], names: list[str]) -> float:
    import torch

    with torch.no_grad():
        return float(sum(float(_batch_loss(net(f), t, names)) for f, t in pairs) / len(pairs))
