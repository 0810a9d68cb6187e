"""The peer table: what ONNX Runtime's own tooling gets on every zoo model (the table to beat).

For each zoo model, side by side in one run, timed interleaved (all variants of a model
round-robin, the order reversed every round):

- torch eager       the zoo's nn.Module (where there is one), torch.inference_mode
- ORT fp32          the model as winnow's frontend captures it, saved as ONNX, all graph
                    optimizations on: the reference of every ratio and of fidelity
- ORT dyn int8      onnxruntime.quantization.quantize_dynamic (after quant_pre_process)
- ORT dyn int8 pc   the same with per_channel=True: the strongest one-liner on MiniLM
- ORT dyn int8 pc rr  per_channel=True, reduce_range=True (7-bit weights, what ORT's docs
                    suggest on CPUs without VNNI)
- ORT dyn int8 MatMul  per_channel=True, MatMul only with constant B (MatMulConstBOnly), the
                    embeddings left in float
- ORT QDQ int8      quantize_static, QDQ format, per-channel weights, MinMax calibration on
                    the zoo's calibration split
- ORT transformers  onnxruntime.transformers.optimizer.optimize_model where a model type
                    applies, with the number of attention blocks it fused

Each row: median latency per batch size, the speed-up over ORT fp32 (median of paired
ratios), the mean cosine of the outputs against ORT fp32 on the held-out split, and the
zoo's task metric. The markdown table is printed and saved under bench/results/ with the
exact command and machine facts.

    python bench/peers.py [--models minilm,digits-cnn,...] [--repeats 20] [--threads N]
"""

from __future__ import annotations

import os

# Before torch loads: OpenMP threads that spin-wait between runs steal the cores of the
# ONNX Runtime session timed next (and vice versa); passive waiting keeps interleaving fair.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import dataclasses
import datetime
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from winnow import models_zoo, progress
from winnow.measure.threads import thread_candidates
from winnow.measure.timing import (
    Timing,
    available_cpus,
    machine_info,
    paired_ratios,
    rotating,
    time_interleaved,
    timing_session,
)

DEFAULT_MODELS = ("minilm", "digits-cnn", "digits-vit", "tiny-gpt", "ppocr-det", "ppocr-rec")
VARIANTS = ("torch eager", "ORT fp32", "ORT dyn int8", "ORT dyn int8 pc", "ORT dyn int8 pc rr",
            "ORT dyn int8 MatMul", "ORT QDQ int8", "ORT transformers")
# Further quantize_dynamic settings a careful user would try: (variant, keyword options, note).
DYNAMIC_SETTINGS = (
    ("ORT dyn int8 pc", {"per_channel": True}, "per-channel int8 weights"),
    ("ORT dyn int8 pc rr", {"per_channel": True, "reduce_range": True},
     "per-channel 7-bit weights (reduce_range)"),
    ("ORT dyn int8 MatMul", {"per_channel": True, "op_types_to_quantize": ["MatMul"],
                             "extra_options": {"MatMulConstBOnly": True}},
     "per-channel, MatMul with constant B only"),
)
REFERENCE = "ORT fp32"
WINNOW = "winnow --target host"
MAX_BATCH = {"ppocr-det": 2}  # 320x480 pages: batch 8 would take minutes on 2 cores
# The fidelity budget issue 12 sets each model (--max-drop of winnow's row; 0.01 elsewhere).
WINNOW_BUDGETS = {"minilm": "0.01", "digits-cnn": "0.005", "digits-vit": "0.005",
                  "tiny-gpt": "5%", "ppocr-rec": "0.05"}
EXTRA_METRICS = {"minilm": ("retrieval_agreement", "topic_top1"), "ppocr-rec": ("char_accuracy",)}
# Static QDQ quantizes only the compute-heavy ops: with ORT's default op list the additive
# attention masks (-inf / finfo.min) get quantized too and wreck MiniLM and tiny-gpt. Activations
# are uint8 (U8S8): on x86 that runs 2x faster than the default S8S8 at the same fidelity.
QDQ_OPS = ("Conv", "MatMul", "Gemm")
RESULTS = Path(__file__).resolve().parent / "results"

