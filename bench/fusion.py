"""Evidence for fusion: every zoo model through the lossless pipeline with and without `fuse`:
which ops fused, the largest absolute output difference on held-out inputs, and the latency
ratio unfused/fused at batch 1 and 8 (ORT fp32, interleaved runs, median of paired ratios).

    python bench/fusion.py [--models minilm,tiny-gpt,...] [--repeats 30] [--profile]

With --profile, a model whose fused copy is slower gets ORT's per-op-type time of both copies
(ORT's profiler), so the table says which kernels the time moved to. Prints a markdown table and
saves it under bench/results/ (or --out) with the command line, machine and load average.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from winnow import models_zoo
from winnow.ir.execute import model_bytes
from winnow.measure.timing import (available_cpus, bench_session_options, first_samples,
                                   machine_info, paired_ratios, session_runner,
                                   time_interleaved, timing_session)
from winnow.passes import PassContext, PassManager
from winnow.passes.analysis.calibration import task_options
from winnow.passes.manager import DEFAULT_PIPELINE
from winnow.passes.checked import max_output_error

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 8)
TOLERANCE = 1e-4


def compiled(zm, base, pipeline):
    """A copy of `base` run through `pipeline` with the zoo calibration data, and its report."""
    ctx = PassContext(calibration=zm.calibration(), options=task_options(f"zoo:{zm.name}", base))
    model = base.clone()
    PassManager(pipeline).run(model, ctx)
    return model, ctx.report


def batch_of(feeds_list, batch):
    """The first `batch` held-out samples (batches concatenated when the first is smaller)."""
    joined = {k: np.concatenate([f[k] for f in feeds_list]) if np.ndim(feeds_list[0][k]) else
              feeds_list[0][k] for k in feeds_list[0]}
    return first_samples(joined, batch)


def ratio_at(unfused, fused, feeds, repeats):
    """Median, min, max of unfused/fused time per interleaved round on one batch."""
    runners = {"unfused": session_runner(timing_session(unfused), feeds),
               "fused": session_runner(timing_session(fused), feeds)}
    timings = time_interleaved(runners, repeats=repeats, warmup=3)
    return paired_ratios(timings["unfused"], timings["fused"])


def profiled_session(model, folder, tag):
    """An ORT session as `timing_session` builds it, with ORT's profiler on."""
    import onnxruntime as ort

    options = bench_session_options(available_cpus())
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(folder, tag)
    return ort.InferenceSession(model_bytes(model), options, providers=["CPUExecutionProvider"])


def per_run_op_times(events):
    """ORT profiler events split by run: per run, microseconds per op type."""
    runs = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"]
    times = [collections.Counter() for _ in runs]
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            for i, (start, end) in enumerate(runs):
                if start <= event["ts"] <= end:
                    times[i][event["args"]["op_name"]] += event["dur"]
                    break
    return times


