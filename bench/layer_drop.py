"""Evidence for layer dropping: for each zoo model, k regions removed, chosen by layer-similarity,
das-skip, the first k, or at random (mean of 5 seeds), replaced by identity, a fitted linear
adapter, or a linear adapter with a context term (selections judged for that replacement);
held-out fidelity, task metric, and latency ratio vs the original (ORT, interleaved).

    python bench/layer_drop.py [--models minilm,tiny-gpt,digits-vit] [--ks 1,2,3] [--levels ...]
                               [--replacements identity,linear,context] [--repeats 20]
                               [--batch 1] [--threads N]

Latency is timed exactly as `winnow bench A --vs B` times two artifacts (benchmark.latency_ratio:
the same session options, interleaved rounds, median of paired ratios), at batch 1 by default.

Prints a markdown table and saves it, with the command line, under --out (default: a new
temporary folder; `--out bench/results` keeps it with the repository). Progress (tqdm) on stderr.
With the defaults it runs more than 10 minutes per model on 2 cores (3 models x levels x 3 k x
3 replacements, each with a das-skip search); `--models digits-vit --ks 1` is a quick check.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import winnow.progress
from winnow import models_zoo
from winnow.measure.timing import available_cpus, first_samples, latency_ratio
from winnow.measure.fidelity import evaluate_zoo
from winnow.ir.regions import find_regions
from winnow.passes import PassContext, PassManager
from winnow.passes.analysis.calibration import task_options

LEVELS = {"minilm": ("attention", "block"), "tiny-gpt": ("block",), "digits-vit": ("block",)}
RANDOM_SEEDS = 5
REPLACEMENTS = ("identity", "linear", "context")


def drop(zm, base_ir, regions, replacement):
    """A fresh copy of the model with `regions` dropped."""
    model = zm.load_ir()
    names = ",".join(regions)
    PassManager(f"drop-layers{{regions=[{names}],replacement={replacement}}}").run(
        model, PassContext(calibration=zm.calibration()))
    return model


def score(zm, model):
    """Held-out mean cosine and task metric of a candidate."""
    fid = evaluate_zoo(zm, model)
    return fid.cosine, fid.candidate_metric, fid.metric_name


def selections(base_ir, level, k, ctx, replacement):
    """The region choices to compare at one (level, k), each judged for `replacement`; analyses
    are cached in `ctx` (the linear and context replacements share the das-skip run)."""
    candidates = [r.name for r in find_regions(base_ir).candidates(level)]
    das = ctx.get_analysis("das-skip", base_ir, level=level, k=k,
                           replacement="identity" if replacement == "identity" else "linear")
    key = "ranking" if replacement == "identity" else "ranking_linear"
    similarity = ctx.get_analysis("layer-similarity", base_ir)
    rng = np.random.default_rng(0)
    out = {"similarity": similarity[key][level][:k], "das-skip": das["selected"],
           "first-k": candidates[:k]}
    out.update({f"random-{s}": list(rng.choice(candidates, size=k, replace=False))
                for s in range(RANDOM_SEEDS)})
    return out


def bench_model(name, ks, repeats, threads, levels=None, replacements=REPLACEMENTS, batch=1):
    """Rows of the table for one zoo model."""
    zm = models_zoo.get(name)
    base_ir = zm.load_ir()
    ctx = PassContext(calibration=zm.calibration(), options=task_options(f"zoo:{zm.name}", base_ir))
    ref_cos, ref_metric, metric_name = score(zm, base_ir)
    rows = [(name, "-", 0, "original", "-", ref_cos, ref_metric, metric_name, 1.0)]
    feeds = first_samples(zm.heldout()[0], batch)
    configs = [(level, k, replacement) for level in levels or LEVELS.get(name, ("block",))
               for k in ks for replacement in replacements]
    overall = winnow.progress.counter(f"{name}: level x k x replacement", len(configs))
    for level, k, replacement in configs:
        overall.set_postfix_str(f"{level} k={k} {replacement}")
        choice = selections(base_ir, level, k, ctx, replacement)
        results, timed = {}, None
        for label, regions in winnow.progress.bar(list(choice.items()),
                                                  f"{name} {level} k={k} {replacement}"):
            model = drop(zm, base_ir, regions, replacement)
            results[label] = (regions, *score(zm, model)[:2])
            timed = model if label == "similarity" else timed
        ratio = latency_ratio(base_ir, timed, feeds, repeats, threads=threads)["median"]
        for label in ("similarity", "das-skip", "first-k"):
            regions, cos, metric = results[label]
            rows.append((name, level, k, f"{label} ({', '.join(regions)})", replacement,
                         cos, metric, metric_name, ratio))
        rand = [results[f"random-{s}"] for s in range(RANDOM_SEEDS)]
        rows.append((name, level, k, f"random (mean of {RANDOM_SEEDS})", replacement,
                     float(np.mean([r[1] for r in rand])),
                     None if rand[0][2] is None else float(np.mean([r[2] for r in rand])),
                     metric_name, ratio))
        overall.update()
    overall.close()
    return rows


def table(rows):
    """Markdown table of the rows."""
    lines = ["| model | level | k | selection | replacement | mean cosine | task metric | latency ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, level, k, label, repl, cos, metric, metric_name, ratio in rows:
        m = "-" if metric is None else f"{metric_name} {metric:.4f}"
        lines.append(f"| {name} | {level} | {k} | {label} | {repl} | {cos:.4f} | {m} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    """Run the benchmark and print/save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,tiny-gpt,digits-vit")
    parser.add_argument("--ks", default="1,2,3")
    parser.add_argument("--levels", default="", help="e.g. attention,block (default: per model)")
    parser.add_argument("--replacements", default=",".join(REPLACEMENTS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="ORT intra-op threads (default: the CPUs this process may use)")
    parser.add_argument("--batch", type=int, default=1,
                        help="held-out samples per timed run (default 1, as `winnow bench`)")
    parser.add_argument("--out", default=None,
                        help="folder for the results file (default: a new temporary folder)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="winnow-layer-drop-"))
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for name in args.models.split(","):
        levels = [lv for lv in args.levels.split(",") if lv] or None
        rows += bench_model(name, ks, args.repeats, args.threads, levels,
                            tuple(args.replacements.split(",")), args.batch)
    text = table(rows)
    print(text)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    command = " ".join(argv or sys.argv[1:])
    header = (f"# layer dropping evidence\n\ncommand: `python bench/layer_drop.py {command}`\n\n"
              f"machine: {platform.processor() or platform.machine()}, ORT {ort.__version__}, "
              f"latency ratio = original/candidate median of paired interleaved runs on one "
              f"held-out batch of {args.batch} in benchmark.timing_session (the sessions `winnow bench` times), "
              f"{args.threads or available_cpus()} threads; random = mean over {RANDOM_SEEDS} seeds "
              "(latency measured on the similarity choice). Selections are judged for the replacement: "
              "similarity ranks by cos(X, Y) for identity and by the cross-fitted linear-adapter "
              "cosine for linear/context; das-skip gates to the entry or to entry + linear adapter. "
              "context = x W + mean(x) V + b (masked / causal mean over the sequence).\n\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"layer-drop-{stamp}.md"
    out.write_text(header + text + "\n")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
