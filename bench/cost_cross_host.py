"""The cost model's cross-host check: a profile fitted on one host with only its peak and bandwidth
numbers (the [compute] and [memory] tables) taken from another host's profile; predict with it
there (`bench/cost_accuracy.py --target SWAPPED.toml`) to see how much of the fit travels.

    python bench/cost_cross_host.py --fitted here.toml --peaks there.toml --out swapped.toml
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from winnow.cost_model.calibrate import to_toml

SWAPPED = ("compute", "memory")


def swap_peaks(fitted: dict, peaks: dict) -> dict:
    """`fitted` with the peak/bandwidth tables of `peaks` (corrections, overheads, energy kept)."""
    out = {k: v for k, v in fitted.items() if k not in SWAPPED}
    out.update({k: dict(peaks[k]) for k in SWAPPED})
    out["description"] = (f"{fitted.get('description', 'fitted profile')}; peaks and bandwidth "
                          f"from: {peaks.get('description', 'another host')}")
    return out


def main() -> int:
    """Command line: write the swapped profile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fitted", required=True, help="profile fitted on the first host")
    parser.add_argument("--peaks", required=True, help="profile of the host to predict for")
    parser.add_argument("--out", required=True, help="where to write the swapped profile")
    args = parser.parse_args()
    fitted = tomllib.loads(Path(args.fitted).read_text())
    peaks = tomllib.loads(Path(args.peaks).read_text())
    Path(args.out).write_text(to_toml(swap_peaks(fitted, peaks)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
