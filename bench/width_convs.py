"""Evidence for conv filter pruning (`prune-channels{kind=conv}`, ir/conv_groups.py): digits-cnn and
ppocr-det with 25% / 50% of every prunable group's filters removed (lowest activation score first),
with and without the closed-form refit of the readers (ir/conv_refit.py), and on ppocr-det also with
round_to = ORT's NCHWc block (16 with AVX-512F, else 8): pass seconds, held-out mean cosine and
the zoo's task metric, the cost model's FLOPs ratio, and the latency ratio unpruned/pruned in ORT
fp32 (interleaved runs, median of paired ratios, `measure.timing.latency_ratio`) at batch 1 and at
the held-out batch. Wherever fewer FLOPs did not give less time (or under 3/4 of the FLOPs ratio)
a line says so, with ORT's per-op-type profile of both models (the reason).

    nice -n 10 python bench/width_convs.py [--models digits-cnn,ppocr-det] [--ratios 0.25,0.5]
                                           [--repeats 15] [--threads N]

Saves bench/results/width-convs-<date>.md (or --out) with the command line and load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion import op_profiles  # noqa: E402

import winnow.progress  # noqa: E402
from winnow import models_zoo  # noqa: E402
from winnow.cost_model import predict  # noqa: E402
from winnow.measure.fidelity import evaluate_zoo  # noqa: E402
from winnow.measure.timing import available_cpus, latency_ratio  # noqa: E402
from winnow.passes import PassContext, PassManager  # noqa: E402
from winnow.passes.analysis.calibration import task_options  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SLACK = 0.03  # a latency ratio within this of 1.0 is "no faster"
SHORTFALL = 0.75  # a latency ratio below this share of the FLOPs ratio gets a profile line


def nchwc_block() -> int:
    """Channels per block of ORT's NCHWc conv kernels (MLAS): 16 with AVX-512F, else 8."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if "avx512f" in flags else 8


def variants(name: str, ratio: float) -> list[str]:
    """The prune-channels pipelines of one model and ratio."""
    out = [f"prune-channels{{kind=conv,ratio={ratio},refit={r}}}" for r in ("false", "true")]
    if name == "ppocr-det":
        out.append(f"prune-channels{{kind=conv,ratio={ratio},refit=true,"
                   f"round_to={nchwc_block()}}}")
    return out


def pruned(zm, base, shared, pipeline):
    """A copy of `base` through `pipeline`, its pass report and seconds (analyses from `shared`)."""
    model = base.clone()
    ctx = PassContext(calibration=zm.calibration(), options=task_options(f"zoo:{zm.name}", base))
    ctx.analyses.update(shared.analyses)
    ctx.analysis_configs.update(shared.analysis_configs)
    start = time.perf_counter()
    PassManager(pipeline).run(model, ctx)
    return model, ctx.report.get("prune-channels", {}), time.perf_counter() - start


def flops(model, feeds) -> float:
    """The cost model's FLOPs at the shapes of `feeds` (the same on every target)."""
    shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
    return predict(model, "x86-avx2", input_shapes=shapes).flops


def why_not_faster(base, model, feeds, report) -> str:
    """ORT's per-op-type ms before -> after (medians of interleaved profiled runs), and how many
    kept widths are not a multiple of the NCHWc block."""
    prof = op_profiles({"base": base, "pruned": model}, feeds)
    a, b = prof["base"], prof["pruned"]
    ops = sorted(set(a) | set(b), key=lambda op: -max(a.get(op, 0), b.get(op, 0)))[:6]
    kept = [after for _, after in report.get("pruned", {}).values()]
    block = nchwc_block()
    odd = sum(k % block != 0 for k in kept)
    parts = ", ".join(f"{op} {a.get(op, 0) / 1e3:.2f}->{b.get(op, 0) / 1e3:.2f}" for op in ops)
    return (f"ORT per-op ms (median of 20 interleaved profiled runs) {parts}; sum "
            f"{sum(a.values()) / 1e3:.2f}->"
            f"{sum(b.values()) / 1e3:.2f}; {odd} of {len(kept)} kept widths not a multiple of "
            f"{block} (the NCHWc block)")


