"""Where ppocr-rec's time goes in ORT fp32: per-node kernel time from ORT's profiler (median over
interleaved profiled runs), grouped into the backbone (convs before the neck's pooling), the SVTR
neck (its convs, attention MatMuls, LayerNorms) and the CTC head (the last MatMul and Softmax),
and by op type within each part, at batch 1 and 8; then ORT's per-op-type time of the source
beside the model after `--pipeline` (default: the lossless pipeline + fuse-convs), both profiled
interleaved.

    nice -n 10 python bench/ppocr_rec_profile.py [--runs 20] [--threads N] [--pipeline P] [--out FILE]

Prints a markdown table (and writes it to --out) with the command line and load average.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion import batch_of, compiled  # noqa: E402

from winnow import models_zoo  # noqa: E402
from winnow.measure.timing import available_cpus, machine_info  # noqa: E402
from winnow.passes.manager import DEFAULT_PIPELINE  # noqa: E402

NECK_START = "p2o.AveragePool.0"  # the SVTR neck's first node in the shipped file
HEAD_NODES = ("p2o.MatMul.24", "p2o.Add.277", "p2o.Softmax.2")


def sections(proto) -> dict[str, str]:
    """Node (and output value) name -> backbone / neck / head, by position in the shipped
    file's node order."""
    out, part = {}, "backbone"
    for node in proto.graph.node:
        if node.name == NECK_START:
            part = "neck"
        out[node.name] = "head" if node.name in HEAD_NODES else part
        for value in node.output:  # ORT names an NCHWc node after its output value
            out.setdefault(value, out[node.name])
    return out


def node_times(model_path, feeds, runs, threads):
    """Per profiled run: {(node name, op type): microseconds}."""
    with tempfile.TemporaryDirectory() as tmp:
        import onnxruntime as ort

        from winnow.measure.timing import bench_session_options

        options = bench_session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "rec")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for _ in range(3 + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"][3:]
    per_run = [collections.Counter() for _ in spans]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            for i, (a, b) in enumerate(spans):
                if a <= e["ts"] <= b:
                    per_run[i][(e["name"][:-len("_kernel_time")], e["args"]["op_name"])] += e["dur"]
                    break
    return per_run, [b - a for a, b in spans]


def part_of(name: str, parts: dict[str, str]) -> str:
    """The section of an ORT node (fused nodes keep the first fused node's name, maybe suffixed)."""
    if name in parts:
        return parts[name]
    for suffix in ("_nchwc", "_token_0", "_output_0"):
        if name.endswith(suffix) and name[:-len(suffix)] in parts:
            return parts[name[:-len(suffix)]]
    base = name.split("/")[0]
    return parts.get(base, "other (ORT-inserted: " + name + ")")


def profile(zm, batch, runs, threads):
    """Rows (section, op type, ms, share) and the median run ms at one batch size."""
    import onnx

    proto = onnx.load(str(zm.path))
    parts = sections(proto)
    feeds = batch_of(zm.heldout(), batch)
    per_run, run_us = node_times(zm.path, feeds, runs, threads)
    keys = set().union(*per_run)
    median = {k: float(np.median([r.get(k, 0) for r in per_run])) for k in keys}
    grouped = collections.Counter()
    for (name, op), us in median.items():
        part = part_of(name, parts)
        grouped[(part if not part.startswith("other") else "other", op)] += us
    return grouped, float(np.median(run_us)), sorted(k for k in keys
                                                     if part_of(k[0], parts).startswith("other"))


def table(results) -> str:
    """Markdown: one row per (section, op type), ms and share at each batch."""
    batches = list(results)
    keys = set().union(*(g for g, _, _ in results.values()))
    totals = {b: sum(results[b][0].values()) for b in batches}
    order = sorted(keys, key=lambda k: ("backbone neck head other".split().index(k[0]),
                                        -results[batches[-1]][0].get(k, 0)))
    head = "| part | op type | " + " | ".join(f"ms b{b} | share b{b}" for b in batches) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(batches)]
    for part in ("backbone", "neck", "head", "other"):
        rows = [k for k in order if k[0] == part]
        if not rows:
            continue
        sums = " | ".join(f"**{sum(results[b][0].get(k, 0) for k in rows) / 1e3:.2f}** | "
                          f"**{sum(results[b][0].get(k, 0) for k in rows) / totals[b]:.1%}**"
                          for b in batches)
        lines.append(f"| **{part}** | all | {sums} |")
        for k in rows:
            cells = " | ".join(f"{results[b][0].get(k, 0) / 1e3:.2f} | "
                               f"{results[b][0].get(k, 0) / totals[b]:.1%}" for b in batches)
            lines.append(f"| {part} | {k[1]} | {cells} |")
    lines.append("| **all** | sum of kernels | " + " | ".join(
        f"{totals[b] / 1e3:.2f} | 100% " for b in batches) + "|")
    lines.append("| **all** | model_run (median) | " + " | ".join(
        f"{results[b][1] / 1e3:.2f} | " for b in batches) + "|")
    return "\n".join(lines)


