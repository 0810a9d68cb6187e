"""How well the cost model predicts measured latency: zoo models x variants x input sizes.

Each model is compiled lossless (the default pipeline), with `drop-layers{count=1}`, and
quantized to dynamic int8 (onnxruntime.quantization.quantize_dynamic on the lossless model);
each variant is predicted (`winnow.cost_model.predict`) and measured (benchmark.py:
interleaved rounds, medians; the variants of one model and size are timed together) at
several batch / sequence sizes. Printed: Kendall tau and Spearman between predicted and
measured latency, MAPE, the share within +-10% and +-25%, how often the faster of two
variants of the same model is picked, and every variant off by more than 2x with the report's
reasons (unpriced ops, assumed dims).

With `--calibrate` the host profile is fitted in the same run, on the micro-benchmarks of
`winnow cost calibrate` timed interleaved with the variants (same host load; no variant is
fitted on); `--clock cpu --threads 1` reads process CPU time, which other processes' load does
not inflate.

    .venv/bin/python bench/cost_accuracy.py --target host --out bench/results/cost-accuracy
    .venv/bin/python bench/cost_accuracy.py --calibrate --clock cpu --threads 1 --variants DIR --out OUT
    .venv/bin/python bench/cost_accuracy.py --quick --target host --out /tmp/cost-quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from winnow.measure.timing import Timing, available_cpus, machine_info, time_interleaved, timing_session
from winnow.cost_model import predict
from winnow.cost_model.op_costs import resolve_dims
from winnow.errors import WinnowError

# model -> input sizes (symbolic dims, or full input shapes)
SIZES: dict[str, list[dict[str, Any]]] = {
    "minilm": [{"batch": 1, "seq": 32}, {"batch": 1, "seq": 128}, {"batch": 8, "seq": 32},
               {"batch": 8, "seq": 128}],
    "tiny-gpt": [{"batch": 1, "seq": 32}, {"batch": 1, "seq": 128}, {"batch": 4, "seq": 64},
                 {"batch": 8, "seq": 128}],
    "digits-vit": [{"batch": 1}, {"batch": 32}, {"batch": 256}],
    "digits-cnn": [{"batch": 1}, {"batch": 32}, {"batch": 256}],
    "ppocr-rec": [{"x": [1, 3, 48, 320]}, {"x": [4, 3, 48, 320]}],
    "ppocr-det": [{"x": [1, 3, 320, 320]}, {"x": [1, 3, 640, 640]}],
}
QUICK_SIZES: dict[str, list[dict[str, Any]]] = {
    "digits-cnn": [{"batch": 1}, {"batch": 64}],
    "digits-vit": [{"batch": 1}, {"batch": 64}],
    "tiny-gpt": [{"batch": 1, "seq": 32}, {"batch": 4, "seq": 64}],
}
TRANSFORMS = ("lossless", "drop1", "int8")
DROP_PIPELINE = "fold-constants,drop-layers{count=1},dce"


def variants(name: str, work: Path) -> dict[str, Path]:
    """ONNX files of the model's variants (a variant whose pass does not apply is left out)."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from winnow.driver.compile import compile_model

    out: dict[str, Path] = {}
    lossless = compile_model(f"zoo:{name}", work / f"{name}-lossless", overwrite=True, check=False)
    out["lossless"] = Path(lossless.artifact.path) / "model.onnx"
    try:
        drop = compile_model(f"zoo:{name}", work / f"{name}-drop1", pipeline=DROP_PIPELINE,
                             overwrite=True, check=False, force=True)
        out["drop1"] = Path(drop.artifact.path) / "model.onnx"
    except WinnowError as exc:
        print(f"  {name}: drop-layers does not apply ({exc})", file=sys.stderr)
    int8, plain = work / f"{name}-int8.onnx", work / f"{name}-plain.onnx"
    model = ir.load(out["lossless"])
    # the quantizer wants weights as initializers, and stale shapes trip its shape inference
    LiftConstantsToInitializersPass(size_limit=0)(model)
    proto = ir.serde.serialize_model(model)
    del proto.graph.value_info[:]
    onnx.save(proto, plain)
    try:
        quantize_dynamic(plain, int8, weight_type=QuantType.QInt8)
        out["int8"] = int8
    except Exception as exc:  # noqa: BLE001 - the quantizer raises several types
        print(f"  {name}: ORT dynamic int8 quantization failed ({exc})", file=sys.stderr)
    return {label: _keep(path, work / f"{name}--{label}.onnx") for label, path in out.items()}


def _keep(path: Path, dest: Path) -> Path:
    shutil.copyfile(path, dest)
    return dest


