"""winnow's int8 pipelines against ORT's per-channel dynamic int8 on a second host that has no zoo.

    python bench/portable_quantize.py pack --model minilm --out DIR     # here: model + data files
    python bench/portable_quantize.py run DIR [--pipelines 'P1;P2'] [--threads 2,8] [--repeats 60]

`pack` writes the zoo model (large float weights stored as fp16 to halve the copy, restored to
fp32 by `run`: the graph and the kernels it runs are the same), its calibration split and its
held-out feeds. `run` needs only winnow's core (onnx, onnx-ir, onnxscript, onnxruntime): it
applies each pipeline with the calibration data, quantizes the source with
`quantize_dynamic(per_channel=True)` (the peer), and prints one table: mean cosine against fp32 on
the held-out feeds, and each variant's speed-up over fp32 and over the peer at every thread count
and batch 1 and 8, timed interleaved in the sessions `winnow bench` uses (benchmark.py).
About 2 minutes on a 16-core host with the default pipelines.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from winnow import progress
from winnow.measure.timing import (
    cpu_model,
    first_samples,
    paired_ratios,
    session_runner,
    time_interleaved,
    timing_session,
)
from winnow.passes import PassContext, PassManager

SHIPPED_FP16 = "winnow: fp32 weight shipped as fp16"
PEER = "ORT dyn int8 per-channel"
DEFAULT_PIPELINES = ";".join([
    "quantize{mode=int8-dynamic}",
    "fuse,quantize{mode=int8-dynamic}",
    "split-outliers{free_only=true,factor=4},quantize{mode=int8-dynamic}",
    "fuse,split-outliers{free_only=true,factor=4},quantize{mode=int8-dynamic}",
    "split-outliers,quantize{mode=int8-dynamic}",
])


def pack(model_name: str, out: Path) -> None:
    """Write model.onnx (fp16-shipped weights), calibration.npz and heldout.npz for `run`."""
    from winnow import models_zoo

    zm = models_zoo.get(model_name)
    proto = ir.serde.serialize_model(zm.load_ir())
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.raw_data) > 4096:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
            t.doc_string = SHIPPED_FP16
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, out / "model.onnx")
    np.savez(out / "calibration.npz", **{f"{i}:{k}": v for i, b in enumerate(zm.calibration())
                                         for k, v in b.items()})
    held = zm.heldout()
    np.savez(out / "heldout.npz", **{k: np.concatenate([b[k] for b in held]) for k in held[0]})
    print(f"packed zoo:{model_name} into {out}")


def load_pack(folder: Path, work: Path) -> tuple[Path, list[dict], dict]:
    """The fp32 model file, the calibration batches and the held-out feeds of a pack."""
    proto = onnx.load(folder / "model.onnx")
    for t in proto.graph.initializer:
        if t.doc_string == SHIPPED_FP16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    onnx.save(proto, work / "fp32.onnx")
    stored = np.load(folder / "calibration.npz")
    batches: dict[int, dict] = {}
    for key in stored.files:
        index, name = key.split(":", 1)
        batches.setdefault(int(index), {})[name] = stored[key]
    return work / "fp32.onnx", [batches[i] for i in sorted(batches)], dict(np.load(folder / "heldout.npz"))


def variants(source: Path, calibration: list[dict], pipelines: list[str], work: Path) -> dict[str, Path]:
    """fp32, the peer and each pipeline's model, as files."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    paths = {"fp32": source, PEER: work / "peer.onnx"}
    with progress.quiet_libraries():
        quantize_dynamic(source, paths[PEER], per_channel=True, weight_type=QuantType.QInt8)
    for i, pipeline in enumerate(progress.bar(pipelines, "pipelines")):
        model = ir.load(source)
        PassManager(pipeline).run(model, PassContext(calibration=calibration))
        paths[pipeline] = work / f"variant-{i}.onnx"
        ir.save(model, paths[pipeline])
    return paths


def mean_cosine(path: Path, reference: np.ndarray, held: dict, chunk: int = 32) -> float:
    """Mean per-sample cosine of the first output against `reference` on the held-out feeds."""
    got = outputs(path, held, chunk).reshape(len(reference), -1)
    ref = reference.reshape(len(reference), -1)
    return float(np.mean(np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)))


def outputs(path: Path, held: dict, chunk: int = 32) -> np.ndarray:
    """The first output on all held-out rows."""
    session = timing_session(path)
    rows = len(next(iter(held.values())))
    return np.concatenate([session_runner(session, {k: v[i:i + chunk] for k, v in held.items()})()[0]
                           for i in range(0, rows, chunk)])


def timings(paths: dict[str, Path], held: dict, threads: list[int], repeats: int) -> dict:
    """(speed-up over fp32, over the peer, median ms) per variant and 'tN bB' column."""
    table: dict[str, dict] = {n: {} for n in paths}
    for t in threads:
        for batch in (1, 8):
            feeds = first_samples(held, batch)
            runners = {n: session_runner(timing_session(p, t), feeds) for n, p in paths.items()}
            measured = time_interleaved(runners, repeats=repeats, warmup=5, desc=f"t{t} b{batch}")
            for n in paths:
                table[n][f"t{t} b{batch}"] = (paired_ratios(measured["fp32"], measured[n])["median"],
                                              paired_ratios(measured[PEER], measured[n])["median"],
                                              measured[n].median * 1e3)
    return table


def main(argv: list[str] | None = None) -> None:
    """Pack here, or run on the host to measure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--model", default="minilm")
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("folder", type=Path)
    r.add_argument("--pipelines", default=DEFAULT_PIPELINES, help="';'-separated pipelines")
    r.add_argument("--threads", default="2,8")
    r.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.model, args.out)
        return
    with tempfile.TemporaryDirectory(prefix="winnow-portable-") as tmp:
        source, calibration, held = load_pack(args.folder, Path(tmp))
        paths = variants(source, calibration, args.pipelines.split(";"), Path(tmp))
        reference = outputs(source, held)
        cos = {n: mean_cosine(p, reference, held) for n, p in paths.items()}
        table = timings(paths, held, [int(t) for t in args.threads.split(",")], args.repeats)
    columns = list(next(iter(table.values())))
    print(f"\nhost: {cpu_model()}; speed-up over fp32 / over {PEER} (median ms), interleaved\n")
    print("| variant | mean cosine vs fp32 | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, row in table.items():
        cells = " | ".join(f"{a:.2f} / {b:.2f} ({ms:.2f})" for a, b, ms in row.values())
        print(f"| {name} | {cos[name]:.5f} | {cells} |")


if __name__ == "__main__":
    main()