def op_profiles(models, feeds, runs=20):
    """Per model, the median over `runs` interleaved profiled runs of the microseconds each op
    type takes (interleaved like the timing, so a busy spell hits every model alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {tag: profiled_session(m, tmp, tag) for tag, m in models.items()}
        runners = {tag: session_runner(s, feeds) for tag, s in sessions.items()}
        time_interleaved(runners, repeats=runs, warmup=0)
        events = {tag: json.loads(Path(s.end_profiling()).read_text())
                  for tag, s in sessions.items()}
    result = {}
    for tag, evs in events.items():
        per_run = per_run_op_times(evs)
        ops = set().union(*per_run) if per_run else set()
        result[tag] = {op: float(np.median([r.get(op, 0) for r in per_run])) for op in ops}
    return result


def profile_note(name, unfused, fused, feeds, batch):
    """Where the time went in an unfused and a fused session: per-op-type ms, largest first."""
    prof = op_profiles({"unfused": unfused, "fused": fused}, feeds)
    a, b = prof["unfused"], prof["fused"]
    ops = sorted(set(a) | set(b), key=lambda op: -max(a.get(op, 0), b.get(op, 0)))[:8]
    parts = [f"{op} {a.get(op, 0) / 1e3:.2f}->{b.get(op, 0) / 1e3:.2f}" for op in ops]
    return (f"{name} b{batch}: ORT per-op ms unfused->fused (median of 20 interleaved profiled "
            f"runs, after ORT's own fusions): {', '.join(parts)}; sum of medians "
            f"{sum(a.values()) / 1e3:.2f}->{sum(b.values()) / 1e3:.2f}")


def bench_model(name, repeats, profile):
    """One row of the table (and notes) for zoo model `name`."""
    zm = models_zoo.get(name)
    base = zm.load_ir()
    unfused, _ = compiled(zm, base, DEFAULT_PIPELINE)
    fused, report = compiled(zm, base, DEFAULT_PIPELINE + ",fuse")
    fuse = report.get("fuse", {})
    heldout = zm.heldout()
    error = max_output_error(unfused, fused, heldout)
    ratios, notes = {}, []
    for batch in BATCHES:
        feeds = batch_of(heldout, batch)
        ratios[batch] = ratio_at(unfused, fused, feeds, repeats)
        if profile and fuse.get("fused") and ratios[batch]["median"] < 1.0:
            notes.append(profile_note(name, unfused, fused, feeds, batch))
    if "skipped" in fuse:
        notes.append(f"{name}: fuse left the model unfused: {fuse['skipped']}")
    rows = sum(int(next(iter(f.values())).shape[0]) for f in heldout)
    return {"model": name, "fused": fuse.get("fused", {}), "fusions": fuse.get("fusions", {}),
            "error": error, "heldout_samples": rows, "ratios": ratios, "notes": notes}


def table(results):
    """Markdown table of the fusion rows."""
    lines = ["| model | fused ops (count) | held-out max abs diff | equal (<= 1e-4) | "
             "unfused/fused b1 | unfused/fused b8 |", "|---|---|---|---|---|---|"]
    for r in results:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(r["fused"].items())) or "none matched"
        cells = [f"{r['ratios'][b]['median']:.2f}x ({r['ratios'][b]['min']:.2f}-"
                 f"{r['ratios'][b]['max']:.2f})" for b in BATCHES]
        lines.append(f"| {r['model']} | {ops} | {r['error']:.2e} ({r['heldout_samples']} samples)"
                     f" | {'yes' if r['error'] <= TOLERANCE else 'NO'} | {' | '.join(cells)} |")
    return "\n".join(lines)


def slower_lines(results):
    """A line for each model and batch where the fused copy ran slower (median ratio < 1)."""
    return [f"{r['model']} b{b}: fused is slower ({r['ratios'][b]['median']:.2f}x)"
            for r in results for b in BATCHES if r["fused"] and r["ratios"][b]["median"] < 1.0]


def main(argv=None):
    """Run the benchmark and print/save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(models_zoo.names()))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile", action="store_true",
                        help="ORT per-op profile of models the fusion makes slower")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    machine = machine_info()
    results = []
    for name in [m for m in args.models.split(",") if m]:
        results.append(bench_model(name, args.repeats, args.profile))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    notes = slower_lines(results) + [n for r in results for n in r["notes"]]
    fusions = [f"{r['model']}: {json.dumps(r['fusions'])}" for r in results if r["fusions"]]
    text = (table(results) + "\n\nonnxscript/winnow rewrites applied:\n" +
            "\n".join(f"- {f}" for f in fusions) + "\n\n" + "\n".join(f"- {n}" for n in notes))
    print(text)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    load_end = [round(x, 2) for x in os.getloadavg()]
    header = (f"# fusion: lossless pipeline with and without `fuse`\n\n"
              f"command: `nice -n 10 python bench/fusion.py {command}`\n\n"
              f"machine: {machine['cpu']}, {machine['available_cpus']} CPUs, ORT "
              f"{machine['onnxruntime']}, onnx {machine['onnx']}; load average at start "
              f"{machine['load_average']}, at end {load_end}\n\n"
              f"unfused = `{DEFAULT_PIPELINE}`, fused = the same then `fuse`; both timed in "
              "`timing_session` (ORT_ENABLE_ALL, so ORT's own fusions run on both), interleaved, "
              f"{args.repeats} rounds; ratio = median of paired unfused/fused (min-max); "
              "diff = largest absolute difference of any float output over all held-out "
              "batches.\n\n")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = Path(args.out) / f"fusion-{stamp}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + text + "\n")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
