"""The HTML redundancy report of `winnow analyze`: one self-contained page (inline CSS, plots as
base64 PNG images drawn with matplotlib's Agg canvas) built from the analysis.json data alone."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

COLORS = {"attention": "#4c72b0", "mlp": "#dd8452", "block": "#55a868"}
KIND_LABELS = {"attention": "attention", "mlp": "MLP", "block": "block"}
TOP = 5

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       margin: 0 auto; max-width: 1100px; padding: 24px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 30px 0 8px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 18px 0 6px; }
.sub { color: #555; margin: 0 0 16px; } .note { background: #fff6e0; border-left: 4px solid #e0a800;
     padding: 10px 14px; margin: 12px 0; }
.error { background: #fdecea; border-left: 4px solid #c62828; padding: 10px 14px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 8px 0 16px; border: 1px solid #eee; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
pre { background: #f7f7f9; padding: 10px; overflow-x: auto; }
.swatch { display: inline-block; width: 11px; height: 11px; margin-right: 5px;
          vertical-align: -1px; border-radius: 2px; }
"""


# -- plots ------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Any:
    """A matplotlib figure (Agg, constrained layout) of the report's style."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png_base64(fig: Any) -> str:
    """The figure as a base64 PNG (drawn on matplotlib's Agg canvas; no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bar_width(count: int) -> float:
    return min(max(6.0, 0.45 * count + 2.5), 16.0)


def short_labels(names: Sequence[str]) -> tuple[list[str], str]:
    """Tick labels without the dotted prefix every name shares (each keeps its last part)."""
    split = [n.split(".") for n in names]
    common = 0
    if len(split) > 1:
        while all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
            common += 1
    prefix = ".".join(split[0][:common]) + "." if common else ""
    return [".".join(p[common:]) for p in split], prefix


def _xticks(ax: Any, names: Sequence[str], marked: Sequence[str] = ()) -> None:
    labels, prefix = short_labels(names)
    labels = [f"{label} *" if name in marked else label for name, label in zip(names, labels)]
    longest = max(map(len, labels), default=0)
    tilt = longest * len(labels) > 48 or longest > 14
    ax.set_xticks(list(range(len(names))), labels, rotation=55 if tilt else 0,
                  ha="right" if tilt else "center", rotation_mode="anchor" if tilt else "default",
                  fontsize=8)
    if prefix:
        ax.set_xlabel(f"regions (names after '{prefix}')", fontsize=8)


def _smooth(values: Sequence[float]) -> list[float]:
    """Trailing moving average over ~5% of the steps (at least 5)."""
    window = max(5, len(values) // 20)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _legend(ax: Any, kinds: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    shown = [k for k in COLORS if k in kinds]
    if len(shown) > 1:
        ax.figure.legend(handles=[Patch(color=COLORS[k], label=KIND_LABELS[k]) for k in shown],
                         loc="outside upper right", ncols=len(shown), fontsize=8, frameon=False)


def similarity_plot(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """Two bar charts side by side: cos(X, Y) and angular distance per region, coloured by kind."""
    names = [r["name"] for r in rows]
    colors = [COLORS.get(r.get("kind"), "#888888") for r in rows]
    cos = [_number(r.get("cos")) for r in rows]
    angular = [_number(r.get("angular")) for r in rows]
    fig = new_figure(_bar_width(len(rows)) * 1.6, 3.9)
    ax_cos, ax_ang = fig.subplots(1, 2)
    x = range(len(rows))
    ax_cos.bar(x, cos, color=colors)
    finite = [c for c in cos if math.isfinite(c)] or [1.0]
    low = min(finite)
    spread = 1.0 - low
    ax_cos.set_ylim(max(-1.0, low - max(0.1 * spread, 0.002)), 1.0 + max(0.02 * spread, 1e-4))
    ax_cos.set_ylabel("mean cos(X, Y)  (1 = no change)")
    ax_cos.set_title(f"{title}: cosine of stream in vs out", fontsize=10)
    ax_ang.bar(x, angular, color=colors)
    ax_ang.set_ylim(0.0, max([a for a in angular if math.isfinite(a)] + [1e-3]) * 1.15)
    ax_ang.set_ylabel("angular distance arccos(cos)/π")
    ax_ang.set_title(f"{title}: angular distance (0 = redundant)", fontsize=10)
    for ax in (ax_cos, ax_ang):
        _xticks(ax, names)
        ax.grid(axis="y", alpha=0.3)
    _legend(ax_cos, [r.get("kind") for r in rows])
    return png_base64(fig)


def das_curve_plot(curve: Mapping[str, Sequence[float]]) -> str:
    """Mean reward and mean loss of the sampled skip sets per bandit step."""
    reward = [_number(v) for v in curve.get("reward", [])]
    loss = [_number(v) for v in curve.get("loss", [])]
    fig = new_figure(10.5, 3.6)
    ax_r, ax_l = fig.subplots(1, 2)
    for ax, values, color, title in (
            (ax_r, reward, "#2a9d8f", "mean reward exp(-loss) of the step's skip sets"),
            (ax_l, loss, "#c44e52", "mean loss of the step's skip sets")):
        steps = range(1, len(values) + 1)
        ax.plot(steps, values, color=color, lw=0.8, alpha=0.35, label="per step")
        if len(values) >= 10:
            ax.plot(steps, _smooth(values), color=color, lw=2.0, label="moving average")
            ax.legend(fontsize=8, loc="best")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return png_base64(fig)


def das_logits_plot(rows: Sequence[Mapping[str, Any]], selected: Sequence[str]) -> str:
    """Final logit and skip probability p = sigmoid(logit) per candidate region."""
    names = [r["name"] for r in rows]
    colors = [COLORS.get(r.get("kind"), "#888888") for r in rows]
    fig = new_figure(_bar_width(len(rows)) * 1.6, 3.9)
    ax_logit, ax_p = fig.subplots(1, 2)
    x = list(range(len(rows)))
    ax_logit.bar(x, [_number(r.get("logit")) for r in rows], color=colors)
    ax_logit.axhline(0.0, color="#333", lw=0.8)
    ax_logit.set_title("final logit per region (higher = more skippable)", fontsize=10)
    ax_p.bar(x, [_number(r.get("p")) for r in rows], color=colors)
    ax_p.set_ylim(0.0, 1.0)
    ax_p.axhline(0.5, color="#333", lw=0.8, ls=":")
    ax_p.set_title("final p = sigmoid(logit)", fontsize=10)
    for ax in (ax_logit, ax_p):
        _xticks(ax, names, selected)
        ax.grid(axis="y", alpha=0.3)
    _legend(ax_p, [r.get("kind") for r in rows])
    return png_base64(fig)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# -- html -------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _sentence(text: Any) -> str:
    text = str(text).strip()
    return text[:1].upper() + text[1:].rstrip(".") + "."


def _note(text: Any) -> str:
    return f'<p class="note">{_e(_sentence(text))}</p>'


def img_tag(data: str, alt: str) -> str:
    """An <img> of a base64 PNG."""
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def html_table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]],
               numeric: Sequence[int] = ()) -> str:
    """An HTML table, cells escaped; `numeric` columns right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header or ())
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return "–" if not math.isfinite(number) else f"{number:.{digits}f}"


def _heads_text(heads: Mapping[str, Any] | None) -> str:
    if not heads:
        return ""
    n, dim, kv = heads.get("num_heads"), heads.get("head_dim"), heads.get("num_kv_heads")
    text = f"{n} × {dim}"
    if kv is not None and kv != n:
        text += f" ({kv} KV heads)"
    return text


def _value_text(value: Mapping[str, Any]) -> str:
    shape = value.get("shape")
    dims = "?" if shape is None else "[" + ", ".join("?" if d is None else str(d)
                                                     for d in shape) + "]"
    return f"{value.get('name')} {value.get('dtype')} {dims}"


def _region_rows(blocks: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for block in blocks:
        for region in [block, *block.get("parts", [])]:
            rows.append([region["name"], region["kind"], region["layout"], region.get("nodes", ""),
                         "yes" if region.get("droppable") else
                         f"no: {region.get('not_droppable') or 'shape changes'}",
                         _heads_text(region.get("heads"))])
    return rows


def _timings_rows(timings: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for key, value in timings.items():
        if isinstance(value, Mapping):
            rows += [[f"{key}: {name}", _fmt(sec, 3)] for name, sec in value.items()]
        else:
            rows.append([key, _fmt(value, 3)])
    return rows


def _regions_or_problem(result: Mapping[str, Any], empty: str) -> tuple[list, str | None]:
    """An analysis's regions, or the HTML to show instead (its error, or its note)."""
    if "error" in result:
        return [], f'<p class="error">{_e(result["error"])}</p>'
    regions = result.get("regions") or []
    if not regions:
        return [], _note(result.get("note", empty))
    return regions, None


