"""`channel-importance`: per MLP intermediate channel j, ||a_j|| x ||W_down[j, :]|| over real
calibration tokens, where a_j is the channel's activation (the input of the down projection);
per conv filter group (`ir/conv_groups.py`), the same product summed over the weights that read
the channel (the channel's RMS activation at each reader x that reader's weights for it),
through Concat / Split index maps to the readers of the tensors the channels reach.

This is the fine-grained, activation-aware score of CFSP (Wang et al. 2024, in the line of
Wanda): for an MLP it is exactly the Frobenius norm of the rank-one term a_j W_down[j, :] the
channel adds to the MLP output, so removing the lowest-scored channels removes the least output
energy one at a time; for a conv it bounds the same energy up to the kernel's spatial mixing.
(CFSP's coarse step, which spreads a budget over blocks by their angular distance, is what
`layer-similarity` measures.) `weight` is the data-free variant ||W_up[:, j]|| x ||W_down[j, :]||
(for convs: writers' filter norms x readers' weight norms).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.errors import UnsupportedModelError
from winnow.ir.activations import Degeneracy, as_vectors, padding_mask
from winnow.ir.execute import run
from winnow.ir.conv_groups import ChannelGroup, Member, channel_groups
from winnow.ir.pruning import MlpChannels, const_array, mlp_channels, mlp_regions
from winnow.ir.regions import find_regions
from winnow.passes.base import AnalysisPass, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext

NO_MLP = "no MLP sub-layer with an up and a down projection was found, so there are no channels"


def _matrix(node: ir.Node, side: str) -> np.ndarray:
    """A projection's weight as [in, out] (Gemm transB undone)."""
    w = const_array(node.inputs[1]).astype(np.float64)
    trans = node.op_type == "Gemm" and node.attributes.get("transB") is not None \
        and node.attributes["transB"].as_int() == 1
    return w.T if trans else w


def weight_scores(mlp: MlpChannels) -> np.ndarray:
    """Data-free score: product of the channel's up (all up/gate projections) and down norms."""
    score = np.linalg.norm(_matrix(mlp.down, "in"), axis=1)
    for up in mlp.ups:
        score = score * np.linalg.norm(_matrix(up, "out"), axis=0)
    return score


def activation_scores(model: ir.Model, mlps: list[MlpChannels], batches: list[dict]
                      ) -> tuple[list[np.ndarray], list[str | None]]:
    """||a_j|| (real tokens) x ||W_down[j]|| per channel of each MLP, and for each MLP why its
    activations cannot rank channels (NaN/Inf, (near) zero on most tokens), or None."""
    names = [m.down.inputs[0].name for m in mlps]
    sums = [np.zeros(m.width) for m in mlps]
    watch = [Degeneracy() for _ in mlps]
    for feeds in batches:
        captured = run(model, feeds, capture=names)
        mask = padding_mask(feeds)
        for k, name in enumerate(names):
            vectors = as_vectors(captured[name], mask)
            watch[k].update(vectors, vectors)
            sums[k] += (vectors ** 2).sum(axis=0)
    scores = [np.sqrt(s) * np.linalg.norm(_matrix(m.down, "in"), axis=1)
              for s, m in zip(sums, mlps)]
    return scores, [w.reason(names=("activation", "activation")) for w in watch]


def conv_weight_scores(group: ChannelGroup) -> np.ndarray:
    """Data-free score of a conv group's channels: the product of the norms of the filters that
    write each channel (summed over writers) and of the weights that read it (summed, through
    Concat / Split index maps too)."""
    writes = np.zeros(group.channels)
    for m in group.sources():
        writes += _channel_norms(m, np.arange(group.channels))
    reads = np.zeros(group.channels)
    for m, channels, positions in group.readers():
        np.add.at(reads, channels, _channel_norms(m, positions))
    return writes * reads


def _channel_norms(member: Member, positions: np.ndarray) -> np.ndarray:
    """The norm of a member's weight slice at each of `positions` on its channel axis."""
    w = np.moveaxis(const_array(member.node.inputs[member.index]).astype(np.float64),
                    member.axis, 0)
    return np.linalg.norm(w[positions].reshape(len(positions), -1), axis=1)