Feeds = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]


def transformer_settings(name: str) -> tuple[str, int, int] | None:
    """(model_type, num_heads, hidden_size) for ORT's transformer optimizer, None where none fits."""
    if name == "minilm":
        return "bert", 0, 0  # 0: detected from the graph
    if name == "digits-vit":
        from winnow.models_zoo.digits import VIT_HPARAMS

        return "vit", VIT_HPARAMS["heads"], VIT_HPARAMS["dim"]
    if name == "tiny-gpt":
        from winnow.models_zoo.tiny_gpt import HPARAMS

        return "qwen3", HPARAMS["heads"], HPARAMS["dim"]  # decoder-only, RoPE, GQA, RMSNorm
    return None


@dataclasses.dataclass
class Variant:
    """One way of running a model: a runner of feeds, or why there is none."""

    name: str
    run: Callable[[Feeds], Outputs] | None = None
    path: Path | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def size_mb(self) -> float | None:
        """Size of the ONNX file (None for torch)."""
        return self.path.stat().st_size / 1e6 if self.path and self.path.is_file() else None


@contextlib.contextmanager
def attempt(variant: Variant, message: str) -> Iterator[None]:
    """Run a preparation step; a failure is recorded on the variant, not raised."""
    try:
        with progress.step(message, after=0.5), quiet_output():
            yield
    except Exception as exc:  # noqa: BLE001 - every peer tool raises its own types
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        variant.error = f"failed: {type(exc).__name__}: {lines[0] if lines else ''}"[:300]
        variant.run = None


quiet_output = progress.quiet_libraries


def ort_runner(path: Path, threads: int | Mapping[int, int]) -> Callable[[Feeds], Outputs]:
    """The timing session (benchmark.timing_session) of a model file as a runner of named
    outputs; `threads` is one intra-op thread count, or one per batch size (rows -> threads,
    a session each)."""
    by_rows = dict(threads) if isinstance(threads, Mapping) else {}
    other = by_rows[max(by_rows)] if by_rows else threads  # rows no entry names
    sessions = {t: timing_session(path, t) for t in {*by_rows.values(), other}}
    names = [o.name for o in sessions[other].get_outputs()]
    inputs = {i.name for i in sessions[other].get_inputs()}

    def run(feeds: Feeds) -> Outputs:
        session = sessions[by_rows.get(_rows(feeds), other)]
        return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in inputs})))

    return run


def tune_threads(variants: Sequence[Variant], heldout: Sequence[Feeds], batches: Sequence[int],
                 name: str) -> None:
    """Give every ORT variant its fastest intra-op thread count per batch size: a winnow artifact
    (a model file beside its manifest) the count its manifest records (tuned when it was
    compiled), every other one the count measured here (`measure.threads.fastest_threads` on
    the first held-out group)."""
    from winnow.backends.manifest import MANIFEST_FILE, read_manifest
    from winnow.measure.threads import fastest_threads, threads_for

    for v in variants:
        if v.run is None or v.path is None:
            continue
        with attempt(v, f"{name}: {v.name}: choosing the thread count"):
            if (v.path.parent / MANIFEST_FILE).is_file():
                runtime = read_manifest(v.path.parent).get("runtime")
                chosen = {b: threads_for(runtime, b) for b in batches}
            else:
                feeds = {f"b{b}": row_groups(heldout, b, 1)[0] for b in batches}
                choice = fastest_threads(v.path, feeds).threads
                chosen = {b: choice[f"b{b}"] for b in batches}
            v.run = ort_runner(v.path, chosen)
            v.notes.append("ORT threads " + ", ".join(f"b{b} {t}" for b, t in chosen.items()))


def torch_runner(zm: Any) -> Callable[[Feeds], Outputs]:
    """The zoo's nn.Module under torch.inference_mode, on numpy feeds."""
    import torch

    module = zm.builder()

    def run(feeds: Feeds) -> Outputs:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(np.asarray(feeds[n])) for n in zm.input_names))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.numpy() for n, o in zip(zm.output_names, outs)}

    return run


