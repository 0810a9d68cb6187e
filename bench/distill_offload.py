"""Run a pipeline's `distill` on another machine (a GPU host), then build the artifact here.

Distillation is the one slow step of winnow's lossy pipelines on a laptop-class CPU; a GPU host
can afford many more steps. This script moves only data, never results it made up:

    python bench/distill_offload.py export --model minilm --to DIR
        here: the zoo model's ONNX export (split in parts no larger than --part-mb), its
        calibration split and its unlabelled train split (when it has one) as .npz files
    python bench/distill_offload.py train --from DIR --pipeline 'P,distill{...}' --to OUT
        there: the pipeline on that ONNX and calibration (PassManager, as `winnow compile` runs
        it), then every tensor distill trained, saved in .npz parts of at most --part-mb
    python bench/distill_offload.py assemble --model minilm --pipeline 'P,distill{...}' \
        --weights OUT --then 'fuse{attention=false}' --to ARTIFACT
        here: the pipeline's passes before distill on the same export and calibration, the
        trained tensors put in by name (every name and shape must match), then --then; writes
        the ORT artifact ARTIFACT (as `winnow compile` does) that `bench/quantize.py
        --artifacts` times and scores on the zoo's held-out split

The passes before distill only decide shapes (which heads and channels go); every tensor they
produce that distill trains is replaced, so the artifact is the model trained there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from winnow.ir.torch_exec import trainable
from winnow.passes import PassContext, PassManager
from winnow.passes.instruments import Instrument
from winnow.passes.manager import build_pipeline, pass_label
from winnow.passes.rewrite.distill import lookup_tables

MODEL = "model.onnx"
CALIBRATION = "calibration.npz"
TRAINING = "training.npz"


def _split_file(path: Path, part_bytes: int) -> list[Path]:
    """Cut `path` into numbered parts of at most `part_bytes`; returns them."""
    data, parts = path.read_bytes(), []
    for i in range(0, len(data), part_bytes):
        part = path.with_name(f"{path.name}.part{len(parts):02d}")
        part.write_bytes(data[i:i + part_bytes])
        parts.append(part)
    path.unlink()
    return parts


def _join_parts(folder: Path, name: str) -> Path:
    """The file `name` in `folder`, joined from its parts when it was split."""
    whole = folder / name
    parts = sorted(folder.glob(f"{name}.part*"))
    if parts and not whole.exists():
        whole.write_bytes(b"".join(p.read_bytes() for p in parts))
    return whole


def _save_batches(path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    arrays = {f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()}
    np.savez_compressed(path, **arrays)


def _load_batches(path: Path) -> list[dict[str, np.ndarray]]:
    data = np.load(path)
    batches: dict[int, dict[str, np.ndarray]] = {}
    for key in data.files:
        index, name = key.split("/", 1)
        batches.setdefault(int(index), {})[name] = data[key]
    return [batches[i] for i in sorted(batches)]


def _split_pipeline(text: str) -> tuple[str, str]:
    """The pipeline before its distill step, and the distill step itself."""
    at = text.index("distill")
    return text[:at].rstrip(","), text[at:]


def export(args: argparse.Namespace) -> None:
    """Write the zoo model's export and calibration split into --to."""
    from winnow import models_zoo

    out = Path(args.to)
    out.mkdir(parents=True, exist_ok=True)
    zoo = models_zoo.get(args.model)
    ir.save(zoo.load_ir(), out / MODEL)
    _save_batches(out / CALIBRATION, zoo.make_split("calibration"))
    if zoo.has_training_split:
        _save_batches(out / TRAINING, zoo.make_split("train"))
    parts = _split_file(out / MODEL, args.part_mb << 20)
    print(f"wrote {len(parts)} model parts and {CALIBRATION} to {out}")


