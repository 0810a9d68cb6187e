"""Compile random-weight Llama-style decoders of growing size with the lossless default pipeline:
compile time, peak RSS (and RSS / weight bytes), and the compiled model's outputs against the
source's on a small input.

    python bench/scale.py [--sizes 0.25,0.5,1,2.5] [--layers 1,2,4,8] [--work DIR]
                          [--keep] [--out bench/results] [--pipeline TEXT]
    python bench/scale.py --rows LOG     (the table again, from an earlier run's stderr)

`--sizes` are weight gigabytes (TinyLlama-1.1B's widths, hidden 2048 / MLP 5632 / vocab
32000, with the layer count that comes nearest, narrower below one layer); `--layers` builds
those widths with the given layer counts instead. Models are written with external data under
--work (default a temporary folder, deleted unless --keep); each needs about twice its size on
disk (source + artifact). Each compile runs in a fresh process (`winnow.compile` with the ORT
backend, the check on), whose peak RSS (VmHWM) is read when it ends, with the peak of each
compile phase (the peak is reset between phases); `(RSS - imports)` leaves out what the process
held before loading the model (Python, numpy, ONNX Runtime, onnxscript: ~0.35 GB). Outputs equal: the artifact's `model.onnx` and
the source run in ONNX Runtime on input_ids [1, 8]; max abs error of the logits.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


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


def worker(source: str, out: str, pipeline: str) -> dict:
    """Compile in this process; returns timings and peak RSS per phase (run in a child)."""
    import contextlib

    import winnow
    from winnow import progress

    peaks: dict[str, int] = {}
    plain_step = progress.step

    @contextlib.contextmanager
    def measured_step(message: str, after: float = 1.0):
        peaks["before " + message] = _rss("VmHWM")
        _reset_peak()
        with plain_step(message, after):
            yield
        peaks[message] = _rss("VmHWM")
        _reset_peak()

    progress.step = measured_step
    baseline = _rss("VmRSS")
    start = time.perf_counter()
    result = winnow.compile(source, out, pipeline=pipeline, overwrite=True)
    seconds = time.perf_counter() - start
    fidelity = result.fidelity or {}
    return {"seconds": seconds, "phases": result.phases, "baseline_rss": baseline,
            "peak_rss": max([_rss("VmHWM"), *peaks.values()]), "phase_peaks": peaks,
            "nodes": result.nodes_after, "check_max_abs_error": fidelity.get("max_abs_error"),
            "files": result.file_sizes(), "ort_format": result.artifact.manifest.get("ort_format")}


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


def _run_worker(source: Path, out: Path, pipeline: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(source), str(out), pipeline]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_one(shape, work: Path, pipeline: str, keep: bool) -> dict:
    """Build one model, compile it in a child process, compare outputs; one table row."""
    from winnow.tests.llama_like import build_llama

    folder = work / f"llama-{shape.hidden}x{shape.layers}"
    folder.mkdir(parents=True, exist_ok=True)
    source = build_llama(folder / "model.onnx", shape)
    weights = sum(f.stat().st_size for f in folder.iterdir())
    out = work / f"{folder.name}-out"
    row = {"shape": dataclasses.asdict(shape), "weight_bytes": weights,
           **_run_worker(source, out, pipeline)}
    if "error" not in row:
        row["outputs_max_abs_error"] = outputs_error(source, out)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return row


def _fmt_phase_peaks(row: dict) -> str:
    peaks = {k: v for k, v in row.get("phase_peaks", {}).items() if not k.startswith("before")}
    return ", ".join(f"{k.split()[0]} {v / GB:.2f}" for k, v in peaks.items())


def table(rows: list[dict]) -> str:
    """The markdown table of the rows."""
    lines = ["| weights GB | hidden x layers | nodes | compile s | s / GB | s per phase | peak RSS GB | "
             "RSS / weights | (RSS - imports) / weights | outputs equal (max abs err) | .ort | "
             "peak GB per phase |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = r["weight_bytes"] / GB
        dims = f"{r['shape']['hidden']} x {r['shape']['layers']}"
        if "error" in r:
            lines.append(f"| {gb:.2f} | {dims} | - | failed: {r['error']} | | | | | | | | |")
            continue
        err = r["outputs_max_abs_error"]
        ort_format = r["ort_format"] or {}
        ort_cell = "written" if ort_format.get("file") else (ort_format.get("error") or "-")[:60]
        imports = r["phase_peaks"].get("before loading the model", 0)
        lines.append(
            f"| {gb:.2f} | {dims} | {r['nodes']} | {r['seconds']:.1f} | {r['seconds'] / gb:.1f} "
            f"| {', '.join(f'{k} {v:.1f}' for k, v in r['phases'].items())} "
            f"| {r['peak_rss'] / GB:.2f} | {r['peak_rss'] / r['weight_bytes']:.2f} "
            f"| {(r['peak_rss'] - imports) / r['weight_bytes']:.2f} "
            f"| {'yes' if err == 0 else 'no'} ({err:.2g}) | {ort_cell} | {_fmt_phase_peaks(r)} |")
    return "\n".join(lines)


def _fit(x, y, what: str) -> str:
    import numpy as np

    a, b = np.polyfit(x, y, 1)
    worst = float(np.max(np.abs(a * x + b - y) / y))
    return f"{what} = {a:.2f} x GB + {b:.2f} (worst relative residual {worst:.0%})"


def slope(rows: list[dict]) -> str:
    """Least-squares seconds per weight GB: of the whole compile, and of the compile without
    writing the artifact (load, source run, passes with their checks, final check)."""
    import numpy as np

    ok = [r for r in rows if "error" not in r]
    if len(ok) < 2:
        return ""
    x = np.array([r["weight_bytes"] / GB for r in ok])
    total = np.array([r["seconds"] for r in ok])
    proper = np.array([sum(v for k, v in r["phases"].items() if k != "emit") for r in ok])
    return (f"least squares over {len(ok)} sizes: {_fit(x, total, 'compile s')}; "
            f"{_fit(x, proper, 'compile s without writing the artifact')}")


def main() -> None:
    """Parse the arguments, run every size, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="0.25,0.5,1,2.5")
    parser.add_argument("--layers", default=None)
    parser.add_argument("--work", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--rows", default=None, help="print the table of an earlier run's stderr")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.rows:
        rows = [json.loads(line.split(": ", 1)[1]) for line in Path(args.rows).read_text()
                .splitlines() if line.startswith("done ")]
        print(f"{table(rows)}\n\n{slope(rows)}")
        return
    from winnow.passes.manager import DEFAULT_PIPELINE
    from winnow.tests.llama_like import LLAMA_1B, shape_for_bytes

    pipeline = args.pipeline or DEFAULT_PIPELINE
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
        rows.append(bench_one(shape, work, pipeline, args.keep))
        print(f"done {shape.hidden}x{shape.layers}: {json.dumps(rows[-1])}", file=sys.stderr)
    text = (f"{table(rows)}\n\n{slope(rows)}\n\npipeline `{pipeline}`; host {platform.node()}, "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n\n"
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