def _similarity_section(result: Mapping[str, Any], plots: list[str]) -> list[str]:
    parts = ["<h2>Layer similarity</h2>",
             "<p>For each region, the mean over all real tokens (channel vectors per position for "
             "CNN blocks) of cos(X, Y), X the residual stream entering it and Y the stream "
             "leaving it. A cosine near 1 (angular distance near 0) means the region barely "
             "changes the stream: a candidate to drop. Block influence = 1 − cos (ShortGPT).</p>"]
    regions, problem = _regions_or_problem(result, "no regions were scored")
    if problem:
        return parts + [problem]
    parts.append(f"<p class=\"sub\">{_e(result.get('samples', '?'))} calibration samples, regions "
                 f"found from {_e(result.get('source', '?'))}, "
                 f"{_fmt(result.get('seconds'), 2)} s.</p>")
    blocks = [r for r in regions if r.get("kind") == "block"]
    subs = [r for r in regions if r.get("kind") in ("attention", "mlp")]
    if blocks:
        parts.append("<h3>Per block</h3>")
        parts.append(img_tag(similarity_plot(blocks, "blocks"), "similarity per block"))
        plots.append("similarity-blocks")
    if subs:
        parts.append("<h3>Per sub-layer</h3>"
                     f'<p><span class="swatch" style="background:{COLORS["attention"]}"></span>'
                     f'attention &nbsp; <span class="swatch" style="background:{COLORS["mlp"]}">'
                     "</span>MLP</p>")
        parts.append(img_tag(similarity_plot(subs, "sub-layers"), "similarity per sub-layer"))
        plots.append("similarity-sublayers")
    else:
        parts.append("<p>The blocks have no attention / MLP sub-layers (e.g. CNN blocks), so there "
                     "is no per-sub-layer view.</p>")
    parts.append("<h3>Scores</h3>")
    parts.append("<p><i>linear-adapter cos</i>: cos(Y, X + XW + b) for a ridge adapter fitted on "
                 "half the samples and scored on the other half; high = a linear adapter can "
                 "replace the region (drop-layers ranks by it when replacement=linear).</p>")
    parts.append("<p>A block whose shortcut is a projection (ResNet downsampling) is measured "
                 "through it: X is the shortcut's output, what is left when its branch is removed "
                 "(such blocks change shape and are never dropped). A region whose X or Y is NaN, "
                 "(near) zero or points one way everywhere is not measurable and never ranked.</p>")
    parts.append(html_table(["region", "kind", "layout", "cos", "block influence", "angular",
                         "linear-adapter cos", "vectors", "note"],
                        [[r["name"], r.get("kind"), r.get("layout"), _fmt(r.get("cos"), 5),
                          _fmt(r.get("block_influence"), 5), _fmt(r.get("angular"), 5),
                          _fmt(r.get("linear_cos"), 5), r.get("vectors", ""), _score_note(r)]
                         for r in regions],
                        numeric=(3, 4, 5, 6, 7)))
    return parts