def saved_variants(name: str, folder: Path) -> dict[str, Path]:
    """Variants written earlier with --save-variants (files MODEL--TRANSFORM.onnx)."""
    return {label: folder / f"{name}--{label}.onnx" for label in TRANSFORMS
            if (folder / f"{name}--{label}.onnx").is_file()}


def feeds(model: ir.Model, size: dict[str, Any]) -> dict[str, np.ndarray]:
    """Random feeds of the concrete shapes the cost model uses for `size`."""
    shapes, _ = resolve_dims(model, size)
    rng = np.random.default_rng(0)
    out = {}
    for value in model.graph.inputs:
        if value.name not in shapes:
            continue
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.float32
        shape = shapes[value.name]
        if np.issubdtype(dtype, np.floating):
            out[value.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in value.name.lower():
            out[value.name] = np.ones(shape, dtype)
        else:
            out[value.name] = rng.integers(0, 100, shape).astype(dtype)
    return out


def measure_group(models: dict[str, ir.Model], paths: dict[str, Path], size: dict[str, Any],
                  repeats: int, threads: int) -> dict[str, Any]:
    """Timing (median, spread) of each variant at one size, timed interleaved."""
    runners = {}
    for label, path in paths.items():
        session = timing_session(path, threads)
        batch = feeds(models[label], size)
        runners[label] = (lambda s=session, f=batch: s.run(None, f))
    return time_interleaved(runners, repeats=repeats, warmup=3)


def run(sizes: dict[str, list[dict[str, Any]]], target: str, repeats: int, threads: int,
        work: Path, saved: Path | None = None) -> list[dict[str, Any]]:
    """Predict and measure every variant; one row per (model, transform, size)."""
    rows = []
    for name, model_sizes in sizes.items():
        print(f"{name}: {'loading' if saved else 'building'} variants", file=sys.stderr)
        paths = saved_variants(name, saved) if saved else variants(name, work)
        if not paths:
            continue
        models = {label: ir.load(path) for label, path in paths.items()}
        for size in model_sizes:
            measured = measure_group(models, paths, size, repeats, threads)
            for label, model in models.items():
                rows.append(_row(name, label, size, model, target, measured[label]))
                print(f"  {label:<9} {json.dumps(size):<28} predicted "
                      f"{rows[-1]['predicted_s'] * 1e3:9.3f} ms  measured "
                      f"{rows[-1]['measured_s'] * 1e3:9.3f} ms", file=sys.stderr)
    return rows


def run_calibrated(sizes: dict[str, list[dict[str, Any]]], repeats: int, threads: int,
                   work: Path, profile: Path, saved: Path | None = None,
                   clock: str = "wall") -> list[dict[str, Any]]:
    """Calibrate and measure in one interleaved timing: every round runs each micro-benchmark of
    `winnow cost calibrate` and each variant at each size once, so the fit and the variants see
    the same host load. The profile is fitted on the micro-benchmarks only (written at
    `profile`); the variants are then predicted with it, never fitted on."""
    from winnow.cost_model import calibrate as cal
    from winnow.cost_model.targets import load_target

    llc = cal.host_llc_bytes()
    micros = cal.suite(False, llc)
    runners, samples = cal.clocked({f"micro {m.name}": cal.micro_runner(m, threads)
                                    for m in micros}, clock)
    cases = []
    for name, model_sizes in sizes.items():
        print(f"{name}: {'loading' if saved else 'building'} variants", file=sys.stderr)
        paths = saved_variants(name, saved) if saved else variants(name, work)
        for label, path in paths.items():
            model, session = ir.load(path), timing_session(path, threads)
            for size in model_sizes:
                key = f"{name} {label} {json.dumps(size)}"
                batch = feeds(model, size)
                runs, noted = cal.clocked({key: (lambda s=session, f=batch: s.run(None, f))}, clock)
                runners.update(runs)
                samples.update(noted)
                cases.append((key, name, label, size, model))
    time_interleaved(runners, repeats=repeats, warmup=2, desc="micro-benchmarks and variants")
    timings = {key: Timing(key, noted[-repeats:]) for key, noted in samples.items()}
    times = {m.name: timings[f"micro {m.name}"].median for m in micros}
    cal.write_profile(cal.fit_profile(micros, times, threads, llc), profile)
    profile.with_suffix(".medians.json").write_text(json.dumps({"median_s": times}, indent=1))
    print(f"fitted {profile} on {len(micros)} micro-benchmarks", file=sys.stderr)
    target = load_target(profile)
    return [_row(name, label, size, model, target, timings[key])
            for key, name, label, size, model in cases]


def _row(name: str, label: str, size: dict[str, Any], model: ir.Model, target: Any,
         measured: Any) -> dict[str, Any]:
    """One result row: the prediction and the measured timing of a variant at a size."""
    report = predict(model, target, size)
    return {"model": name, "transform": label, "size": size, "predicted_s": report.latency_s,
            "measured_s": measured.median, "spread": measured.spread, "noisy": measured.noisy,
            "roofline_s": report.roofline_s, "kernels": len(report.kernels),
            "unpriced": len(report.unpriced), "unpriced_examples": report.unpriced[:3],
            "assumed_dims": report.assumed_dims}


def repredict(rows: list[dict[str, Any]], target: str, folder: Path) -> list[dict[str, Any]]:
    """The measured rows with predictions made again with `target` (variants read from `folder`)."""
    from winnow.cost_model import load_target

    profile, models, out = load_target(target), {}, []
    for r in rows:
        key = f"{r['model']}--{r['transform']}"
        if key not in models:
            models[key] = ir.load(folder / f"{key}.onnx")
        report = predict(models[key], profile, r["size"])
        out.append({**r, "predicted_s": report.latency_s, "roofline_s": report.roofline_s,
                    "unpriced": len(report.unpriced), "unpriced_examples": report.unpriced[:3]})
    return out


def metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank agreement, error shares and same-model pair choices over all rows."""
    from scipy import stats

    pred = np.array([r["predicted_s"] for r in rows])
    meas = np.array([r["measured_s"] for r in rows])
    err = np.abs(pred - meas) / meas
    pairs = right = 0
    for a, b in itertools.combinations(rows, 2):
        if a["model"] != b["model"] or a["measured_s"] == b["measured_s"]:
            continue
        pairs += 1
        right += (a["predicted_s"] < b["predicted_s"]) == (a["measured_s"] < b["measured_s"])
    return {"variants": len(rows), "kendall_tau": float(stats.kendalltau(pred, meas).statistic),
            "spearman": float(stats.spearmanr(pred, meas).statistic),
            "mape": float(np.mean(err)), "within_10": float(np.mean(err <= 0.10)),
            "within_25": float(np.mean(err <= 0.25)), "pairs": pairs,
            "pairs_right": right / pairs if pairs else math.nan,
            "off_2x": [_off(r) for r in rows
                       if max(r["predicted_s"], r["measured_s"]) > 2 * min(r["predicted_s"], r["measured_s"])]}


def _off(row: dict[str, Any]) -> dict[str, Any]:
    why = []
    if row["unpriced"]:
        why.append(f"{row['unpriced']} nodes priced by bytes only (e.g. {row['unpriced_examples'][0]})")
    if row["assumed_dims"]:
        why.append(f"assumed dims {row['assumed_dims']}")
    if row.get("noisy"):
        why.append(f"measured under load: the slowest run took {row['spread']:.1f}x the fastest")
    return {"model": row["model"], "transform": row["transform"], "size": row["size"],
            "ratio": row["predicted_s"] / row["measured_s"],
            "why": "; ".join(why) or "no flag in the report: the model mispredicts this variant"}


def predict_speed(folder: Path, target: str, repeats: int = 5) -> str:
    """Best-of-`repeats` wall time of `predict` on each saved variant (markdown table): the
    cost model runs inside search loops (issue 11: <= 0.2 s on a 300-node graph)."""
    import time

    from winnow.cost_model import load_target

    profile = load_target(target)
    lines = ["| variant | nodes | predict ms |", "|---|---:|---:|"]
    for path in sorted(folder.glob("*--*.onnx")):
        model = ir.load(path)
        predict(model, profile)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            predict(model, profile)
            best = min(best, time.perf_counter() - start)
        lines.append(f"| {path.stem} | {len(list(model.graph))} | {best * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]], m: dict[str, Any], target: str,
             machine: dict[str, Any] | None = None) -> str:
    """The results as a markdown table plus the summary figures (and the host and its load)."""
    lines = [f"# cost model accuracy (target {target})", ""]
    if machine:
        lines += [f"- host: {machine.get('cpu')}, {machine.get('available_cpus')} CPUs, onnxruntime "
                  f"{machine.get('onnxruntime')}; load average (1, 5, 15 min) at the start "
                  f"{machine.get('load_average')}, at the end {machine.get('load_average_end')}"]
        if machine.get("clock"):
            lines += [f"- profile fitted in this run (micro-benchmarks timed interleaved with the "
                      f"variants); {machine.get('threads')} ORT threads; clock: {machine['clock']}"
                      + (" (process CPU time)" if machine["clock"] == "cpu" else "")]
    lines += [
             f"- variants {m['variants']}; Kendall tau {m['kendall_tau']:.3f}; Spearman "
             f"{m['spearman']:.3f}; MAPE {m['mape'] * 100:.1f}%",
             f"- within 10% {m['within_10'] * 100:.0f}%, within 25% {m['within_25'] * 100:.0f}%; "
             f"faster of a same-model pair picked {m['pairs_right'] * 100:.0f}% of {m['pairs']}",
             f"- off by more than 2x: {len(m['off_2x'])}", "",
             "| model | variant | size | predicted ms | measured ms | ratio | unpriced |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['transform']} | {json.dumps(r['size'])} | "
                     f"{r['predicted_s'] * 1e3:.3f} | {r['measured_s'] * 1e3:.3f} | "
                     f"{r['predicted_s'] / r['measured_s']:.2f} | {r['unpriced']} |")
    if m["off_2x"]:
        lines += ["", "## off by more than 2x", ""]
        lines += [f"- {o['model']} {o['transform']} {json.dumps(o['size'])}: x{o['ratio']:.2f}; "
                  f"{o['why']}" for o in m["off_2x"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: predict and measure the variants, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="host", help="target profile (name or .toml)")
    parser.add_argument("--quick", action="store_true", help="three small models, two sizes each")
    parser.add_argument("--models", default=None, help="comma-separated subset of the models")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds [5 quick, 15]")
    parser.add_argument("--threads", type=int, default=None, help="ORT threads [all available]")
    parser.add_argument("--out", default=None, help="folder for cost_accuracy.json and .md")
    parser.add_argument("--save-variants", default=None, metavar="DIR",
                        help="keep the variant ONNX files in DIR (to measure them on another host)")
    parser.add_argument("--variants", default=None, metavar="DIR",
                        help="measure the variants saved in DIR instead of building them")
    parser.add_argument("--rescore", default=None, metavar="JSON",
                        help="recompute the metrics and table of a cost_accuracy.json written "
                             "on another host (one without scipy); with --variants DIR, predict "
                             "its measured rows again with --target (a cross-host profile) and "
                             "write to --out")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit the host profile here, its micro-benchmarks timed interleaved "
                             "with the variants (same load); written to --out/host.toml")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="with --calibrate: time by wall clock, or by process CPU time (with "
                             "--threads 1 on a host other work loads: preemption not counted)")
    parser.add_argument("--speed", action="store_true",
                        help="only time `predict` on the variants saved in --variants DIR")
    args = parser.parse_args(argv)
    machine = machine_info()
    if args.rescore:
        data = json.loads(Path(args.rescore).read_text())
        if args.variants:  # predict the measured rows again with --target (no timing)
            rows = repredict(data["rows"], args.target, Path(args.variants))
            return report(rows, args.target, data["machine"], Path(args.out) if args.out else None)
        return report(data["rows"], data["target"], data["machine"], Path(args.rescore).parent)
    if args.speed:
        print(predict_speed(Path(args.variants or "."), args.target))
        print(f"load average {machine.get('load_average')}")
        return 0
    sizes = dict(QUICK_SIZES if args.quick else SIZES)
    if args.models:
        sizes = {k: v for k, v in SIZES.items() if k in args.models.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.save_variants or tmp)
        work.mkdir(parents=True, exist_ok=True)
        repeats, threads = args.repeats or (5 if args.quick else 15), args.threads or available_cpus()
        saved = Path(args.variants) if args.variants else None
        if args.calibrate:
            args.target = str(Path(args.out or tmp) / "host.toml")
            rows = run_calibrated(sizes, repeats, threads, work, Path(args.target), saved,
                                  args.clock)
            machine["clock"], machine["threads"] = args.clock, threads
        else:
            rows = run(sizes, args.target, repeats, threads, work, saved)
    machine["load_average_end"] = machine_info().get("load_average")
    if args.out:  # the measurements first: a host without scipy keeps them for --rescore
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost_accuracy.json").write_text(json.dumps(
            {"target": args.target, "machine": machine, "rows": rows}, indent=2, default=str))
    return report(rows, args.target, machine, Path(args.out) if args.out else None)


def report(rows: list[dict], target: str, machine: dict, out: Path | None) -> int:
    """Print (and write to `out`) the metrics and the table of measured rows."""
    m = metrics(rows)
    text = markdown(rows, m, target, machine)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost_accuracy.json").write_text(json.dumps(
            {"target": target, "machine": machine, "metrics": m, "rows": rows},
            indent=2, default=str))
        (out / "cost_accuracy.md").write_text(text)
        print(f"wrote {out}/cost_accuracy.json and cost_accuracy.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