class ZooCalibration:
    """onnxruntime CalibrationDataReader over a zoo model's calibration split."""

    def __init__(self, batches: Sequence[Feeds], input_names: Sequence[str]) -> None:
        self._batches = [{n: np.asarray(b[n]) for n in input_names} for b in batches]
        self._iter = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration batch, None when done."""
        return next(self._iter, None)

    def rewind(self) -> None:
        """Start over (ORT calls this between calibration passes)."""
        self._iter = iter(self._batches)


def _calibration_reader(zm: Any, path: Path) -> Any:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in inits]
    reader = type("ZooReader", (ZooCalibration, CalibrationDataReader), {})
    return reader(zm.calibration(), names)


def count_ops(path: Path, op_types: Sequence[str]) -> int:
    """Nodes of the given op types in an ONNX file (main graph)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type in op_types for node in graph.node)


def at_least_opset_13(path: Path, out: Path, notes: list[str]) -> Path:
    """`path`, or its opset-13 conversion when older (per-channel QDQ needs DequantizeLinear's
    axis; ORT's quantizer writes it into opset-12 models, which ORT then refuses to load)."""
    import onnx
    from onnx import version_converter

    proto = onnx.load(str(path))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 13:
        return path
    onnx.save(version_converter.convert_version(proto, 13), str(out))
    notes.append(f"opset {opset} converted to 13 first")
    return out


def pre_process(name: str, source: Path, pre: Path) -> tuple[Path, str]:
    """ORT's quant_pre_process of `source` into `pre` (symbolic shape inference first, then
    without it), or `source` itself when both fail; the path to quantize and a note saying which."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, pre = source.resolve(), pre.resolve()
    # ORT leaves the half-inferred model (and its external data) in the working directory when
    # symbolic shape inference gives up: run it in a scratch folder that goes away
    with tempfile.TemporaryDirectory(prefix="winnow-pre.") as scratch, contextlib.chdir(scratch):
        with attempt(Variant("pre"), f"{name}: quant_pre_process"):
            quant_pre_process(str(source), str(pre))
        if pre.is_file():
            return pre, "after quant_pre_process"
        with attempt(Variant("pre"), f"{name}: quant_pre_process (no symbolic shapes)"):
            quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    if pre.is_file():
        return pre, "after quant_pre_process without symbolic shape inference"
    return source, "quant_pre_process failed; quantized the export directly"


def prepare(zm: Any, work: Path, threads: int) -> list[Variant]:
    """Build every variant of a zoo model (failures are recorded on the variant)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from winnow.backends.ort import write_model
    from winnow.models_zoo import TorchZooModel

    variants = {name: Variant(name) for name in VARIANTS}
    torch_v = variants["torch eager"]
    if isinstance(zm, TorchZooModel):
        with attempt(torch_v, f"{zm.name}: building the PyTorch module"):
            torch_v.run = torch_runner(zm)
    else:
        torch_v.error = "n/a: shipped as ONNX, no nn.Module"

    fp32 = variants[REFERENCE]
    with attempt(fp32, f"{zm.name}: capturing with winnow's frontend"):
        folder = work / "fp32"
        folder.mkdir()
        write_model(zm.load_ir(), folder)
        fp32.path = folder / "model.onnx"
        fp32.run = ort_runner(fp32.path, threads)
    if fp32.run is None:
        return list(variants.values())
    blocks = count_ops(fp32.path, ("Softmax",))

    pre, pre_note = pre_process(zm.name, fp32.path, work / "pre.onnx")

    dyn = variants["ORT dyn int8"]
    with attempt(dyn, f"{zm.name}: quantize_dynamic"):
        dyn.path = work / "dynamic.onnx"
        quantize_dynamic(str(pre), str(dyn.path))
        dyn.run = ort_runner(dyn.path, threads)
        dyn.notes.append(f"int8 weights, {pre_note}")

    for label, options, note in DYNAMIC_SETTINGS:
        variant = variants[label]
        with attempt(variant, f"{zm.name}: quantize_dynamic ({note})"):
            variant.path = work / f"dynamic-{label.split()[-1]}-{len(options)}.onnx"
            quantize_dynamic(str(pre), str(variant.path), **options)
            variant.run = ort_runner(variant.path, threads)
            variant.notes.append(f"{note}, {pre_note}")

    qdq = variants["ORT QDQ int8"]
    with attempt(qdq, f"{zm.name}: quantize_static (calibrating on "
                      f"{len(zm.calibration())} batches)"):
        source = at_least_opset_13(pre, work / "pre-opset13.onnx", qdq.notes)
        qdq.path = work / "qdq.onnx"
        quantize_static(str(source), str(qdq.path), _calibration_reader(zm, source),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QDQ_OPS))
        qdq.run = ort_runner(qdq.path, threads)
        qdq.notes.append(f"U8S8, {'/'.join(QDQ_OPS)} only, per-channel, MinMax on "
                         f"{sum(_rows(b) for b in zm.calibration())} calibration samples")

    opt = variants["ORT transformers"]
    settings = transformer_settings(zm.name)
    if settings is None:
        opt.error = "n/a: not a transformer"
    else:
        model_type, heads, hidden = settings
        with attempt(opt, f"{zm.name}: ORT transformer optimizer ({model_type})"):
            from onnxruntime.transformers.optimizer import optimize_model

            optimized = optimize_model(str(fp32.path), model_type=model_type, num_heads=heads,
                                       hidden_size=hidden)
            opt.path = work / "transformers.onnx"
            optimized.save_model_to_file(str(opt.path))
            fused = count_ops(opt.path, ("Attention", "MultiHeadAttention",
                                         "GroupQueryAttention", "PackedAttention"))
            stats = {k: v for k, v in optimized.get_fused_operator_statistics().items()
                     if v and "Attention" not in k}
            opt.notes.append(f"model_type {model_type}: {fused} attention fusion(s) for "
                             f"{blocks} attention block(s)")
            if stats:
                opt.notes.append("also fused " + ", ".join(f"{k} {v}" for k, v in stats.items()))
            opt.run = ort_runner(opt.path, threads)
    return list(variants.values())