def _score_note(row: Mapping[str, Any]) -> str:
    """Why a region has no scores, or that it was measured through its projection shortcut."""
    if row.get("measurable") is False:
        return f"not measurable: {row.get('reason', '')}"
    return "via projection shortcut" if row.get("measured_from") == "shortcut" else ""


_SKIP_AS = {"identity": "its entry (identity)", "linear": "entry + a ridge-fitted linear adapter"}


def _das_section(result: Mapping[str, Any], plots: list[str]) -> list[str]:
    parts = ["<h2>DAS skip search</h2>",
             "<p>A k-armed bandit (DAS, NeurIPS 2023) with one logit per candidate region: "
             "each step samples skip sets of k regions with weights p = sigmoid(logit), scores "
             "each by reward exp(−loss) and moves the logits of its regions by "
             "lr·(r − b)·p(1 − p). The regions with the highest final logits are the most "
             "skippable.</p>"]
    regions, problem = _regions_or_problem(result, "no regions were searched")
    if problem:
        return parts + [problem]
    selected = result.get("selected") or []
    parts.append(f"<p class=\"sub\">level {_e(result.get('level'))}, k = {_e(result.get('k'))}, "
                 f"{len(result.get('curve', {}).get('reward', []))} steps, loss: "
                 f"{_e(result.get('loss', '?'))}, skipped region becomes: "
                 f"{_e(_SKIP_AS.get(result.get('replacement', 'identity'), '?'))}, "
                 f"{_fmt(result.get('seconds'), 2)} s. "
                 f"Selected: <b>{_e(', '.join(selected) or 'none')}</b> (marked * below).</p>")
    curve = result.get("curve") or {}
    if curve.get("reward") or curve.get("loss"):
        parts.append("<h3>Learning curve</h3>")
        parts.append(img_tag(das_curve_plot(curve), "DAS learning curve"))
        plots.append("das-curve")
        rewards = [_number(v) for v in curve.get("reward", [])]
        if len(rewards) > 1 and max(rewards) - min(rewards) <= 1e-9 * max(1.0, abs(rewards[0])):
            parts.append('<p class="note">The mean reward is the same at every step: each step '
                         "sampled every possible skip set (as many sets per step as there are "
                         "k-subsets of the candidates) on the same calibration data, so the "
                         "step mean does not move. The logits still learn from the reward "
                         "differences within each step (below).</p>")
    parts.append("<h3>Final logits and probabilities</h3>")
    parts.append(img_tag(das_logits_plot(regions, selected), "DAS final logits per region"))
    plots.append("das-logits")
    parts.append(html_table(["region", "kind", "logit", "p", "weight fraction"],
                        [[r["name"], r.get("kind", ""), _fmt(r.get("logit")), _fmt(r.get("p")),
                          _fmt(r.get("weight_fraction"), 3)] for r in regions], numeric=(2, 3, 4)))
    return parts


