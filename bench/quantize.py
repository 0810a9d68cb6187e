"""Quantization table: winnow's `fuse` and `quantize` modes against ORT's one-line int8 peers.

For each zoo model, in one run, every variant timed interleaved (round-robin, order reversed
every round) and scored on the zoo's held-out split against ORT fp32:

- ORT fp32                the export, all ORT graph optimizations on (the reference)
- ORT dyn int8 (tensor)   quantize_dynamic after quant_pre_process (the old peer row)
- ORT dyn int8 (channel)  quantize_dynamic(per_channel=True): the peer to beat
- winnow <pipeline>       fuse only, and each quantize mode with and without fuse, with
                          sensitivity-guided exclusions (exclude=[auto]: the most sensitive
                          nodes stay float until the calibration loss is within the budget),
                          with split-outliers (outlier channels through a small float MatMul;
                          free_only: only where it adds no pass, the row that beats the peer on
                          MiniLM), with smooth-activations (SmoothQuant; convs=true equalizes
                          Conv channels, for ppocr-rec) and uint8 weights (exact u8u8 kernels)

Columns: median ms and speed-up over ORT fp32 (median of paired ratios) at each batch size
(sequence 64 for MiniLM), held-out mean cosine (min), the task metric, file size. The markdown
is printed and saved under bench/results/ (a .json beside it).

    python bench/quantize.py [--models minilm] [--repeats 20] [--batches 1,8] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import Variant, attempt, ort_runner, pre_process, row_groups, tune_threads  # noqa: E402

from winnow import models_zoo, progress  # noqa: E402
from winnow.measure.timing import (  # noqa: E402
    available_cpus,
    machine_info,
    paired_ratios,
    rotating,
    time_interleaved,
)

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "ORT fp32"
PEER = "ORT dyn int8 (channel)"
PIPELINES = (
    "fuse",
    "quantize{mode=int8-dynamic}",
    "split-outliers,quantize{mode=int8-dynamic}",
    "split-outliers{factor=8},quantize{mode=int8-dynamic}",
    "split-outliers{factor=4},quantize{mode=int8-dynamic}",
    "split-outliers{free_only=true,factor=4},quantize{mode=int8-dynamic}",
    "fuse,quantize{mode=int8-dynamic}",
    "quantize{mode=int8-dynamic,exclude=[auto],budget=0.004}",
    "quantize{mode=int8-static}",
    "smooth-activations,quantize{mode=int8-static}",
    "smooth-activations,quantize{mode=int8-dynamic}",
    "smooth-activations{convs=true,matmuls=false},quantize{mode=int8-static,weight_type=uint8}",
    "quantize{mode=int8-weight,block_size=32}",
    "quantize{mode=int4-weight,block_size=32}",
    "quantize{mode=fp16}",
)
QUICK = PIPELINES[1:6]


def ort_peers(zm: Any, work: Path, threads: int) -> list[Variant]:
    """ORT fp32 and ORT's dynamic int8, per tensor and per channel."""
    from onnxruntime.quantization import quantize_dynamic

    from winnow.backends.ort import write_model

    fp32 = Variant(REFERENCE)
    with attempt(fp32, f"{zm.name}: export"):
        (work / "fp32").mkdir()
        write_model(zm.load_ir(), work / "fp32")
        fp32.path = work / "fp32" / "model.onnx"
        fp32.run = ort_runner(fp32.path, threads)
    source, _ = pre_process(zm.name, fp32.path, work / "pre.onnx") if fp32.path else (None, "")
    out = [fp32]
    for label, per_channel in (("ORT dyn int8 (tensor)", False), ("ORT dyn int8 (channel)", True)):
        v = Variant(label)
        with attempt(v, f"{zm.name}: {label}"):
            v.path = work / f"dyn-{int(per_channel)}.onnx"
            quantize_dynamic(str(source), str(v.path), per_channel=per_channel)
            v.run = ort_runner(v.path, threads)
        out.append(v)
    return out


def winnow_variant(zm: Any, pipeline: str, work: Path, threads: int, ctx_cache: dict) -> Variant:
    """The zoo model compiled by a winnow pipeline, saved and opened with ORT."""
    from winnow.backends.ort import write_model
    from winnow.passes import PassContext, PassManager

    v = Variant(f"winnow {pipeline}")
    with attempt(v, f"{zm.name}: {pipeline}"):
        model = zm.load_ir()
        # One context per model: exclude=[auto] variants share the sensitivity analysis.
        ctx = ctx_cache.setdefault("ctx", PassContext(calibration=zm.calibration()))
        ctx.report.clear()
        if "exclude=[auto]" in pipeline:
            _restore_sensitivity(ctx, ctx_cache, zm)
        start = time.perf_counter()
        PassManager(pipeline).run(model, ctx)
        folder = work / f"w{len(list(work.glob('w*')))}"
        folder.mkdir()
        write_model(model, folder)
        v.path = folder / "model.onnx"
        v.run = ort_runner(v.path, threads)
        v.notes.append(f"{time.perf_counter() - start:.0f} s")
        v.notes += _notes(ctx.report)
    return v


