"""The longer fuzz run: every target of `winnow.tests.fuzz_targets` for N inputs each (seeded),
printing how many inputs each ran, how many winnow accepted or refused with one sentence, and
every distinct failure with the input that caused it.

    python bench/fuzz.py --examples 2000 --seed 1
    python bench/fuzz.py --targets onnx,yaml --examples 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

from winnow.tests import fuzz_targets as ft

TARGETS = ("onnx", "hf", "pipeline", "yaml", "input-shapes")


def _checker(name: str, work, hf_seed):
    """(strategy, check(tally, sample)) of one target."""
    return {
        "onnx": (ft.onnx_files(), lambda t, s: ft.check_onnx_file(t, work, s)),
        "hf": (ft.HF_SAMPLES, lambda t, s: ft.check_hf_folder(t, work, hf_seed, s)),
        "pipeline": (ft.PIPELINE_TEXT, ft.check_pipeline_text),
        "yaml": (ft.YAML_TEXT, lambda t, s: ft.check_pipeline_yaml(t, work, s)),
        "input-shapes": (ft.SHAPES_TEXT, ft.check_input_shapes),
    }[name]


def run_target(name: str, examples: int, rng_seed: int, work, hf_seed,
               save: Path | None = None) -> ft.Tally:
    """Run one target for `examples` inputs; failures are recorded, not raised (no shrinking),
    and with `save` each failing input is written there (`NAME-N.repr`) to reproduce it."""
    tally = ft.Tally(name)
    strategy, check = _checker(name, work, hf_seed)
    seen: set[str] = set()

    @seed(rng_seed)
    @settings(max_examples=examples, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(sample):
        try:
            check(tally, sample)
        except ft.FuzzFailure as exc:
            key = str(exc)[:120]
            if key not in seen:
                seen.add(key)
                tally.failures.append(f"{exc} <- input {sample!r:.300}")
                if save is not None:
                    save.mkdir(parents=True, exist_ok=True)
                    (save / f"{name}-{len(seen)}.repr").write_text(repr(sample) + "\n")

    run()
    return tally


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the targets, print the table; exit 1 when anything failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--save", type=Path, default=None, metavar="DIR",
                        help="write each failing input to DIR (python repr) to reproduce it")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset of {', '.join(TARGETS)}")
    args = parser.parse_args(argv)
    names = [n for n in args.targets.split(",") if n]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    ft.quiet_environment()
    rows = []
    with ft.work_folder() as work:
        hf_seed = None
        if "hf" in names:
            if ft.hf_available():
                hf_seed = ft.build_hf_folder(work / "hf-seed")
            else:
                print("skipping hf: it needs winnow[hf]", file=sys.stderr)
                names.remove("hf")
        for name in names:
            start = time.perf_counter()
            tally = run_target(name, args.examples, args.seed, work, hf_seed, args.save)
            rows.append((tally, time.perf_counter() - start))
            print(f"{name}: {tally.inputs} inputs, {len(tally.failures)} failure(s)",
                  file=sys.stderr)
    print(f"fuzz run: `python bench/fuzz.py --examples {args.examples} --seed {args.seed} "
          f"--targets {','.join(names)}`\n")
    print("| target | inputs | accepted | refused (one sentence) | failures | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for tally, seconds in rows:
        print(f"| {tally.name} | {tally.inputs} | {tally.accepted} | {tally.refused} | "
              f"{len(tally.failures)} | {seconds:.0f} |")
    failures = [(t.name, f) for t, _ in rows for f in t.failures]
    for name, failure in failures:
        print(f"\n- {name}: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