def _rows(feeds: Feeds) -> int:
    return int(next(iter(feeds.values())).shape[0])


def first_rows(batches: Sequence[Feeds], count: int, start: int = 0) -> dict[str, np.ndarray]:
    """`count` samples of a split from sample `start` on (batches concatenated; wrapping
    around when too few)."""
    out = {}
    for name in batches[0]:
        full = np.concatenate([b[name] for b in batches])
        rows = (start + np.arange(count)) % len(full)
        out[name] = np.ascontiguousarray(np.take(full, rows, axis=0))
    return out


def row_groups(batches: Sequence[Feeds], size: int, count: int) -> list[dict[str, np.ndarray]]:
    """`count` consecutive groups of `size` held-out samples (the first `count * size`)."""
    return [first_rows(batches, size, i * size) for i in range(count)]


def outputs_on(variant: Variant, batches: Sequence[Feeds], label: str) -> list[Outputs] | None:
    """The variant's outputs on every held-out batch (None when it cannot run them)."""
    try:
        return [{k: np.asarray(v) for k, v in variant.run(f).items()}
                for f in progress.bar(batches, f"{label}: {variant.name} on held-out data")]
    except Exception as exc:  # noqa: BLE001
        variant.error = f"failed on held-out data: {str(exc).strip().splitlines()[0][:140]}"
        variant.run = None
        return None


@dataclasses.dataclass
class Row:
    """One table row: a model's variant with its timings and fidelity."""

    model: str
    variant: str
    timings: dict[int, dict[str, Any]]
    cosine: float | None
    metrics: dict[str, float]
    size_mb: float | None
    notes: list[str]