def artifact_variant(folder: Path, threads: int) -> Variant:
    """A compiled winnow artifact (e.g. from `winnow compile --target`), named by its pipeline."""
    manifest = json.loads((folder / "manifest.json").read_text())
    v = Variant(f"winnow artifact {folder.name}: {manifest.get('pipeline', '?')}")
    with attempt(v, f"artifact {folder}"):
        v.path = folder / "model.onnx"
        v.run = ort_runner(v.path, threads)
    return v


def _restore_sensitivity(ctx: Any, cache: dict, zm: Any) -> None:
    """Put the int8-dynamic sensitivity back into the context (a rewrite drops it): computed
    once per model, shared by every exclude=[auto] variant."""
    name = "quant-sensitivity"
    if "sensitivity" not in cache:
        ctx.get_analysis(name, zm.load_ir(), modes=("int8-dynamic",), per_channel=True)
        cache["sensitivity"] = (ctx.analyses[name], ctx.analysis_configs[name])
    ctx.analyses[name], ctx.analysis_configs[name] = cache["sensitivity"]


def _notes(report: dict[str, Any]) -> list[str]:
    notes = []
    fused = report.get("fuse", {}).get("fused")
    if fused:
        notes.append("fused " + ", ".join(f"{k} {n}" for k, n in fused.items()))
    q = report.get("quantize")
    if q:
        notes.append(f"{q['quantized']} nodes quantized")
        if q.get("excluded"):
            auto = q.get("auto")
            met = "" if not auto else f" (calibration loss {auto['steps'][-1]['loss']:.4f}" \
                f"{'' if auto['met'] else ', budget missed'})"
            notes.append(f"{len(q['excluded'])} kept float{met}")
    split = report.get("split-outliers")
    if split:
        notes.append(f"{split['channels']} outlier channels of {split['activations']} "
                     "activations split off")
    return notes


def measure(name: str, pipelines: Sequence[str], threads: int, repeats: int, warmup: int,
            batches: Sequence[int], work: Path, artifacts: Sequence[Path] = (), rotate: int = 16,
            tune: bool = True) -> tuple[list[dict], dict]:
    """Build, score and time every variant of one zoo model (each batch size on `rotate` groups
    of held-out samples in turn, as bench/peers.py does; with `tune` each at its own fastest
    thread count per batch size, as there)."""
    from winnow.measure.fidelity import OUTPUT_KINDS, cosines, evaluate

    zm = models_zoo.get(name)
    ctx_cache: dict = {}
    variants = ort_peers(zm, work, threads)
    variants += [winnow_variant(zm, p, work, threads, ctx_cache) for p in pipelines]
    variants += [artifact_variant(Path(a), threads) for a in artifacts]
    heldout = zm.heldout()
    metric = zm.task_metric("heldout")
    kind = zm.output_kind if zm.output_kind in OUTPUT_KINDS else "values"
    if tune:
        tune_threads(variants, heldout, batches, name)
    runnable = [v for v in variants if v.run is not None]
    outputs = {v.name: [v.run(f) for f in progress.bar(heldout, f"{name}: {v.name} held-out")]
               for v in runnable}
    ref = outputs[REFERENCE]
    rows = {v.name: {"variant": v.name, "size_mb": v.size_mb, "notes": v.notes + (
        [v.error] if v.error else []), "timings": {}} for v in variants}
    for v in runnable:
        ev = evaluate(ref, outputs[v.name], heldout, metric=metric, output_kind=kind)
        first = next(iter(ref[0]))
        cos = np.concatenate([cosines(r[first], o[first]) for r, o in zip(ref, outputs[v.name])])
        rows[v.name].update(cosine=ev.cosine, cosine_min=float(cos.min()),
                            metrics=ev.candidate_metrics)
    for b in batches:
        groups = row_groups(heldout, b, rotate)
        runners = {v.name: rotating(v.run, groups) for v in runnable}
        timing = time_interleaved(runners, repeats=repeats, warmup=warmup,
                                  desc=f"{name}: timing batch {b}", period=len(groups))
        for n, t in timing.items():
            rows[n]["timings"][b] = {**t.to_dict(), "speedup": paired_ratios(
                timing[REFERENCE], t)["median"]}
            if PEER in timing:
                rows[n]["timings"][b]["vs_peer"] = paired_ratios(timing[PEER], t)["median"]
    info = {"metric": zm.metric_name, "rotate": rotate,
            "shapes": {b: {k: list(v.shape) for k, v in row_groups(heldout, b, 1)[0].items()}
                       for b in batches},
            "heldout_samples": sum(int(next(iter(f.values())).shape[0]) for f in heldout)}
    return list(rows.values()), info


