"""Evidence for width pruning: attention heads (minilm, tiny-gpt, digits-vit) and MLP channels
(minilm, tiny-gpt) removed at each ratio, chosen by each score or at random (mean over seeds),
with and without the closed-form refit: held-out fidelity (mean cosine), task metric, and latency
ratio vs the unpruned model (ORT fp32, interleaved runs, median of paired ratios); then the
issue's target row: heads + channels on minilm at batch 1 and 8, sequence 64.

    python bench/width.py [--models minilm,tiny-gpt,digits-vit] [--channel-models minilm,tiny-gpt]
                          [--ratios 0.25,0.5] [--seeds 5] [--repeats 20] [--target]

Prints markdown tables and saves them under bench/results/ (or --out) with the command line.
Latency on a shared 2-core machine is noisy: only ratios of interleaved runs are reported.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

import winnow.progress
from winnow import models_zoo
from winnow.cost_model import predict
from winnow.measure.timing import available_cpus, latency_ratio
from winnow.measure.fidelity import evaluate_zoo
from winnow.passes import PassContext, PassManager
from winnow.passes.analysis.calibration import task_options

HEAD_SOURCES = ("importance", "proxy", "entropy")
CHANNEL_SOURCES = ("activation", "weight")
RESULTS = Path(__file__).parent / "results"


def fresh_context(zm, base, shared=None):
    """A pass context with the zoo calibration data, sharing analyses already computed."""
    ctx = PassContext(calibration=zm.calibration(), options=task_options(f"zoo:{zm.name}", base))
    if shared is not None:
        ctx.analyses.update(shared.analyses)
        ctx.analysis_configs.update(shared.analysis_configs)
    return ctx


_SHARED: dict = {}
PARTIAL: list[Path] = []  # a file each finished row is appended to, so a long run shows progress


def emit(line: str) -> None:
    """Append one finished table line to the partial-results file (when there is one)."""
    for path in PARTIAL:
        with path.open("a") as f:
            f.write(line + "\n")


def shared_context(zm, base):
    """One context per model whose analyses every variant reuses (head-importance runs once)."""
    if zm.name not in _SHARED:
        _SHARED[zm.name] = fresh_context(zm, base)
    return _SHARED[zm.name]


def pruned(zm, base, shared, pipeline):
    """A copy of `base` run through `pipeline` (analyses taken from `shared`)."""
    model = base.clone()
    PassManager(pipeline).run(model, fresh_context(zm, base, shared))
    return model


def score(zm, model):
    """Held-out mean cosine and task metric."""
    fid = evaluate_zoo(zm, model)
    return fid.cosine, fid.candidate_metric, fid.metric_name


def speedup(base, model, feeds, repeats, threads):
    """Median paired latency ratio unpruned/pruned on one batch (benchmark.latency_ratio)."""
    return latency_ratio(base, model, feeds, repeats, threads=threads)["median"]


def flops_ratio(base, model, feeds):
    """Cost-model FLOPs of unpruned/pruned at the shapes of `feeds` (FLOPs are the same on every
    target; the built-in x86 profile spares a host calibration)."""
    shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
    return (predict(base, "x86-avx2", input_shapes=shapes).flops
            / predict(model, "x86-avx2", input_shapes=shapes).flops)


def flops_without_time(rows, slack=0.02):
    """A line per (model, kind, ratio, refit) whose FLOPs fell but whose latency did not."""
    lines = {}
    for name, kind, ratio, _source, refit, _cos, _metric, _name, flops, speed in rows:
        if flops > 1 + slack and speed <= 1 + slack:
            lines[(name, kind, ratio, refit)] = (
                f"{name} {kind} {ratio:.2f} refit={'yes' if refit else 'no'}: {flops:.2f}x fewer "
                f"FLOPs but latency ratio {speed:.2f}x")
    return list(lines.values())


def rows_for(zm, base, shared, kind, ratio, sources, seeds, repeats, threads, feeds):
    """Table rows of one (model, kind, ratio): each source and random, with and without refit."""
    pass_name = "prune-heads" if kind == "heads" else "prune-channels"
    rows = []
    for refit in (False, True):
        opts = f"ratio={ratio},refit={'true' if refit else 'false'}"
        timed = None
        for source in sources:
            model = pruned(zm, base, shared, f"{pass_name}{{{opts},source={source}}}")
            timed = timed or model
            rows.append([zm.name, kind, ratio, source, refit, *score(zm, model)])
        rand = [score(zm, pruned(zm, base, shared,
                                 f"{pass_name}{{{opts},source=random,seed={s}}}"))
                for s in range(seeds)]
        rows.append([zm.name, kind, ratio, f"random (mean of {seeds})", refit,
                     float(np.mean([r[0] for r in rand])),
                     None if rand[0][1] is None else float(np.mean([r[1] for r in rand])),
                     rand[0][2]])
        speed = speedup(base, timed, feeds, repeats, threads)
        flops = flops_ratio(base, timed, feeds)
        for row in rows[-len(sources) - 1:]:
            row += [flops, speed]
            emit(table([row]).splitlines()[-1])
    return rows


def bench_model(name, kinds, ratios, seeds, repeats, threads):
    """All rows of one zoo model, and the Spearman line of its head scores."""
    zm = models_zoo.get(name)
    base = zm.load_ir()
    shared = shared_context(zm, base)
    cos, metric, metric_name = score(zm, base)
    rows = [[name, "-", 0.0, "original", False, cos, metric, metric_name, 1.0, 1.0]]
    notes = []
    if "heads" in kinds:
        importance = shared.get_analysis("head-importance", base)
        shared.get_analysis("head-entropy", base)
        rho = importance.get("spearman", {})
        notes.append(f"{name}: {sum(len(lay['importance']) for lay in importance['layers'])} heads,"
                     f" head-importance {importance['seconds']:.0f}s ({importance['loss']}); "
                     f"Spearman vs importance: entropy {_fmt(rho.get('entropy_vs_importance'))}, "
                     f"proxy {_fmt(rho.get('proxy_vs_importance'))}")
    if "channels" in kinds:
        shared.get_analysis("channel-importance", base, score="activation")
    feeds = zm.heldout()[0]
    for kind in kinds:
        sources = HEAD_SOURCES if kind == "heads" else CHANNEL_SOURCES
        for ratio in ratios:
            if kind == "channels":  # the weight score is a different cached analysis
                shared.analyses.pop("channel-importance", None)
            rows += rows_for(zm, base, shared, kind, ratio, sources, seeds, repeats, threads, feeds)
    return rows, notes


def _fmt(value):
    return "n/a" if value is None else f"{value:+.3f}"


def target_rows(pipelines, repeats, threads):
    """minilm with heads + channels pruned: held-out cosine and latency ratio at b1 and b8, s64."""
    zm = models_zoo.get("minilm")
    base = zm.load_ir()
    shared = shared_context(zm, base)
    held = zm.heldout()[0]
    rows = []
    for pipeline in pipelines:
        model = pruned(zm, base, shared, pipeline)
        cos, metric, _ = score(zm, model)
        speed = [speedup(base, model, {k: v[:b] for k, v in held.items()}, repeats, threads)
                 for b in (1, 8)]
        rows.append((pipeline, cos, metric, *speed))
        emit(target_table(rows[-1:]).splitlines()[-1])
    return rows


def table(rows):
    """Markdown table of the pruning rows."""
    lines = ["| model | what | ratio removed | chosen by | refit | mean cosine | task metric | "
             "FLOPs ratio | latency ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for name, kind, ratio, source, refit, cos, metric, metric_name, flops, speed in rows:
        m = "-" if metric is None else f"{metric_name} {metric:.4f}"
        lines.append(f"| {name} | {kind} | {ratio:.2f} | {source} | {'yes' if refit else 'no'} | "
                     f"{cos:.4f} | {m} | {flops:.2f}x | {speed:.2f}x |")
    return "\n".join(lines)


def target_table(rows):
    """Markdown table of the target rows."""
    lines = ["| minilm pipeline | mean cosine | spearman | b1 s64 speed-up | b8 s64 speed-up |",
             "|---|---|---|---|---|"]
    for pipeline, cos, metric, b1, b8 in rows:
        lines.append(f"| `{pipeline}` | {cos:.4f} | {metric:.4f} | {b1:.2f}x | {b8:.2f}x |")
    return "\n".join(lines)


TARGET_PIPELINES = (
    "fuse",
    "prune-channels{ratio=0.5,refit=true,round_to=16},fuse",
    "prune-heads{ratio=0.25,refit=true},prune-channels{ratio=0.25,refit=true,round_to=16},fuse",
    "prune-heads{ratio=0.25,refit=true},prune-channels{ratio=0.5,refit=true,round_to=16},fuse",
    "prune-heads{ratio=0.5,refit=true},prune-channels{ratio=0.5,refit=true,round_to=16},fuse",
)


def main(argv=None):
    """Run the benchmark and print/save the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,tiny-gpt,digits-vit",
                        help="models for head pruning")
    parser.add_argument("--channel-models", default="minilm,tiny-gpt")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="ORT intra-op threads (default: the CPUs this process may use)")
    parser.add_argument("--target", action="store_true", help="also the minilm b1/b8 target rows")
    parser.add_argument("--pipelines", default="", help="target pipelines separated by ';' "
                        "(default: the built-in list)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    PARTIAL.append(Path(args.out) / f"width-{stamp}.partial.md")
    PARTIAL[0].parent.mkdir(parents=True, exist_ok=True)
    heads = [m for m in args.models.split(",") if m]
    channels = [m for m in args.channel_models.split(",") if m]
    rows, notes = [], []
    for name in dict.fromkeys(heads + channels):
        kinds = [k for k, names in (("heads", heads), ("channels", channels)) if name in names]
        with winnow.progress.step(f"{name}: {', '.join(kinds)}"):
            r, n = bench_model(name, kinds, ratios, args.seeds, args.repeats, args.threads)
        rows += r
        notes += n
    notes += flops_without_time(rows)
    text = table(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    if args.target:
        pipelines = [p for p in args.pipelines.split(";") if p] or TARGET_PIPELINES
        text += "\n\n" + target_table(target_rows(pipelines, args.repeats, args.threads))
    print(text)
    PARTIAL[0].unlink(missing_ok=True)
    command = " ".join(argv or sys.argv[1:])
    header = (f"# width pruning evidence\n\ncommand: `python bench/width.py {command}`\n\n"
              f"machine: {platform.processor() or platform.machine()}, ORT {ort.__version__}, "
              f"{args.threads or available_cpus()} threads (benchmark.timing_session, as "
              "`winnow bench`); latency ratio = unpruned/pruned median of paired interleaved "
              "runs on one held-out batch (per-layer ratios give every source the "
              "same shapes, so latency is measured once per ratio and refit setting); random = "
              f"mean over {args.seeds} seeds; heads by entropy = highest entropy removed first.\n\n")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"width-{stamp}.md"
    out.write_text(header + text + "\n")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