def winnow_variant(zm: Any, work: Path, threads: int, options: Callable[[str], Any]) -> Variant:
    """winnow's own row: `winnow compile zoo:NAME --target host` with the search options
    `options(NAME)` gives."""
    from winnow.driver import search_compile

    v = Variant(WINNOW)
    with attempt(v, f"{zm.name}: winnow compile --target host"):
        options = options(zm.name)
        start = time.perf_counter()
        result = search_compile(f"zoo:{zm.name}", work / "winnow", options)
        v.path = work / "winnow" / "model.onnx"
        v.run = ort_runner(v.path, threads)
        emitted = result.compile.pipeline  # the chosen plan with the finishing passes
        pipeline = emitted.split("dce,", 1)[-1] if "dce," in emitted else emitted
        v.notes += [f"--max-drop {options.budget_text}",
                    f"compiled in {time.perf_counter() - start:.0f} s ({result.trials} trials)",
                    f"chose {pipeline}"]
    return v


def measure(name: str, threads: int, repeats: int, warmup: int, batches: Sequence[int],
            work: Path, winnow: Any = None, rotate: int = 1,
            tune: bool = True) -> tuple[list[Row], dict[str, Any]]:
    """Prepare, evaluate and time every variant of one zoo model (and winnow's row when
    `winnow` gives search options: model name -> SearchOptions); each batch size is timed on
    `rotate` groups of held-out samples in turn; with `tune` every ORT variant runs at its own
    fastest thread count per batch size (`tune_threads`), else at `threads`."""
    from winnow.measure.fidelity import OUTPUT_KINDS, evaluate

    zm = models_zoo.get(name)
    variants = prepare(zm, work, threads)
    if winnow is not None:
        variants.append(winnow_variant(zm, work, threads, winnow))
    heldout = zm.heldout()
    metric = zm.task_metric("heldout")
    kind = zm.output_kind if zm.output_kind in OUTPUT_KINDS else "values"
    outputs = {v.name: outputs_on(v, heldout, name) for v in variants if v.run is not None}
    reference = outputs.get(REFERENCE)
    fidelity: dict[str, tuple[float | None, dict[str, float]]] = {}
    for v in variants:
        outs = outputs.get(v.name)
        if outs is None or reference is None:
            continue
        ev = evaluate(reference, outs, heldout, metric=metric, output_kind=kind)
        fidelity[v.name] = (ev.cosine, ev.candidate_metrics)

    used = [min(b, MAX_BATCH.get(name, b)) for b in batches]
    if tune:
        tune_threads(variants, heldout, list(dict.fromkeys(used)), name)
    runnable = {v.name: v for v in variants if v.run is not None}
    timings: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in runnable}
    shapes = {}
    for b in dict.fromkeys(used):
        groups = row_groups(heldout, b, rotate)
        shapes[b] = {k: list(v.shape) for k, v in groups[0].items()}
        runners = {n: rotating(v.run, groups) for n, v in runnable.items()}
        result = time_interleaved(runners, repeats=repeats, warmup=warmup,
                                  desc=f"{name}: timing batch {b}", period=len(groups))
        for n, t in result.items():
            timings[n][b] = {**t.to_dict(), "speedup": _speedup(result, n)}
    rows = []
    for v in variants:
        cosine, metrics = fidelity.get(v.name, (None, {}))
        notes = list(v.notes) + ([v.error] if v.error else [])
        rows.append(Row(name, v.name, {b: timings.get(v.name, {}).get(b) for b in used}, cosine,
                        metrics, v.size_mb, notes))
    info = {"batches": used, "shapes": shapes, "rotate": rotate, "metric": zm.metric_name,
            "higher_is_better": zm.higher_is_better, "description": zm.description,
            "heldout_samples": sum(_rows(b) for b in heldout)}
    return rows, info


def _speedup(timings: Mapping[str, Timing], name: str) -> float | None:
    if REFERENCE not in timings:
        return None
    return paired_ratios(timings[REFERENCE], timings[name])["median"]


def _fmt_metric(name: str, info: Mapping[str, Any], metrics: Mapping[str, float]) -> str:
    keys = [info["metric"], *EXTRA_METRICS.get(name, ())]
    parts = [f"{k.replace('_', ' ')} {metrics[k]:.4f}" for k in keys if k and k in metrics]
    return ", ".join(parts) or "-"


