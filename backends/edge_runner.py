#!/usr/bin/env python3
"""Check a winnow edge bundle on the device: verify its files, run the model on samples.npz and
compare with expected.npz (the host's outputs). Needs numpy and the bundle's runtime only
(onnxruntime, or the TVM runtime), nothing of winnow.

    python3 run.py                                  # check; exit 0 when every output matches
    python3 run.py --inputs in.npz --out out.npz    # run on your own inputs
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def verify_files(manifest):
    """Raise SystemExit naming a file that is missing or does not match its checksum."""
    for name, entry in manifest["files"].items():
        path = HERE / name
        if not path.is_file():
            raise SystemExit(f"error: bundle file '{name}' is missing.")
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise SystemExit(f"error: bundle file '{name}' does not match its checksum.")


def run_onnxruntime(manifest, feeds):
    """Outputs of the .ort model under ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(HERE / manifest["model"]),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_tvm(manifest, feeds):
    """Outputs of the TVM library under the Relax VM."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(tvm.runtime.load_module(str(HERE / manifest["model"])), tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[spec["name"]]))
            for spec in manifest["inputs"]]
    result = vm["main"](*args)
    items = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
    return [item.numpy() for item in items]


def load_npz(path):
    """The arrays of an .npz file by name."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def check(manifest, outputs):
    """Print each output's error against expected.npz; True when all are within tolerance."""
    expected = load_npz(HERE / manifest["expected"])
    tolerance = manifest["tolerance"]["abs"]
    passed = True
    for spec, got in zip(manifest["outputs"], outputs):
        want = expected[spec["name"]]
        if got.shape != want.shape:
            print(f"{spec['name']}: shape {list(got.shape)}, expected {list(want.shape)}  FAIL")
            passed = False
            continue
        scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
        error = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
        ok = error <= tolerance * scale
        passed &= ok
        print(f"{spec['name']}: max abs error {error:.3g} (limit {tolerance * scale:.3g})  "
              f"{'ok' if ok else 'FAIL'}")
    return passed


def main(argv=None):
    """Verify the bundle, run it, and check or save the outputs."""
    parser = argparse.ArgumentParser(description="Check or run this winnow edge bundle.")
    parser.add_argument("--inputs", help=".npz with one array per input (default: samples.npz)")
    parser.add_argument("--out", help="write the outputs to this .npz")
    args = parser.parse_args(argv)
    manifest = json.loads((HERE / "manifest.json").read_text())
    verify_files(manifest)
    feeds = load_npz(args.inputs or HERE / manifest["samples"])
    runner = {"ort": run_onnxruntime, "tvm": run_tvm}[manifest["backend"]]
    outputs = [np.asarray(o) for o in runner(manifest, feeds)]
    if args.out:
        np.savez(args.out, **{spec["name"]: o for spec, o in zip(manifest["outputs"], outputs)})
        print(f"wrote {args.out}")
    if args.inputs:
        return 0
    passed = check(manifest, outputs)
    print(f"bundle check on {manifest['target']} ({manifest['backend']}): "
          f"{'passed' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