def markdown(model: str, rows: Sequence[dict], info: dict, batches: Sequence[int]) -> str:
    """One model's table."""
    head = ["variant"] + [c for b in batches for c in (f"ms b{b}", f"vs fp32 b{b}",
                                                       f"vs pc int8 b{b}")] + [
        "held-out cosine mean (min)", f"{info['metric']}", f"{info['metric']} vs fp32", "MB",
        "x smaller", "notes"]
    lines = [f"### {model}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = next(r for r in rows if r["variant"] == REFERENCE)
    for r in rows:
        cells = [r["variant"]]
        for b in batches:
            t = r["timings"].get(b)
            cells += (["-", "-", "-"] if t is None else
                      [f"{t['median_ms']:.3g}{'*' if t['noisy'] else ''}", f"{t['speedup']:.2f}x",
                       f"{t['vs_peer']:.2f}x" if "vs_peer" in t else "-"])
        cells.append("-" if "cosine" not in r else f"{r['cosine']:.5f} ({r['cosine_min']:.4f})")
        m = r.get("metrics", {}).get(info["metric"])
        m0 = base.get("metrics", {}).get(info["metric"])
        cells.append("-" if m is None else f"{m:.4f}")
        cells.append("-" if m is None or not m0 else f"{100 * (m / m0 - 1):+.2f}%")
        size, size0 = r["size_mb"], base["size_mb"]
        cells.append("-" if size is None else f"{size:.2f}")
        cells.append("-" if size is None or size0 is None else f"{size0 / size:.2f}x")
        cells.append("; ".join(r["notes"]).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="minilm", help="comma-separated zoo names")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--batches", default="1,8", help="batch sizes to time")
    p.add_argument("--rotate", type=int, default=16, metavar="N",
                   help="time on N groups of held-out samples in turn, one group a round")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    p.add_argument("--fixed-threads", action="store_true",
                   help="every variant at --threads, not at its own fastest count per batch size")
    p.add_argument("--quick", action="store_true", help=f"only the first {len(QUICK)} pipelines")
    p.add_argument("--pipelines", default=None,
                   help="';'-separated winnow pipelines instead ('none': only peers and artifacts)")
    p.add_argument("--artifacts", default="",
                   help="','-separated compiled artifact folders of the model to time beside them")
    p.add_argument("--out", default=None, help="result file (default bench/results/quantize-<time>.md)")
    args = p.parse_args(argv)
    args.model_names = [m for m in args.models.split(",") if m]
    args.batch_sizes = [int(b) for b in args.batches.split(",") if b]
    args.threads = args.threads or available_cpus()
    args.pipeline_list = ([] if args.pipelines == "none" else args.pipelines.split(";")
                          if args.pipelines else list(QUICK if args.quick else PIPELINES))
    args.artifact_list = [Path(a) for a in args.artifacts.split(",") if a]
    return args


def _threads_setting(args: argparse.Namespace) -> str:
    if args.fixed_threads:
        return f"{args.threads} ORT threads"
    return (f"each variant at its own fastest ORT thread count per batch size (up to "
            f"{args.threads}; in the notes; artifacts at their manifest's)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the table, print it and save it with its command and machine."""
    args = parse_args(argv)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    started, start = datetime.datetime.now(), time.perf_counter()
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/quantize.py", *argv])])
    machine = machine_info()
    tables, data = [], {}
    with tempfile.TemporaryDirectory(prefix="winnow-quantize-") as scratch:
        for name in args.model_names:
            work = Path(scratch) / name
            work.mkdir()
            rows, info = measure(name, args.pipeline_list, args.threads, args.repeats,
                                 args.warmup, args.batch_sizes, work, args.artifact_list,
                                 args.rotate, not args.fixed_threads)
            tables.append(markdown(name, rows, info, args.batch_sizes))
            data[name] = {"rows": rows, "info": info}
    m = machine
    text = "\n".join([
        f"# Quantization benchmark, {started:%Y-%m-%d %H:%M}", "",
        f"Command: `{command}` ({time.perf_counter() - start:.0f} s)", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['available_cpus']} available); "
        f"onnxruntime {m['onnxruntime']}; load average at start {m.get('load_average')}. "
        f"{_threads_setting(args)}, no spinning; {args.warmup} warm-up + {args.repeats} timed "
        "rounds, all variants of a model interleaved in each round, each round on the next of "
        f"{args.rotate} groups of held-out samples.", "",
        *[t + "\n" for t in tables],
        "- vs fp32: median of per-round paired ratios fp32 / variant (above 1 is faster); vs pc "
        "int8: the same against ORT dyn int8 (channel), the peer to beat; "
        "`*`: noisy (slowest run > 1.5x the fastest on the same input group).",
        "- cosine: per-sample cosine against ORT fp32 on the held-out split, mean (min).",
        "- exclude=[auto]: budget is the calibration loss (mean 1 - cosine on 32 calibration "
        "samples), not the held-out one.", ""])
    out = Path(args.out) if args.out else RESULTS / f"quantize-{started:%Y-%m-%d-%H%M}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    from winnow.backends.manifest import jsonable

    out.with_suffix(".json").write_text(json.dumps(jsonable(
        {"command": command, "machine": machine, "models": data}), indent=2) + "\n")
    print(text)
    print(f"saved {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