def markdown(rows: Sequence[Row], infos: Mapping[str, Mapping[str, Any]],
             batches: Sequence[int]) -> str:
    """The peer table as markdown (one column pair per requested batch size)."""
    head = ["model", "variant"]
    for b in batches:
        head += [f"ms (b{b})", f"vs fp32 (b{b})"]
    head += ["cosine vs fp32", "task metric (held-out)", "MB", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for row in rows:
        info = infos[row.model]
        cells = [row.model, row.variant]
        for b in info["batches"]:
            t = row.timings.get(b)
            if t is None:
                cells += ["-", "-"]
                continue
            capped = "" if b in batches else f" (b{b})"
            cells.append(f"{t['median_ms']:.3g}{'*' if t['noisy'] else ''}{capped}")
            cells.append("-" if t["speedup"] is None else f"{t['speedup']:.2f}x")
        cells.append("-" if row.cosine is None else f"{row.cosine:.5f}")
        cells.append(_fmt_metric(row.model, info, row.metrics) if row.metrics else "-")
        cells.append("-" if row.size_mb is None else f"{row.size_mb:.2f}")
        cells.append("; ".join(row.notes).replace("|", "/") or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: Sequence[Row], infos: Mapping[str, Mapping[str, Any]], args: argparse.Namespace,
           command: str, machine: Mapping[str, Any], started: datetime.datetime,
           seconds: float) -> str:
    """The whole result file: command, machine, settings, inputs, the table and its legend."""
    m = machine
    inputs = []
    for name, info in infos.items():
        shapes = "; ".join(", ".join(f"{k} {v}" for k, v in s.items())
                           for s in info["shapes"].values())
        groups = info.get("rotate", 1)
        timed_on = (f"the first {groups} groups of held-out samples in turn (one group a round)"
                    if groups > 1 else "the first held-out samples")
        inputs.append(f"- **{name}** ({info['description']}): timed on {timed_on}, "
                      f"shapes {shapes}; fidelity on {info['heldout_samples']} held-out "
                      f"samples; task metric {info['metric']} "
                      f"({'higher' if info['higher_is_better'] else 'lower'} is better)")
    text = [
        f"# Peer benchmark, {started:%Y-%m-%d %H:%M}",
        "",
        f"Command: `{command}` ({seconds:.0f} s)",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['available_cpus']} "
        f"available), {m['os']} {m['machine']}; Python {m['python']}, torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}, "
        f"winnow {m['winnow']}.",
        "",
        f"Settings: {_threads_setting(args)}; all ORT graph "
        "optimizations on; no spin-waiting (ORT allow_spinning=0, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}) so interleaved runners do not steal each other's "
        f"cores; {args.warmup} warm-up + {args.repeats} timed rounds, every variant of a model "
        "interleaved in each round (order reversed every other round). Load average at start: "
        f"{m.get('load_average')}.",
        "",
        "Inputs:",
        *inputs,
        "",
        markdown(rows, infos, args.batch_sizes),
        "",
        "- ms: median latency of one run; `*`: noisy (slowest run > 1.5x the fastest on the same input group).",
        "- vs fp32: speed-up over ORT fp32, the median of per-round paired ratios "
        "(fp32 / variant; above 1 is faster).",
        "- cosine vs fp32: mean per-sample cosine of the outputs against ORT fp32 on the "
        "held-out split.",
        "- task metric: the zoo's metric of this variant on the held-out split (MiniLM's spearman "
        "and retrieval agreement are against the PyTorch original; topic top-1 is same-topic "
        "nearest-neighbour accuracy).",
        "- MB: ONNX file size.",
    ]
    capped = {n: i["batches"] for n, i in infos.items() if list(i["batches"]) != args.batch_sizes}
    for name, used in capped.items():
        text.append(f"- {name}: batch sizes {used} (capped at {MAX_BATCH.get(name)}).")
    return "\n".join(text) + "\n"


