"""The search's page, OUT/report.html: the before/after table (measured, predicted by the cost
model, held-out fidelity, size), the Pareto front of every trial with the chosen point, and the
plots of the analyses the search ran."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.driver.report_html import analysis_sections, html_page, html_table, img_tag, new_figure, png_base64

FALLBACK_TARGET = "x86-avx2"  # priced on this shipped profile until `winnow cost calibrate`


def predicted_costs(models: Mapping[str, ir.Model], feeds: Mapping[str, np.ndarray],
                    target: str) -> dict[str, Any]:
    """Latency (ms) and energy (mJ) the cost model predicts for each model on `target` ('host'
    falls back to a shipped x86 profile when this machine was never calibrated)."""
    from winnow.cost_model import predict
    from winnow.cost_model.targets import known_targets

    profile = target if target in known_targets() else FALLBACK_TARGET
    shapes = {name: list(np.shape(value)) for name, value in feeds.items()}
    out: dict[str, Any] = {"target": target, "profile": profile,
                           "shapes": shapes}
    if profile != target:
        out["note"] = (f"no '{target}' profile on this machine (winnow cost calibrate makes "
                       f"one): priced on {profile}")
    for label, model in models.items():
        report = predict(model, profile, shapes)
        out[label] = {"latency_ms": report.latency_s * 1e3, "energy_mj": report.energy_j * 1e3,
                      "unpriced": len(report.unpriced)}
    return out


def pareto_plot(points: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]],
                chosen: Mapping[str, Any], max_drop: float) -> str:
    """Every trial (cost vs fidelity drop on the judging data), the front, the budget, the choice."""
    fig = new_figure(8.0, 4.6)
    ax = fig.subplots()
    finite = [p for p in points if p.get("drop") is not None and math.isfinite(p["drop"])]
    floor = 1e-6  # a drop of 0 still shows on the log axis
    ax.scatter([p["cost"] for p in finite], [max(p["drop"], floor) for p in finite], s=18,
               color="#9aa5b1", label="trials", zorder=2)
    ordered = sorted(front, key=lambda p: p["cost"])
    ax.plot([p["cost"] for p in ordered], [max(p["drop"], floor) for p in ordered], "-o",
            color="#1f77b4", markersize=5, label="Pareto front", zorder=3)
    ax.axhline(max(max_drop, floor), color="#d62728", linestyle="--", linewidth=1,
               label=f"--max-drop {max_drop}")
    ax.scatter([1.0], [floor], marker="s", s=50, color="#444444", label="source (lossless)",
               zorder=4)
    if chosen.get("number", -1) >= 0:
        ax.scatter([chosen.get("measured_cost") or chosen["cost"]],
                   [max(chosen.get("heldout_drop") or chosen["drop"], floor)], marker="*", s=260,
                   color="#ff7f0e", edgecolor="black", label="chosen (measured, held-out)",
                   zorder=5)
    ax.set_yscale("log")
    ax.set_xlabel("cost relative to the source (lower is better)")
    ax.set_ylabel("fidelity drop (log)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png_base64(fig)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _before_after(search: Mapping[str, Any], compile_info: Mapping[str, Any]) -> list[list[Any]]:
    chosen, pred, size = search["chosen"], search.get("predicted") or {}, search["size"]
    src_pred, out_pred = pred.get("source") or {}, pred.get("chosen") or {}
    fid = (compile_info.get("fidelity") or {}).get("heldout") or {}
    ratios = chosen.get("measured_ratios") or {}
    return [
        ["pipeline", "lossless default", chosen["pipeline"]],
        ["nodes", compile_info.get("nodes_before", "–"), compile_info.get("nodes_after", "–")],
        ["model size (MB)", _fmt(size["source_bytes"] / 1e6, 3), _fmt(size["chosen_bytes"] / 1e6, 3)],
        ["measured latency vs source" + (" (geometric mean)" if len(ratios) > 1 else ""),
         "1.000", _fmt(chosen.get("measured_cost"), 3)],
        *[[f"measured latency vs source, {label}", "1.000", _fmt(ratio, 3)]
          for label, ratio in ratios.items()],
        [f"predicted latency (ms, {pred.get('profile', '–')})",
         _fmt(src_pred.get("latency_ms"), 3), _fmt(out_pred.get("latency_ms"), 3)],
        ["predicted energy (mJ)", _fmt(src_pred.get("energy_mj"), 3),
         _fmt(out_pred.get("energy_mj"), 3)],
        ["held-out fidelity drop", "0", _fmt(chosen.get("heldout_drop"))],
        ["held-out mean cosine", "1", _fmt(chosen.get("heldout_cosine"), 5)],
        ["held-out check of the artifact", "–", _fmt(fid.get("cosine"), 5)
         if fid else "–"],
    ]


def render_search(source: str, search: Mapping[str, Any], compile_info: Mapping[str, Any],
                  trials: Sequence[Mapping[str, Any]], analyses: Mapping[str, Any],
                  max_drop: float) -> tuple[str, list[str]]:
    """The page and the names of its plots."""
    plots = ["pareto"]
    pred = search.get("predicted") or {}
    parts = [f"<h1>winnow compile --target: {source}</h1>",
             f"<p class=\"sub\">{search['trials']} trials in {search['seconds']:.0f} s · "
             f"functional-hash cache hits {search['cache_hits']} · study {search['study']}</p>",
             f"<p><b>{search['message']}</b></p>",
             "<h2>Before and after</h2>",
             html_table(["", "source", "chosen"], _before_after(search, compile_info),
                        numeric=(1, 2))]
    if pred.get("note"):
        parts.append(f'<p class="note">{pred["note"]}.</p>')
    parts += ["<h2>Pareto front</h2>",
              f"<p>Trials judged on {search['judged_on']['trials']}; finalists re-timed and "
              f"judged on {search['judged_on']['finalists']}.</p>",
              img_tag(pareto_plot(trials, search["front"], search["chosen"], max_drop),
                      "Pareto front of the search"),
              html_table(["trial", "cost", "drop", "held-out drop", "measured", "pipeline"],
                         [[c["number"], _fmt(c["cost"], 3), _fmt(c["drop"]),
                           _fmt(c.get("heldout_drop")), _fmt(c.get("measured_cost"), 3),
                           c["pipeline"]] for c in search["front"]], numeric=(0, 1, 2, 3, 4))]
    if analyses:
        parts.append("<h2>Analyses the search used</h2>")
        parts += analysis_sections(analyses, plots)
    return html_page(f"winnow compile: {source}", parts), plots
