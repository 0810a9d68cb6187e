"""ppocr-rec against its 1.5x target: each pipeline's held-out sequence agreement (greedy CTC
strings equal to the original's) and its speed-up over ORT fp32 of the shipped file at batch 1
and 8, every variant timed interleaved in the same rounds (median of paired ratios).

    nice -n 10 python bench/ppocr_rec_width.py [--pipelines 'P1;P2'] [--repeats 15] [--out F]

Each pipeline runs after the lossless default pipeline, with the zoo's calibration split and
task loss in the context (as `winnow compile` gives them). Prints a markdown table and writes it
to --out (default bench/results/ppocr-rec-width-<date>.md) with the command and load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion import batch_of, compiled  # noqa: E402

from winnow import models_zoo  # noqa: E402
from winnow.measure.fidelity import evaluate_zoo  # noqa: E402
from winnow.measure.timing import (available_cpus, machine_info, paired_ratios,  # noqa: E402
                                   session_runner, time_interleaved, timing_session)
from winnow.passes.manager import DEFAULT_PIPELINE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PIPELINES = ("fuse-convs",
             "prune-channels{ratio=0.25,refit=true,round_to=16},dce,fuse-convs")


def build(zm, base, pipeline):
    """The model after the default pipeline and `pipeline`, its held-out scores and seconds."""
    start = time.perf_counter()
    model, report = compiled(zm, base, f"{DEFAULT_PIPELINE},{pipeline}")
    seconds = time.perf_counter() - start
    fid = evaluate_zoo(zm, model)
    return {"pipeline": pipeline, "model": model, "seconds": seconds, "cosine": fid.cosine,
            "metrics": fid.candidate_metrics, "report": report}


def speedups(zm, base, rows, batches, repeats, threads):
    """Per batch, per row: the median paired ratio source time / row time (interleaved)."""
    out = {}
    for b in batches:
        feeds = batch_of(zm.heldout(), b)
        runners = {"source": session_runner(timing_session(base, threads), feeds)}
        runners.update({i: session_runner(timing_session(r["model"], threads), feeds)
                        for i, r in enumerate(rows)})
        timing = time_interleaved(runners, repeats=repeats, warmup=3, desc=f"timing b{b}")
        out[b] = {i: paired_ratios(timing["source"], timing[i])["median"] for i in range(len(rows))}
        out[b]["source_ms"] = timing["source"].to_dict()["median_ms"]
    return out


def table(rows, ratios, batches) -> str:
    """Markdown: one row per pipeline."""
    head = ["pipeline (after the default pipeline)", "seq_agreement", "char_accuracy",
            "cosine"] + [f"vs ORT fp32 b{b}" for b in batches] + ["build s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        m = r["metrics"]
        cells = [f"`{r['pipeline']}`", f"{m.get('seq_agreement', float('nan')):.4f}",
                 f"{m.get('char_accuracy', float('nan')):.4f}", f"{r['cosine']:.5f}"]
        cells += [f"{ratios[b][i]:.2f}x" for b in batches] + [f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Build, score and time every pipeline; print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", default=";".join(PIPELINES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    load = [round(x, 2) for x in os.getloadavg()]
    started = datetime.datetime.now(datetime.UTC)
    zm = models_zoo.get("ppocr-rec")
    base = zm.load_ir()
    rows = []
    for pipeline in args.pipelines.split(";"):
        try:
            rows.append(build(zm, base, pipeline))
        except Exception as exc:  # noqa: BLE001 - a failed pipeline is a row of the result
            print(f"{pipeline}: failed: {type(exc).__name__}: {exc}", flush=True)
        else:
            print(f"{pipeline}: {rows[-1]['metrics']} ({rows[-1]['seconds']:.0f} s)", flush=True)
    batches = (1, 8)
    ratios = speedups(zm, base, rows, batches, args.repeats, args.threads)
    info = machine_info()
    command = shlex.join(["python", "bench/ppocr_rec_width.py",
                          *(sys.argv[1:] if argv is None else argv)])
    text = (f"# ppocr-rec: pipelines against the 1.5x target, {started:%Y-%m-%d %H:%M} UTC\n\n"
            f"Command: `nice -n 10 {command}`\n\n"
            f"Machine: {info['cpu']}, {info['available_cpus']} CPUs, onnxruntime "
            f"{info['onnxruntime']}; {args.threads} ORT threads, no spinning; load average at "
            f"start {load}, at the end {[round(x, 2) for x in os.getloadavg()]}. "
            f"{args.repeats} timed rounds after 3 warm-ups, source and every variant "
            f"interleaved; ORT fp32 median {ratios[1]['source_ms']:.1f} ms (b1), "
            f"{ratios[8]['source_ms']:.1f} ms (b8). Scores on the 48 held-out lines.\n\n"
            + table(rows, ratios, batches) + "\n")
    print(text)
    out = args.out or RESULTS / f"ppocr-rec-width-{started:%Y-%m-%d-%H%M}.md"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