def bench_model(name, ratios, repeats, threads):
    """Rows and notes of one zoo model."""
    zm = models_zoo.get(name)
    base = zm.load_ir()
    shared = PassContext(calibration=zm.calibration(), options=task_options(f"zoo:{name}", base))
    shared.get_analysis("channel-importance", base, score="activation")
    held = zm.heldout()[0]
    sizes = {1, len(next(iter(held.values())))}
    batches = {b: {k: v[:b] for k, v in held.items()} for b in sorted(sizes)}
    ref = evaluate_zoo(zm, base)
    base_flops = {b: flops(base, f) for b, f in batches.items()}
    rows = [[name, "original", 0.0, ref.cosine, ref.reference_metric, 1.0,
             {b: 1.0 for b in batches}]]
    notes = [f"{name}: task metric {zm.metric_name}; held-out batch {max(sizes)}"]
    for ratio in ratios:
        for pipeline in variants(name, ratio):
            with winnow.progress.step(f"{name} {pipeline}"):
                model, report, seconds = pruned(zm, base, shared, pipeline)
                fid = evaluate_zoo(zm, model)
                speed = {b: latency_ratio(base, model, f, repeats, threads=threads)["median"]
                         for b, f in batches.items()}
            fewer = {b: base_flops[b] / flops(model, f) for b, f in batches.items()}
            rows.append([name, pipeline, seconds, fid.cosine, fid.candidate_metric,
                         fewer[1], speed])
            print(table(rows[-1:], batches).splitlines()[-1], flush=True)
            for b, f in batches.items():
                if fewer[b] > 1 + SLACK and speed[b] < SHORTFALL * fewer[b]:
                    verdict = "no faster" if speed[b] <= 1 + SLACK else "faster by less"
                    notes.append(f"`{pipeline}` on {name} b{b}: {fewer[b]:.2f}x fewer FLOPs, "
                                 f"latency ratio {speed[b]:.2f}x ({verdict}): "
                                 f"{why_not_faster(base, model, f, report)}")
    return rows, notes, batches


def table(rows, batches):
    """Markdown table of the rows."""
    cols = " | ".join(f"latency ratio b{b}" for b in batches)
    lines = [f"| model | pipeline | pass s | mean cosine | task metric | FLOPs ratio b1 | {cols} |",
             "|---|---|---|---|---|---|" + "---|" * len(batches)]
    for name, pipeline, seconds, cos, metric, fewer, speed in rows:
        m = "-" if metric is None else f"{metric:.4f}"
        cells = " | ".join(f"{speed[b]:.2f}x" for b in batches)
        lines.append(f"| {name} | `{pipeline}` | {seconds:.1f} | {cos:.4f} | {m} | {fewer:.2f}x | "
                     f"{cells} |")
    return "\n".join(lines)


def main(argv=None):
    """Run the benchmark and print / save the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-cnn,ppocr-det")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None,
                        help="ORT intra-op threads (default: the CPUs this process may use)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    load_before = os.getloadavg()
    text, notes = [], []
    for name in [m for m in args.models.split(",") if m]:
        rows, n, batches = bench_model(name, ratios, args.repeats, args.threads)
        text.append(table(rows, batches))
        notes += n
    load_after = os.getloadavg()
    body = "\n\n".join(text) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    print(body)
    command = " ".join(argv or sys.argv[1:])
    header = (f"# conv filter pruning evidence\n\ncommand: `nice -n 10 python bench/width_convs.py "
              f"{command}`\n\nmachine: {platform.processor() or platform.machine()}, ORT "
              f"{ort.__version__}, {args.threads or available_cpus()} threads (timing_session, as "
              "`winnow bench`); load average (1/5/15 min) "
              f"{' '.join(f'{v:.1f}' for v in load_before)} at the start, "
              f"{' '.join(f'{v:.1f}' for v in load_after)} at the end. Latency ratio = "
              "unpruned/pruned, median of paired interleaved runs in ORT fp32; FLOPs ratio = "
              "cost model unpruned/pruned; pass s = prune-channels wall time (scores cached, so "
              "without channel-importance).\n\n")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = Path(args.out) / f"width-convs-{stamp}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + body + "\n")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