def train(args: argparse.Namespace) -> None:
    """Run the pipeline on the exported model; save what distill trained in parts. With
    --init, distill starts from earlier trained tensors (put in after the passes before it)
    and still learns the exported model's outputs."""
    src, out = Path(args.source), Path(args.to)
    model = ir.load(_join_parts(src, MODEL))
    training = _load_batches(src / TRAINING) if (src / TRAINING).exists() else None
    ctx = PassContext(calibration=_load_batches(src / CALIBRATION), training=training)
    passes = build_pipeline(args.pipeline)
    instruments = []
    if args.init:
        labels = [pass_label(p) for p in passes]
        if "distill" not in labels:
            raise SystemExit("--init gives distill its starting weights: --pipeline has no "
                             "distill step")
        instruments.append(_PutWeights(labels.index("distill"), _load_weights(Path(args.init))))
    PassManager(passes, instruments).run(model, ctx)
    frozen = lookup_tables(model)
    tensors = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()
               if trainable(v) and v.name not in frozen}
    out.mkdir(parents=True, exist_ok=True)
    part, size, index = {}, 0, 0
    for name, array in tensors.items():
        if part and size + array.nbytes > (args.part_mb << 20):
            np.savez(out / f"weights{index:02d}.npz", **part)
            part, size, index = {}, 0, index + 1
        part[name], size = array, size + array.nbytes
    np.savez(out / f"weights{index:02d}.npz", **part)
    (out / "distill.json").write_text(json.dumps(ctx.report.get("distill", {}), indent=1))
    print(json.dumps(ctx.report.get("distill", {})))


class _PutWeights(Instrument):
    """Before pass `index` (distill), the trained tensors go into the model by name."""

    def __init__(self, index: int, weights: dict[str, np.ndarray]) -> None:
        self.index, self.weights = index, weights

    def before_pass(self, index: int, label: str, model: ir.Model) -> None:
        """Put the tensors in just before distill runs."""
        if index == self.index:
            _put_weights(model, self.weights)


def _load_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the weights*.npz parts in `folder`."""
    weights = {}
    for path in sorted(folder.glob("weights*.npz")):
        weights.update(np.load(path))
    return weights


def _put_weights(model: ir.Model, weights: dict[str, np.ndarray]) -> None:
    """Replace the initializers named in `weights`; every name and shape must match."""
    for name, array in weights.items():
        value = model.graph.initializers.get(name)
        if value is None or tuple(value.shape) != array.shape:
            raise SystemExit(f"trained tensor '{name}' {array.shape} does not fit this model "
                             f"({None if value is None else tuple(value.shape)})")
        value.const_value = ir.tensor(array, name=name)


def assemble(args: argparse.Namespace) -> None:
    """The passes before distill here, the trained tensors put in, then --then; an artifact."""
    from winnow import models_zoo

    zoo = models_zoo.get(args.model)
    model = zoo.load_ir()
    ctx = PassContext(calibration=zoo.make_split("calibration"))
    before, _ = _split_pipeline(args.pipeline)
    PassManager(before).run(model, ctx)
    weights = _load_weights(Path(args.weights))
    _put_weights(model, weights)
    if args.then:
        PassManager(args.then).run(model, PassContext(calibration=ctx.calibration))
    _emit(model, args, ctx.calibration[0], len(weights))


def _emit(model: ir.Model, args: argparse.Namespace, feeds: dict[str, np.ndarray],
          replaced: int) -> None:
    """Write the artifact as `winnow compile --target host` does (the ORT backend, its thread
    count tuned at b1 and b8), with the weights' origin in the manifest's pass list."""
    from winnow.backends.ort import emit
    from winnow.driver.compile import RUNTIME_BATCHES
    from winnow.driver.timing import timing_feeds

    pipeline = ",".join(p for p in (args.pipeline, args.then) if p)
    origin = [{"name": "distill_offload", "trained_on": str(args.weights),
               "tensors_replaced": replaced}]
    emit(model, args.to, pipeline_text=pipeline, source=f"zoo:{args.model}", overwrite=True,
         passes=origin, runtime_feeds=timing_feeds(model, feeds, RUNTIME_BATCHES))
    print(f"replaced {replaced} trained tensors; wrote {Path(args.to) / MODEL}")


def main(argv: list[str] | None = None) -> None:
    """Command line: export | train | assemble."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export")
    e.add_argument("--model", default="minilm")
    e.add_argument("--to", required=True)
    e.add_argument("--part-mb", type=int, default=45)
    t = sub.add_parser("train")
    t.add_argument("--from", dest="source", required=True)
    t.add_argument("--pipeline", required=True)
    t.add_argument("--to", required=True)
    t.add_argument("--init", default="", help="a folder of trained weights*.npz to start from")
    t.add_argument("--part-mb", type=int, default=15)
    a = sub.add_parser("assemble")
    a.add_argument("--model", default="minilm")
    a.add_argument("--pipeline", required=True)
    a.add_argument("--weights", required=True)
    a.add_argument("--then", default="")
    a.add_argument("--to", required=True)
    args = p.parse_args(argv)
    {"export": export, "train": train, "assemble": assemble}[args.command](args)


if __name__ == "__main__":
    main()
