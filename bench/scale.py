"""Compile random-weight Llama-style decoders of growing size with the lossless default pipeline
and with `drop-layers{count=1}`: time and peak RSS per step (build, and each compile phase),
and the compiled model's outputs against the source's.

    python bench/scale.py [--sizes 0.25,0.5,1,2.5] [--layers 2,6,10,14] [--work DIR]
                          [--builder onnx|transformers] [--pipeline TEXT ...]
                          [--keep] [--out bench/results]
    python bench/scale.py --rows LOG     (the table again, from an earlier run's stderr)

`--sizes` are weight gigabytes (TinyLlama-1.1B's widths, hidden 2048 / MLP 5632 / vocab
32000, with the layer count that comes nearest, narrower below one layer); `--layers` builds
those widths with the given layer counts instead. `--builder onnx` (default) writes the decoder
with onnx.helper one tensor at a time (tests/llama_like.py `build_llama`: any size within the
memory of its largest tensor); `--builder transformers` builds transformers' LlamaForCausalLM
from a LlamaConfig made in code (random weights, nothing downloaded) and exports it with
torch.onnx (dynamo) with external data (`build_transformers_llama`: holds the torch model, so
its build RSS is reported). `--pipeline` may be given several times (default: the lossless
default pipeline and `drop-layers{count=1}`); each model is built once and compiled with each.

Models are written with external data under --work (default a temporary folder, deleted
unless --keep); each needs about twice its size on disk (source + one artifact at a time).
The build and each compile run in a fresh process (`winnow.compile` with the ORT backend, the
check on, the check and calibration inputs 2 random token sequences of 16 given as example
inputs, --max-drop 1: the weights are random, so a drop means nothing), whose peak RSS (VmHWM)
is read when it ends, with the peak of each compile phase (the peak is reset between phases)
and its CPU time (user + system, all threads; in all and per phase);
`(RSS - imports)` leaves out what the process held before loading the model (Python, numpy,
ONNX Runtime, onnxscript: ~0.35 GB). Outputs: the artifact's `model.onnx` and the source run in
ONNX Runtime on input_ids [1, 8]; max abs error of the logits (0 for a lossless pipeline), and
for a lossy one the region it dropped and its 1 - cosine as the fidelity budget measured it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
DROP_ONE = "drop-layers{count=1}"
CHECK_SHAPE = (2, 16)  # example inputs: sequences x tokens


def _rss(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads (ONNX Runtime's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def compile_worker(source: str, out: str, pipeline: str, feeds: str) -> dict:
    """Compile in this process; returns timings and peak RSS per phase (run in a child)."""
    import contextlib

    import winnow
    from winnow import progress
    from winnow.ir.user_inputs import UserInputs

    peaks: dict[str, int] = {}
    cpu_per_phase: dict[str, float] = {}
    plain_step = progress.step

    @contextlib.contextmanager
    def measured_step(message: str, after: float = 1.0):
        peaks["before " + message] = _rss("VmHWM")
        _reset_peak()
        cpu_start = _cpu_seconds()
        with plain_step(message, after):
            yield
        peaks[message] = _rss("VmHWM")
        cpu_per_phase[message] = _cpu_seconds() - cpu_start
        _reset_peak()

    progress.step = measured_step
    baseline = _rss("VmRSS")
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = winnow.compile(source, out, pipeline=pipeline, overwrite=True, max_drop=1.0,
                            user_inputs=UserInputs.from_options(example_inputs=feeds))
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    fidelity = result.fidelity or {}
    reports = {p["name"]: p.get("report") or {} for p in result.passes}
    return {"seconds": seconds, "cpu_seconds": cpu, "cpu_per_phase": cpu_per_phase,
            "phases": result.phases,
            "baseline_rss": baseline,
            "peak_rss": max([_rss("VmHWM"), *peaks.values()]), "phase_peaks": peaks,
            "pass_seconds": {p["name"]: p["seconds"] for p in result.passes},
            "dropped": reports.get("drop-layers", {}).get("dropped"),
            "drop": (fidelity.get("budget") or {}).get("drop"),
            "nodes": result.nodes_after, "check_max_abs_error": fidelity.get("max_abs_error"),
            "files": result.file_sizes(), "ort_format": result.artifact.manifest.get("ort_format")}


def build_worker(builder: str, path: str, shape: str) -> dict:
    """Write the model (run in a child): seconds and peak RSS."""
    from winnow.tests.llama_like import LlamaShape, build_llama, build_transformers_llama

    build = build_transformers_llama if builder == "transformers" else build_llama
    start = time.perf_counter()
    build(path, LlamaShape(**json.loads(shape)))
    return {"build_seconds": time.perf_counter() - start, "build_rss": _rss("VmHWM")}


def outputs_error(source: Path, artifact: Path) -> float:
    """Max abs difference of the logits of source and artifact on input_ids [1, 8] (ORT)."""
    import numpy as np
    import onnxruntime as ort

    feeds = {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8) * 7}
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_prepacking", "1")
    got = []
    for path in (source, artifact / "model.onnx"):
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        got.append(session.run(None, feeds)[0])
        del session
    return float(np.max(np.abs(got[0].astype(np.float64) - got[1])))


def _child(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_feeds(path: Path, vocab: int) -> Path:
    import numpy as np

    tokens = np.random.default_rng(0).integers(0, vocab, CHECK_SHAPE, dtype=np.int64)
    np.savez(path, input_ids=tokens)
    return path


def bench_one(shape, work: Path, builder: str, pipelines: list[str], keep: bool) -> list[dict]:
    """Build one model, compile it with each pipeline in a child process, compare outputs; one
    table row per pipeline."""
    folder = work / f"llama-{builder}-{shape.hidden}x{shape.layers}"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "model.onnx"
    built = _child("build", builder, str(source), json.dumps(dataclasses.asdict(shape)))
    base = {"shape": dataclasses.asdict(shape), "builder": builder, **built}
    if "error" in built:
        return [dict(base, pipeline=p) for p in pipelines]
    base["weight_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
    feeds = _write_feeds(work / f"feeds-{shape.vocab}.npz", shape.vocab)
    rows = []
    for pipeline in pipelines:
        out = work / f"{folder.name}-out"
        row = {**base, "pipeline": pipeline, **_child("compile", str(source), str(out), pipeline,
                                                      str(feeds))}
        if "error" not in row:
            row["outputs_max_abs_error"] = outputs_error(source, out)
        rows.append(row)
        print(f"done {shape.hidden}x{shape.layers}: {json.dumps(row)}", file=sys.stderr)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _fmt_phase_peaks(row: dict) -> str:
    peaks = {k: v for k, v in row.get("phase_peaks", {}).items() if not k.startswith("before")}
    return ", ".join(f"{k.split()[0]} {v / GB:.2f}" for k, v in peaks.items())


def _outputs_cell(row: dict) -> str:
    err = row["outputs_max_abs_error"]
    if row.get("dropped") is None:
        return f"{'equal' if err == 0 else 'differ'} ({err:.2g})"
    drop = row.get("drop")
    return (f"dropped {', '.join(row['dropped'])}: 1 - cos {drop:.3g}, max abs err {err:.2g}"
            if drop is not None else f"dropped {', '.join(row['dropped'])}, max abs err {err:.2g}")


def table(rows: list[dict]) -> str:
    """The markdown table of the rows."""
    lines = ["| pipeline | weights GB | hidden x layers | build s (peak RSS GB) | nodes | "
             "compile s | CPU s | s per phase | peak RSS GB | RSS / weights | "
             "(RSS - imports) / weights | outputs | .ort | peak GB per phase |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = r.get("weight_bytes", 0) / GB
        dims = f"{r['shape']['hidden']} x {r['shape']['layers']}"
        build = (f"{r['builder']} {r['build_seconds']:.0f} ({r['build_rss'] / GB:.2f})"
                 if "build_seconds" in r else r.get("builder", "onnx"))
        pipeline = "lossless" if r.get("pipeline", "").startswith("shape-inference") else \
            f"`{r.get('pipeline')}`"
        if "error" in r:
            lines.append(f"| {pipeline} | {gb:.2f} | {dims} | {build} | - | failed: {r['error']} "
                         "| | | | | | | | |")
            continue
        ort_format = r["ort_format"] or {}
        ort_cell = "written" if ort_format.get("file") else (ort_format.get("error") or "-")[:60]
        imports = r["phase_peaks"].get("before loading the model", 0)
        lines.append(
            f"| {pipeline} | {gb:.2f} | {dims} | {build} | {r['nodes']} | {r['seconds']:.1f} "
            f"| {r.get('cpu_seconds', float('nan')):.1f} | {', '.join(f'{k} {v:.1f}' for k, v in r['phases'].items())} "
            f"| {r['peak_rss'] / GB:.2f} | {r['peak_rss'] / r['weight_bytes']:.2f} "
            f"| {(r['peak_rss'] - imports) / r['weight_bytes']:.2f} "
            f"| {_outputs_cell(r)} | {ort_cell} | {_fmt_phase_peaks(r)} |")
    return "\n".join(lines)


def _fit(x, y, what: str, unit: str) -> str:
    import numpy as np

    a, b = np.polyfit(x, y, 1)
    worst = float(np.max(np.abs(a * x + b - y) / y))
    return f"{what} = {a:.2f} x {unit} + {b:.2f} (worst relative residual {worst:.0%})"


def slope(rows: list[dict]) -> str:
    """Least-squares seconds per layer (one width) or per weight GB, per pipeline: of the whole
    compile, of the compile without writing the artifact (load, source run, passes with their
    checks, final check, held-out scoring), and of the compile's CPU time (user + system, which
    a loaded host disturbs less than wall time)."""
    import numpy as np

    lines = []
    for pipeline in dict.fromkeys(r.get("pipeline") for r in rows):
        ok = [r for r in rows if "error" not in r and r.get("pipeline") == pipeline]
        if len(ok) < 2:
            continue
        one_width = len({r["shape"]["hidden"] for r in ok}) == 1
        x = np.array([r["shape"]["layers"] if one_width else r["weight_bytes"] / GB for r in ok])
        unit = "layers" if one_width else "GB"
        total = np.array([r["seconds"] for r in ok])
        proper = np.array([sum(v for k, v in r["phases"].items() if k != "emit") for r in ok])
        peak = np.array([r["peak_rss"] / r["weight_bytes"] for r in ok])
        cpu = np.array([r.get("cpu_seconds", np.nan) for r in ok])
        cpu_proper = np.array([sum(v for k, v in r["cpu_per_phase"].items()
                                   if not k.startswith("writing")) if "cpu_per_phase" in r
                               else np.nan for r in ok])
        lines.append(f"`{pipeline}`, least squares over {len(ok)} sizes: "
                     f"{_fit(x, total, 'compile s', unit)}; "
                     f"{_fit(x, proper, 'compile s without writing the artifact', unit)}; "
                     + (f"{_fit(x, cpu, 'compile CPU s', unit)}; " if np.isfinite(cpu).all()
                        else "")
                     + (f"{_fit(x, cpu_proper, 'compile CPU s without writing', unit)}; "
                        if np.isfinite(cpu_proper).all() else "") +
                     f"peak RSS / weights {peak.min():.2f}-{peak.max():.2f}")
    return "\n\n".join(lines)


def main() -> None:
    """Parse the arguments, run every size, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="0.25,0.5,1,2.5")
    parser.add_argument("--layers", default=None)
    parser.add_argument("--builder", default="onnx", choices=("onnx", "transformers"))
    parser.add_argument("--work", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--pipeline", action="append", default=None)
    parser.add_argument("--rows", default=None, help="print the table of an earlier run's stderr")
    args = parser.parse_args()
    if args.child:
        work = {"build": build_worker, "compile": compile_worker}[args.child[0]]
        print(json.dumps(work(*args.child[1:])))
        return
    if args.rows:
        rows = [json.loads(line.split(": ", 1)[1]) for line in Path(args.rows).read_text()
                .splitlines() if line.startswith("done ")]
        print(f"{table(rows)}\n\n{slope(rows)}")
        return
    from winnow.passes.manager import DEFAULT_PIPELINE
    from winnow.tests.llama_like import LLAMA_1B, shape_for_bytes

    pipelines = args.pipeline or [DEFAULT_PIPELINE, DROP_ONE]
    if args.layers:
        shapes = [dataclasses.replace(LLAMA_1B, layers=int(n)) for n in args.layers.split(",")]
    else:
        shapes = [shape_for_bytes(float(s) * GB) for s in args.sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="winnow-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    need = 2.2 * max(s.weight_bytes() for s in shapes)
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"{work} has {free / GB:.1f} GB free; the largest model needs {need / GB:.1f} GB.")
    rows = []
    for shape in shapes:
        rows += bench_one(shape, work, args.builder, pipelines, args.keep)
    text = (f"{table(rows)}\n\n{slope(rows)}\n\nhost {platform.node()}, {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f} at the end\n\n"
            f"command: `python {' '.join(sys.argv)}`")
    print(text)
    if args.out:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d-%H%M")
        path = Path(args.out) / f"scale-{stamp}.md"
        path.write_text(f"# winnow compile at scale\n\n{text}\n")
        print(f"saved {path}", file=sys.stderr)
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