def conv_activation_scores(model: ir.Model, groups: list[ChannelGroup], batches: list[dict]
                           ) -> list[np.ndarray]:
    """Per channel of each conv group: sum over the weights that read it of the channel's RMS
    activation at that reader x the norm of the reader's weights for it (CFSP's fine score, as
    for MLP channels)."""
    readers = [(k, r) for k, g in enumerate(groups) for r in g.readers()]
    names = sorted({m.node.inputs[0].name for _, (m, _, _) in readers})
    sums = {name: 0.0 for name in names}
    count = {name: 0 for name in names}
    for feeds in batches:
        captured = run(model, feeds, capture=names)
        for name in names:
            x = np.asarray(captured[name], np.float64)
            axis = 1 if x.ndim > 2 else x.ndim - 1
            x = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
            sums[name] = sums[name] + (x ** 2).sum(axis=1)
            count[name] += x.shape[1]
    scores = [np.zeros(g.channels) for g in groups]
    for k, (m, channels, positions) in readers:
        name = m.node.inputs[0].name
        rms = np.sqrt(sums[name] / max(count[name], 1))[positions]
        np.add.at(scores[k], channels, rms * _channel_norms(m, positions))
    return scores


def shaped_channel_groups(model: ir.Model) -> list[ChannelGroup]:
    """channel_groups after annotating inferred shapes when a conv's output has none (a foreign
    file as loaded): the groups need the channel counts. Only value shapes change."""
    from winnow.passes.rewrite.shape_inference import ShapeInferencePass

    if any(n.op_type in ("Conv", "ConvTranspose") and n.outputs[0].shape is None
           for n in model.graph):
        ShapeInferencePass().call(model)
    return channel_groups(model)


def conv_group_entries(model: ir.Model, score: str, batches: list[dict]) -> list[dict[str, Any]]:
    """One entry per conv channel group: its channels and scores, or why it stays whole."""
    groups = shaped_channel_groups(model)
    prunable = [g for g in groups if g.prunable]
    if score == "weight":
        scores = [conv_weight_scores(g) for g in prunable]
    else:
        scores = conv_activation_scores(model, prunable, batches) if prunable else []
    by_name = {g.name: s for g, s in zip(prunable, scores)}
    return [{"group": g.name, "channels": g.channels, "prunable": g.prunable,
             "scores": by_name[g.name].tolist() if g.prunable else None,
             **({"reason": g.reason} if g.reason else {}), "follows": g.follows,
             "members": [f"{m.role}:{m.node.op_type}:{m.node.name}" for m in g.members]}
            for g in groups]


def traced_mlps(model: ir.Model) -> tuple[list[MlpChannels], list[str]]:
    """The MLPs whose channels can be traced, and a note for each that cannot."""
    out, notes = [], []
    for region in mlp_regions(find_regions(model)):
        try:
            out.append(mlp_channels(region))
        except UnsupportedModelError as exc:
            notes.append(str(exc))
    return out, notes


def _layer_entry(mlp: MlpChannels, scores: np.ndarray, problem: str | None) -> dict[str, Any]:
    """One MLP's scores, or `measurable: False` and the reason when its activations are
    degenerate on the calibration data (its scores would rank channels by noise)."""
    if problem is not None:
        return {"region": mlp.region.name, "width": mlp.width, "scores": None,
                "measurable": False, "reason": problem}
    return {"region": mlp.region.name, "width": mlp.width, "scores": scores.tolist(),
            "measurable": True}


@register_pass
class ChannelImportancePass(AnalysisPass):
    """Score every MLP intermediate channel and conv filter by activation norm x the norm of the
    weights that read it."""

    name = "channel-importance"
    description = ("per MLP intermediate channel and conv filter group: ||activation|| x ||weights "
                   "reading it|| (CFSP's fine score) or the data-free weight-norm product")

    @dataclass(frozen=True)
    class Config:
        """Options of channel-importance."""

        samples: int = option(64, "calibration sequences used", min=1)
        score: str = option("activation", "activation-aware (needs calibration data) or weight",
                            choices=("activation", "weight"))

    def analyze(self, model: ir.Model) -> dict[str, Any]:
        """Scores per channel of every traced MLP."""
        from winnow.passes.analysis.calibration import calibration_batches
        from winnow.passes.analysis.layer_similarity import limit_samples

        start = time.perf_counter()
        mlps, notes = traced_mlps(model)
        batches = [] if self.config.score == "weight" else limit_samples(
            calibration_batches(model, PassContext.current()), self.config.samples)
        convs = conv_group_entries(model, self.config.score, batches)
        if not mlps and not convs:
            return {"layers": [], "conv_groups": [], "note": "; ".join(notes) or NO_MLP}
        if self.config.score == "weight":
            scores, problems = [weight_scores(m) for m in mlps], [None] * len(mlps)
        else:
            scores, problems = activation_scores(model, mlps, batches) if mlps else ([], [])
        result = {"score": self.config.score,
                  "layers": [_layer_entry(m, s, p) for m, s, p in zip(mlps, scores, problems)],
                  "conv_groups": convs,
                  "not_measurable": {m.region.name: p for m, p in zip(mlps, problems) if p},
                  "seconds": time.perf_counter() - start}
        if notes or not mlps:
            result["note"] = "; ".join(notes) or NO_MLP
        return result