def kernel_kind(node) -> str:
    """What an ORT-optimized node is: for Convs, pointwise / depthwise / a BatchNormalization
    ORT turned into a depthwise 1x1 conv, its kernel size and fused activation; else its op."""
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type != "Conv":
        return node.op_type
    if "_bn_nchwc" in node.name:
        kind = "BatchNormalization as depthwise 1x1 conv"
    else:
        kernel = "x".join(str(k) for k in attrs.get("kernel_shape", [1, 1]))
        kind = f"{'depthwise' if attrs.get('group', 1) > 1 else 'Conv'} {kernel}"
    activation = attrs.get("activation")
    return kind + (f" + {activation.decode()}" if activation else "")


def kind_times(models, feeds, runs, threads):
    """Per model, microseconds per kernel kind (median over `runs` profiled runs, the models'
    runs interleaved)."""
    import onnx
    import onnxruntime as ort

    from winnow.ir.execute import model_bytes
    from winnow.measure.timing import bench_session_options

    with tempfile.TemporaryDirectory() as tmp:
        sessions, kinds = {}, {}
        for tag, model in models.items():
            options = bench_session_options(threads)
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tmp, tag)
            options.optimized_model_filepath = os.path.join(tmp, f"{tag}.onnx")
            sessions[tag] = ort.InferenceSession(model_bytes(model), options,
                                                 providers=["CPUExecutionProvider"])
            optimized = onnx.load(os.path.join(tmp, f"{tag}.onnx"))
            kinds[tag] = {n.name: kernel_kind(n) for n in optimized.graph.node}
        for _ in range(3 + runs):
            for session in sessions.values():
                session.run(None, feeds)
        out = {}
        for tag, session in sessions.items():
            events = json.loads(Path(session.end_profiling()).read_text())
            spans = [(e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("name") == "model_run"][3:]
            per_run = [collections.Counter() for _ in spans]
            for e in events:
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                    name = e["name"][:-len("_kernel_time")]
                    for i, (a, b) in enumerate(spans):
                        if a <= e["ts"] <= b:
                            per_run[i][kinds[tag].get(name, e["args"]["op_name"])] += e["dur"]
                            break
            keys = set().union(*per_run)
            out[tag] = {k: float(np.median([r.get(k, 0) for r in per_run])) for k in keys}
    return out


def after_table(zm, pipeline, runs, threads) -> str:
    """Markdown: per kernel kind, source ms -> rewritten ms at b1 and b8."""
    base = zm.load_ir()
    model, _ = compiled(zm, base, pipeline)
    prof = {b: kind_times({"source": base, "after": model}, batch_of(zm.heldout(), b), runs,
                          threads) for b in (1, 8)}
    kinds = sorted(set().union(*(set(p["source"]) | set(p["after"]) for p in prof.values())),
                   key=lambda k: -prof[8]["source"].get(k, 0) - prof[8]["after"].get(k, 0))
    lines = ["| kernel (ORT-optimized node) | source ms b1 | after ms b1 | source ms b8 | "
             "after ms b8 |", "|---|---|---|---|---|"]
    for kind in kinds:
        cells = [prof[b][k].get(kind, 0) / 1e3 for b in (1, 8) for k in ("source", "after")]
        if max(cells) >= 0.05:
            lines.append(f"| {kind} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    sums = " | ".join(f"**{sum(prof[b][k].values()) / 1e3:.2f}**" for b in (1, 8)
                      for k in ("source", "after"))
    lines.append(f"| **sum of kernels** (rows under 0.05 ms left out) | {sums} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Profile ppocr-rec at b1 and b8 and print/write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--pipeline", default=f"{DEFAULT_PIPELINE},fuse-convs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    zm = models_zoo.get("ppocr-rec")
    results = {b: profile(zm, b, args.runs, args.threads) for b in (1, 8)}
    info = machine_info()
    info = f"{info['cpu']}, {info['available_cpus']} CPUs, onnxruntime {info['onnxruntime']}"
    text = (f"# ppocr-rec profile, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n\n"
            f"Command: `python bench/ppocr_rec_profile.py {' '.join(argv or sys.argv[1:])}`\n\n"
            f"Machine: {info}; {args.threads} ORT threads, no spinning, all graph optimizations; "
            f"load average at start {[round(x, 2) for x in load]}.\n\n"
            f"ORT kernel time per node (median of {args.runs} profiled runs after 3 warm-ups), "
            "summed by part and op type (op types after ORT's own fusions).\n\n"
            + table(results) + "\n\n"
            f"### After `{args.pipeline}`\n\nORT kernel time per kind of kernel (Convs by "
            f"kernel and fused activation), source and rewritten model profiled interleaved "
            f"(median of {args.runs} runs):\n\n"
            + after_table(zm, args.pipeline, args.runs, args.threads) + "\n")
    other = sorted({op for _, _, names in results.values() for _, op in names})
    if other:
        text += (f"\n'other': nodes ORT inserted ({', '.join(other)}): the layout reorders "
                 "between its blocked (NCHWc) convolutions and the ops that cannot read that "
                 "layout.\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
