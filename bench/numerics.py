"""Evidence for the number formats: L-Mul products and dot products against fp32 beside float8
rounding (ml_dtypes), block floating point with and without K-sort on tiny-gpt and minilm, and
L-Mul in attention only vs everywhere at model level (held-out fidelity and run time in ORT).

    python bench/numerics.py [--models minilm,tiny-gpt,digits-vit] [--ms 2,3,4] [--lmul-m 3]
                             [--blocks 8,16,32,64,128] [--formats bfp12,bfp16] [--bfp-weights]
                             [--samples 200000] [--repeats 10] [--tables products,bfp,lmul]
                             [--out DIR]

Prints markdown tables and saves them, with the command line, under --out (default: a new
temporary folder; `--out bench/results` keeps them with the repository). Progress on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnxruntime as ort

import winnow.progress
from winnow import models_zoo
from winnow.measure.timing import available_cpus, first_samples, latency_ratio
from winnow.errors import WinnowError
from winnow.measure.fidelity import evaluate_zoo
from winnow.ir.execute import run
from winnow.numerics import bfp_quantize, lmul
from winnow.passes import PassContext, PassManager
from winnow.passes.rewrite.bfp import attention_scores, k_sort

FP8 = {"fp8 e4m3": ml_dtypes.float8_e4m3fn, "fp8 e5m2": ml_dtypes.float8_e5m2}
DOT_LENGTHS = (64, 256, 1024)
BFP_HEADER = ["| model | format | block | cos weights | cos K | cos K + K-sort | K error "
              "| K error K-sorted |", "|---|---|---|---|---|---|---|---|"]
LMUL_HEADER = ["| model | L-Mul in | m | nodes rewritten | mean cosine | task metric "
               "| ORT time / fp32 time |", "|---|---|---|---|---|---|---|"]


def fp8_round(x: np.ndarray, dtype) -> np.ndarray:
    """x rounded to a float8 format (to nearest even, saturating at its largest finite value)."""
    top = float(ml_dtypes.finfo(dtype).max)
    return np.clip(x, -top, top).astype(dtype).astype(np.float32)


def products(x: np.ndarray, y: np.ndarray, fmt: str, m: int | None) -> np.ndarray:
    """Elementwise products in a format: L-Mul with m bits, or float8 inputs multiplied exactly."""
    if m is not None:
        return lmul(x, y, m).astype(np.float64)
    return fp8_round(x, FP8[fmt]).astype(np.float64) * fp8_round(y, FP8[fmt])


def formats(ms: list[int]) -> list[tuple[str, int | None]]:
    """The rows of the product tables: L-Mul per m, then the float8 formats."""
    return [(f"L-Mul m={m}", m) for m in ms] + [(name, None) for name in FP8]


def product_table(ms: list[int], samples: int, rng: np.random.Generator) -> list[str]:
    """Relative error of single products of N(0, 1) float32 pairs against the exact product."""
    x, y = rng.standard_normal((2, samples)).astype(np.float32)
    exact = x.astype(np.float64) * y
    lines = ["| format | mean rel. error | RMS rel. error | max rel. error | mean signed |",
             "|---|---|---|---|---|"]
    for name, m in formats(ms):
        rel = products(x, y, name, m) / exact - 1
        lines.append(f"| {name} | {np.abs(rel).mean():.4f} | {np.sqrt((rel ** 2).mean()):.4f} "
                     f"| {np.abs(rel).max():.4f} | {rel.mean():+.4f} |")
    return lines


def dot_table(ms: list[int], samples: int, rng: np.random.Generator) -> list[str]:
    """Dot products of N(0, 1) vectors, products summed in float32: median |error| / |exact|
    and mean |error| / sum |x_i y_i| (which does not blow up when the dot is near 0)."""
    lines = ["| format | length | median rel. error | mean error / sum abs(x*y) |", "|---|---|---|---|"]
    for name, m in formats(ms):
        for n in DOT_LENGTHS:
            count = max(samples // n, 200)
            x, y = rng.standard_normal((2, count, n)).astype(np.float32)
            exact = np.sum(x.astype(np.float64) * y, axis=-1)
            got = np.sum(products(x, y, name, m).astype(np.float32), axis=-1, dtype=np.float32)
            err = np.abs(got - exact)
            scale = np.sum(np.abs(x.astype(np.float64) * y), axis=-1)
            lines.append(f"| {name} | {n} | {np.median(err / np.abs(exact)):.4f} "
                         f"| {np.mean(err / scale):.5f} |")
    return lines


def rewritten(zm, pipeline: str):
    """A fresh copy of the zoo model with `pipeline` applied."""
    model = zm.load_ir()
    PassManager(pipeline).run(model, PassContext(calibration=zm.calibration()))
    return model


def k_errors(zm, blocks: list[int], fmt: str) -> dict[tuple[int, bool], float]:
    """Relative Frobenius error of BFP on the captured K operands of one held-out batch, per
    block, without and with K-sort (None when K-sort is refused)."""
    feeds = zm.heldout()[0]
    base, model = zm.load_ir(), zm.load_ir()
    names = [s.inputs[1].name for _, s in attention_scores(base)]
    outputs = run(base, feeds, capture=names)
    captured = {False: [outputs[n] for n in names]}
    try:
        for region, _ in attention_scores(model):
            k_sort(model.graph, region)
        outputs = run(model, feeds, capture=names)
        captured[True] = [outputs[n] for n in names]
    except WinnowError:
        pass
    out = {}
    for sort, values in captured.items():
        for block in blocks:
            num = sum(np.sum((bfp_quantize(k, fmt, block, axis=-2) - k) ** 2.0) for k in values)
            den = sum(np.sum(k.astype(np.float64) ** 2) for k in values)
            out[block, sort] = float(np.sqrt(num / den))
    return out


def bfp_rows(name: str, blocks: list[int], formats: list[str], weights: bool) -> list[str]:
    """Held-out cosine of BFP on K, on K after K-sort (and on the weights), per format and block."""
    zm = models_zoo.get(name)
    rows = []
    bar = winnow.progress.counter(f"{name}: bfp format x block", len(formats) * len(blocks))
    variants = [("k", "weights=false,keys=true"),
                ("k sorted", "weights=false,keys=true,k_sort=true")]
    variants += [("weights", "weights=true")] if weights else []
    for fmt in formats:
        errors = k_errors(zm, blocks, fmt)
        for block in blocks:
            cos = {"weights": "-"}
            for label, options in variants:
                try:
                    model = rewritten(zm, f"bfp{{format={fmt},block={block},{options}}}")
                    cos[label] = f"{evaluate_zoo(zm, model).cosine:.5f}"
                except WinnowError as exc:
                    cos[label] = "refused (rotary)" if "rotary" in str(exc) else "refused"
            sorted_err = errors.get((block, True))
            rows.append(f"| {name} | {fmt} | {block} | {cos['weights']} | {cos['k']} | "
                        f"{cos['k sorted']} | {errors[block, False]:.4f} | "
                        f"{'-' if sorted_err is None else f'{sorted_err:.4f}'} |")
            bar.update()
    bar.close()
    return rows


def lmul_rows(name: str, m: int, repeats: int, threads: int | None) -> list[str]:
    """Held-out fidelity and ORT run time of L-Mul in attention only and everywhere."""
    zm = models_zoo.get(name)
    base = zm.load_ir()
    feeds = first_samples(zm.heldout()[0], 1)
    rows = []
    for scope in winnow.progress.bar(["attention", "all"], f"{name}: lmul m={m}"):
        ctx = PassContext(calibration=zm.calibration())
        model = zm.load_ir()
        PassManager(f"lmul{{m={m},nodes=[{scope}]}}").run(model, ctx)
        fid = evaluate_zoo(zm, model)
        speed = latency_ratio(base, model, feeds, repeats=repeats, threads=threads)["median"]
        counts = ", ".join(f"{k} {v}" for k, v in ctx.report["lmul"]["rewritten"].items())
        metric = "-" if fid.candidate_metric is None else f"{fid.candidate_metric:.4f}"
        reference = "-" if fid.reference_metric is None else f"{fid.reference_metric:.4f}"
        rows.append(f"| {name} | {scope} | {m} | {counts} | {fid.cosine:.5f} | {fid.metric_name} "
                    f"{metric} (fp32 {reference}) | {1 / speed:.1f}x |")
    return rows


def main(argv=None):
    """Run the benchmark and print/save the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,tiny-gpt,digits-vit",
                        help="models of the L-Mul table (BFP runs on minilm and tiny-gpt of these)")
    parser.add_argument("--ms", default="2,3,4", help="L-Mul mantissa bits of the error tables")
    parser.add_argument("--lmul-m", type=int, default=3, help="m of the model-level L-Mul table")
    parser.add_argument("--blocks", default="8,16,32,64,128")
    parser.add_argument("--tables", default="products,bfp,lmul",
                        help="which tables: products (single and dot products), bfp, lmul")
    parser.add_argument("--formats", default="bfp12", help="BFP formats (bfp12, bfp16)")
    parser.add_argument("--bfp-weights", action="store_true",
                        help="also BFP on the weights alone (one more evaluation per row)")
    parser.add_argument("--samples", type=int, default=200000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="ORT intra-op threads (default: the CPUs this process may use)")
    parser.add_argument("--out", default=None,
                        help="folder for the results file (default: a new temporary folder)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="winnow-numerics-"))
    ms = [int(m) for m in args.ms.split(",")]
    blocks = [int(b) for b in args.blocks.split(",")]
    models = args.models.split(",")
    tables = set(args.tables.split(","))
    rng = np.random.default_rng(0)
    sections = []
    if "products" in tables:
        sections += [("Single products, x, y ~ N(0, 1) float32, error against the exact product",
                      product_table(ms, args.samples, rng)),
                     ("Dot products, products summed in float32, error against the exact "
                      "(float64) dot", dot_table(ms, args.samples, rng))]
    if "bfp" in tables:
        rows = [row for name in models if name in ("minilm", "tiny-gpt")
                for row in bfp_rows(name, blocks, args.formats.split(","), args.bfp_weights)]
        sections.append(("BFP: held-out mean cosine (K operand only; K after K-sort; weights "
                         "only with --bfp-weights) and the relative error of K itself (all "
                         "layers' K operands of one held-out batch)", BFP_HEADER + rows))
    if "lmul" in tables:
        rows = [row for name in models
                for row in lmul_rows(name, args.lmul_m, args.repeats, args.threads)]
        sections.append((f"L-Mul at model level (m={args.lmul_m}): held-out mean cosine, task "
                         "metric, and ORT time of the emulation against fp32 (batch 1, "
                         "interleaved)", LMUL_HEADER + rows))
    text = "\n\n".join(f"### {title}\n\n" + "\n".join(lines) for title, lines in sections)
    print(text)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    command = " ".join(argv or sys.argv[1:])
    header = (f"# numerics evidence (L-Mul, BFP, K-sort)\n\ncommand: `python bench/numerics.py "
              f"{command}`\n\nmachine: {platform.processor() or platform.machine()}, ORT "
              f"{ort.__version__}, {args.threads or available_cpus()} threads, ml_dtypes "
              f"{ml_dtypes.__version__}. Float8 inputs are rounded to nearest even (saturating) and "
              "multiplied exactly. L-Mul in ORT is the exact emulation of the `lmul` pass (2^m "
              "float MatMuls per MatMul), so its time is the emulation's, not L-Mul hardware's.\n\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"numerics-{stamp}.md"
    out.write_text(header + text + "\n")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