def sensitivity_plot(nodes: Sequence[Mapping[str, Any]], title: str) -> str:
    """Bars of the fidelity loss each node causes when it alone is quantized (log scale)."""
    names = [n["node"] for n in nodes]
    loss = [max(_number(n.get("loss")), 1e-9) for n in nodes]
    fig = new_figure(_bar_width(len(nodes)), 3.6)
    ax = fig.subplots()
    ax.bar(range(len(nodes)), loss, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_ylabel("1 − cosine, only this node quantized")
    ax.set_title(title, fontsize=10)
    _xticks(ax, names)
    ax.grid(axis="y", alpha=0.3)
    return png_base64(fig)


def _sensitivity_section(result: Mapping[str, Any], plots: list[str]) -> list[str]:
    parts = ["<h2>Quantization sensitivity</h2>",
             "<p>Each quantizable node quantized alone (all others float), scored on "
             f"{_e(result.get('samples', '?'))} calibration samples by mean 1 − cosine of the "
             "outputs; most sensitive first. Activation statistics explain it: max |x| over its "
             "99.9th percentile, and channels whose max is 6× the median channel's.</p>"]
    stats = {a["node"]: a for a in result.get("activations", [])}
    for mode, data in (result.get("modes") or {}).items():
        nodes = data.get("nodes") or []
        if not nodes:
            parts.append(_note(f"{mode}: {data.get('note', 'no quantizable node')}"))
            continue
        parts.append(f"<h3>{_e(mode)}</h3><p class=\"sub\">all quantized: loss "
                     f"{_fmt(data.get('all_quantized_loss'), 5)}</p>")
        parts.append(img_tag(sensitivity_plot(nodes, f"{mode}: loss per node"), f"{mode} sensitivity"))
        plots.append(f"quant-sensitivity-{mode}")
        rows = [[n["node"], n.get("op_type", ""), _fmt(n.get("loss"), 6),
                 _fmt(stats.get(n["node"], {}).get("max_over_p99_9"), 2),
                 stats.get(n["node"], {}).get("outlier_channels", "–")] for n in nodes]
        parts.append(html_table(["node", "op", "loss", "max / p99.9", "outlier channels"], rows,
                            numeric=(2, 3, 4)))
    return parts


def head_heatmap(layers: Sequence[Mapping[str, Any]], key: str, title: str) -> str:
    """Layers x heads heatmap of one per-head score (`entropy`, `importance` or `proxy`)."""
    width = max(len(layer[key]) for layer in layers)
    grid = [[*layer[key], *([float("nan")] * (width - len(layer[key])))] for layer in layers]
    fig = new_figure(min(2.5 + 0.5 * width, 14.0), 1.2 + 0.35 * len(layers))
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set_yticks(range(len(layers)), [layer["region"] for layer in layers], fontsize=8)
    ax.set_xlabel("head")
    ax.set_title(title, fontsize=10)
    return png_base64(fig)


def _heads_section(name: str, result: Mapping[str, Any], plots: list[str]) -> list[str]:
    layers = result.get("layers") or []
    parts = [f"<h2>{_e(name)}</h2>"]
    if not layers:
        return parts + [_note(result.get("note", "no attention heads were scored"))]
    keys = [("entropy", "normalised entropy (1 = uniform over visible keys)")] \
        if name == "head-entropy" else \
        [(k, t) for k, t in (("importance", f"loss when the head alone is masked "
                                             f"({result.get('loss', '')})"),
                             ("proxy", "norm of the head's contribution through the output "
                                       "projection")) if k in layers[0]]
    for key, title in keys:
        parts.append(img_tag(head_heatmap(layers, key, title), f"{name} {key}"))
        plots.append(f"{name}-{key}")
    rho = result.get("spearman") or {}
    if rho:
        parts.append(f"<p>Spearman vs masked-head loss: entropy "
                     f"{_fmt(rho.get('entropy_vs_importance'), 3)}, proxy "
                     f"{_fmt(rho.get('proxy_vs_importance'), 3)}.</p>")
    if result.get("note"):
        parts.append(_note(result["note"]))
    return parts


def channel_histogram(layers: Sequence[Mapping[str, Any]]) -> str:
    """Histogram of log10 channel scores, one outline per MLP."""
    fig = new_figure(8.0, 3.6)
    ax = fig.subplots()
    for layer in layers:
        scores = [math.log10(max(v, 1e-12)) for v in layer["scores"]]
        ax.hist(scores, bins=40, histtype="step", label=layer["region"])
    ax.set_xlabel("log10 channel score")
    ax.set_ylabel("channels")
    ax.legend(fontsize=7)
    return png_base64(fig)


def _channels_section(result: Mapping[str, Any], plots: list[str]) -> list[str]:
    layers = [layer for layer in result.get("layers") or [] if layer.get("scores")]
    groups = result.get("conv_groups") or []
    parts = ["<h2>channel-importance</h2>"]
    if not layers and not groups:
        return parts + [_note(result.get("note", "no MLP channels were scored"))]
    if layers:
        parts.append(f"<p>Score per MLP intermediate channel ({_e(result.get('score', ''))}): "
                     "||activation|| × ||down-projection row||, the norm of what the channel "
                     "adds to the MLP output; the lowest go first.</p>")
        parts.append(img_tag(channel_histogram(layers), "channel score histogram"))
        plots.append("channel-importance")
        rows = [[layer["region"], layer["width"], *_spread(layer["scores"])] for layer in layers]
        parts.append(html_table(["MLP", "channels", "min", "median", "max"], rows,
                                numeric=(1, 2, 3, 4)))
    if groups:
        scored = [{"region": g["group"], "scores": g["scores"]} for g in groups if g["scores"]]
        parts.append("<p>Conv filter groups (channels pruned together with every weight coupled "
                     "to them); a group that must stay whole says why.</p>")
        parts.append(f"<p>{_conv_summary(groups)}</p>")
        if scored:
            parts.append(img_tag(channel_histogram(scored[:12]), "conv group score histogram"))
            plots.append("channel-importance conv groups")
        rows = [[g["group"], g["channels"], *(_spread(g["scores"]) if g["scores"] else
                                              ["-", "-", "-"]), g.get("reason", "")]
                for g in groups]
        parts.append(html_table(["group", "channels", "min", "median", "max", "kept whole because"],
                                rows, numeric=(1, 2, 3, 4)))
    return parts


def _conv_summary(groups: Sequence[Mapping[str, Any]]) -> str:
    """Prunable groups and channels, and the tensors whose channels follow them through
    Concat / Split / Slice index maps."""
    prunable = [g for g in groups if g.get("prunable")]
    follow = [g for g in groups if g.get("follows")]
    fixed = [g for g in groups if not g.get("prunable") and not g.get("follows")]
    return (f"{len(prunable)} prunable groups ({sum(g['channels'] for g in prunable)} channels); "
            f"{len(follow)} Concat/Split/Slice outputs follow them "
            f"({sum(g['channels'] for g in follow)} channels pruned at the mapped positions); "
            f"{len(fixed)} kept whole ({sum(g['channels'] for g in fixed)} channels).")


def _spread(scores: Sequence[float]) -> list[str]:
    ordered = sorted(scores)
    return [_fmt(ordered[0], 4), _fmt(ordered[len(ordered) // 2], 4), _fmt(ordered[-1], 4)]


def _rankings_section(analyses: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, result in analyses.items():
        ranking = result.get("ranking") if isinstance(result, Mapping) else None
        if isinstance(ranking, Mapping):
            rows += [[name, level, ", ".join(order)] for level, order in ranking.items() if order]
            linear = result.get("ranking_linear") or {}
            rows += [[f"{name} (linear adapter)", level, ", ".join(order)]
                     for level, order in linear.items() if order]
        elif isinstance(ranking, Sequence) and not isinstance(ranking, str) and ranking:
            rows.append([name, result.get("level", ""), ", ".join(map(str, ranking))])
    if not rows:
        return []
    return ["<h2>Rankings</h2>", "<p>Most redundant / most skippable first.</p>",
            html_table(["analysis", "level", "ranking"], rows)]


def render(data: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The report page for an analysis.json object, and the names of the plots it embeds."""
    plots: list[str] = []
    model = data.get("model", {})
    regions = data.get("regions", {})
    blocks = regions.get("blocks", [])
    analyses = data.get("analyses", {})
    calib = data.get("calibration", {})
    params = model.get("params", {})
    parts = [f"<h1>winnow redundancy report: {_e(data.get('source', '?'))}</h1>",
             f"<p class=\"sub\">passes <code>{_e(data.get('passes', ''))}</code> · "
             f"{_e(model.get('nodes', '?'))} nodes · {params.get('count', 0):,} parameters · "
             f"calibration: {_e(calib.get('batches', '?'))} batches, "
             f"{_e(calib.get('samples', '?'))} samples ({_e(calib.get('source', '?'))}) · "
             f"winnow {_e(data.get('winnow_version', '?'))}</p>"]
    if not blocks:
        parts.append('<p class="note"><b>No residual blocks were detected in this model.</b> '
                     "winnow looks for regions closed by a residual Add (x + f(x), pre- or "
                     "post-norm); this model has none, so there is nothing to score or skip and "
                     "no plots are drawn.</p>")
    else:
        subs = sum(len(b.get("parts", [])) for b in blocks)
        parts.append(f"<p>{len(blocks)} residual blocks"
                     f"{f' with {subs} sub-layers' if subs else ''}, found from "
                     f"{_e(regions.get('source', '?'))}.</p>")
    parts += analysis_sections(analyses, plots)
    if blocks:
        parts += ["<h2>Regions</h2>",
                  html_table(["name", "kind", "layout", "nodes", "droppable", "heads"],
                         _region_rows(blocks), numeric=(3,))]
    inputs = [_value_text(v) for v in model.get("inputs", [])]
    outputs = [_value_text(v) for v in model.get("outputs", [])]
    parts += ["<h2>Model and timings</h2>",
              html_table(None, [["inputs", "; ".join(inputs)], ["outputs", "; ".join(outputs)],
                                ["opsets", ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in
                                                     model.get("opset_imports", {}).items())]]),
              html_table(["phase", "seconds"], _timings_rows(data.get("timings", {})), numeric=(1,))]
    return html_page(f"winnow analysis: {data.get('source', '?')}", parts), plots


def html_page(title: str, parts: Sequence[str]) -> str:
    """One self-contained page (inline CSS) of HTML `parts` under `title`."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def analysis_sections(analyses: Mapping[str, Any], plots: list[str]) -> list[str]:
    """The report's sections (with plots) for analysis results by pass name, then the rankings;
    the names of the plots drawn are appended to `plots`."""
    parts: list[str] = []
    for name, result in analyses.items():
        if name == "layer-similarity":
            parts += _similarity_section(result, plots)
        elif name == "das-skip":
            parts += _das_section(result, plots)
        elif name == "quant-sensitivity":
            parts += _sensitivity_section(result, plots)
        elif name in ("head-entropy", "head-importance"):
            parts += _heads_section(name, result, plots)
        elif name == "channel-importance":
            parts += _channels_section(result, plots)
        else:
            parts += [f"<h2>{_e(name)}</h2>",
                      f"<pre>{_e(json.dumps(result, indent=2, default=str)[:20000])}</pre>"]
    return parts + _rankings_section(analyses)