def _threads_setting(args: argparse.Namespace) -> str:
    if args.fixed_threads:
        return f"{args.threads} threads for ONNX Runtime (intra-op) and torch"
    return (f"{args.threads} threads for torch; every ORT variant at its own fastest intra-op "
            f"thread count per batch size among {thread_candidates(args.threads)} (in the notes: "
            "measured before timing, 15 interleaved rounds, a count below "
            f"{args.threads} only when >= 5% faster; winnow's row at the count its manifest "
            "records, measured when it was compiled)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated zoo names (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: %(default)s)")
    p.add_argument("--rotate", type=int, default=16, metavar="N",
                   help="time each batch size on N groups of held-out samples in turn, one group "
                        "a round, so inputs of every length count, not the first ones only "
                        "(default: %(default)s; 1: always the first samples)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for ORT and torch (default: the CPUs this process may use)")
    p.add_argument("--fixed-threads", action="store_true",
                   help="run every ORT variant at --threads instead of at its own fastest count "
                        "per batch size (measured first; winnow's from its manifest)")
    p.add_argument("--batches", default="1,8",
                   help="comma-separated batch sizes to time (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="result file (default: bench/results/peers-<date>.md; a .json beside it)")
    p.add_argument("--winnow-budget", default=None, metavar="DURATION",
                   help="add winnow's row: `winnow compile --target host` with this search time "
                        "budget per model (e.g. 5m); its compile time is in the notes")
    p.add_argument("--winnow-max-drop", default=None, metavar="X",
                   help="winnow's fidelity budget for every model (default: each model's in "
                        "WINNOW_BUDGETS, the targets of issue 12)")
    p.add_argument("--winnow-trials", type=int, default=None,
                   help="search trials per model (default: the compile's, 48)")
    args = p.parse_args(argv)
    args.model_names = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batch_sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    args.threads = args.threads or available_cpus()
    if args.repeats < 1 or args.rotate < 1 or not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--repeats, --rotate and every batch size must be at least 1")
    unknown = [m for m in args.model_names if m not in models_zoo.names()]
    if unknown:
        p.error(f"unknown zoo model(s) {', '.join(unknown)}; available: "
                f"{', '.join(models_zoo.names())}")
    return args


def _search_options(args: argparse.Namespace) -> Any:
    if args.winnow_budget is None:
        return None
    from winnow.driver import SearchOptions
    from winnow.driver.search import parse_duration

    trials = {} if args.winnow_trials is None else {"trials": args.winnow_trials}
    budget = parse_duration(args.winnow_budget)
    SearchOptions(time_budget=budget, max_drop=args.winnow_max_drop or "0.01", **trials)  # checks

    def options_for(name: str) -> Any:
        """The search options of one model: its issue-12 fidelity budget unless one is given."""
        max_drop = args.winnow_max_drop or WINNOW_BUDGETS.get(name, "0.01")
        return SearchOptions(time_budget=budget, max_drop=max_drop, **trials)

    return options_for


def main(argv: Sequence[str] | None = None) -> int:
    """Run the peer benchmark, print the markdown and save it (plus JSON) under bench/results/."""
    args = parse_args(argv)
    import onnxruntime
    import torch

    onnxruntime.set_default_logger_severity(3)
    started = datetime.datetime.now()
    start = time.perf_counter()
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/peers.py", *argv])])
    machine = machine_info()
    rows: list[Row] = []
    infos: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="winnow-peers-") as scratch:
        for name in progress.bar(args.model_names, "models"):
            work = Path(scratch) / name
            work.mkdir()
            torch.set_num_threads(args.threads)
            # ORT's symbolic shape inference drops temporary files into the working folder.
            with contextlib.chdir(work):
                model_rows, infos[name] = measure(name, args.threads, args.repeats,
                                                  args.warmup, args.batch_sizes, work,
                                                  _search_options(args), args.rotate,
                                                  not args.fixed_threads)
            rows += model_rows
    seconds = time.perf_counter() - start
    text = report(rows, infos, args, command, machine, started, seconds)
    out = Path(args.out) if args.out else RESULTS / f"peers-{started:%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    from winnow.backends.manifest import jsonable

    out.with_suffix(".json").write_text(json.dumps(jsonable({
        "command": command, "machine": machine, "seconds": seconds,
        "settings": {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                     "batches": args.batch_sizes, "rotate": args.rotate},
        "models": infos, "rows": [dataclasses.asdict(r) for r in rows]}), indent=2) + "\n")
    print(text)
    print(f"saved {out} and {out.with_suffix('.json').name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
