"""Target profiles: TOML data files with peak FLOP/s per dtype, bandwidth, caches, overheads,
an energy table and the fitted per-kernel-kind corrections."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from winnow.errors import WinnowError

BUILTIN_DIR = Path(__file__).parent / "targets"
REQUIRED = {
    "name": str,
    "compute.cores": int,
    "compute.fp32_gflops_per_core": float,
    "compute.fp16_gflops_per_core": float,
    "compute.int8_gops_per_core": float,
    "memory.dram_gbps": float,
    "memory.cache_gbps": float,
    "memory.llc_kib": float,
    "overhead.dispatch_us": float,
    "overhead.run_us": float,
    **{f"energy.{k}": float for k in ("int8_add", "int8_mult", "int32_add", "int32_mult",
                                      "fp16_add", "fp16_mult", "fp32_add", "fp32_mult",
                                      "cache_pj_per_byte", "dram_pj_per_byte")},
}


class TargetError(WinnowError):
    """A target name is unknown or its profile file is incomplete."""


def user_dir() -> Path:
    """Where `winnow cost calibrate` writes the `host` profile by default."""
    return Path.home() / ".cache" / "winnow" / "targets"


@dataclass(frozen=True)
class Correction:
    """A fitted correction of one kernel kind, in microseconds:

        t = overhead_us + min(parallel_overhead_us + work, threads x work)
        work = compute_scale x compute_us + memory_scale x memory_us

    compute_us = FLOPs / peak and memory_us = bytes / bandwidth are the two sides of the roofline,
    priced apart (a depthwise int8 conv is memory-bound on the roofline but its time follows its
    FLOPs; a short-K GEMM pays for its bytes on top of its FLOPs). `overhead_us` is what any
    kernel of the kind costs beyond its launch; `parallel_overhead_us` what waking the other
    threads costs: a kernel too small to pay for it runs on one thread (ORT's thread pool splits
    work only when its cost estimate is large), `threads` times slower, so at one thread it never
    applies. A profile without the split scales (fitted before them) has
    t = overhead_us + scale * max(compute_us, memory_us). All terms are >= 0, so more work never
    predicts less time.
    """

    overhead_us: float = 0.0
    scale: float = 1.0
    compute_scale: float | None = None
    memory_scale: float | None = None
    parallel_overhead_us: float = 0.0

    def apply(self, compute_us: float, memory_us: float, threads: int = 1) -> float:
        """The corrected time (us) of a kernel with these compute and memory roofline times
        (both for `threads` threads)."""
        if compute_us <= 0.0 and memory_us <= 0.0:
            return 0.0
        if self.compute_scale is None or self.memory_scale is None:
            return self.overhead_us + self.scale * max(compute_us, memory_us)
        work = self.compute_scale * compute_us + self.memory_scale * memory_us
        return self.overhead_us + min(self.parallel_overhead_us + work, max(threads, 1) * work)


@dataclass(frozen=True)
class Target:
    """One hardware profile, as read from its TOML file."""

    name: str
    description: str
    cores: int
    peak_per_core: dict[str, float]  # FLOP/s (ops/s for int8) per core, by dtype
    dram_bps: float
    cache_bps: float
    llc_bytes: float
    dispatch_s: float
    run_s: float
    energy: dict[str, float]
    corrections: dict[str, Correction] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    path: str = ""

    def peak(self, dtype: str, threads: int | None = None) -> float:
        """Peak FLOP/s of `threads` cores (default: the profile's) for a compute dtype (int4 and
        L-Mul's integer adds at the int8 rate, fp64 at half fp32)."""
        key = {"int4": "int8", "lmul": "int8", "int": "fp32", "fp64": "fp32"}.get(dtype, dtype)
        rate = self.peak_per_core.get(key, self.peak_per_core["fp32"])
        return rate * (threads or self.cores) * (0.5 if dtype == "fp64" else 1.0)

    def correction(self, kind: str, dtype: str = "fp32") -> Correction:
        """The fitted correction of a kernel kind and dtype (`matmul-int8`), else of the kind,
        else the `default` one, else the identity."""
        return (self.corrections.get(f"{kind}-{dtype}") or self.corrections.get(kind)
                or self.corrections.get("default") or Correction())


def known_targets() -> dict[str, Path]:
    """Every target by name: the shipped profiles, then those in the user folder (host)."""
    found = {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}
    if user_dir().is_dir():
        found.update({p.stem: p for p in sorted(user_dir().glob("*.toml"))})
    return found


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check(data: dict[str, Any], path: Path) -> None:
    for key, kind in REQUIRED.items():
        value = _get(data, key)
        if value is None:
            raise TargetError(f"target file '{path}' is missing the field '{key}'; add it "
                              "(see the shipped profiles in winnow/cost_model/targets/).")
        ok = isinstance(value, str) if kind is str else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0)
        if not ok or (kind is not str and key.startswith(("compute.", "memory.")) and value <= 0):
            raise TargetError(f"target file '{path}' has a bad value for '{key}' ({value!r}); "
                              f"it must be a positive {'string' if kind is str else 'number'}.")


def _correction(table: dict[str, Any]) -> Correction:
    """A Correction from its TOML table (negative values clipped: time never falls with work)."""
    split = [table.get(k) for k in ("compute_scale", "memory_scale")]
    compute, memory = (None, None) if None in split else (max(0.0, float(split[0])),
                                                          max(0.0, float(split[1])))
    return Correction(max(0.0, float(table.get("overhead_us", 0.0))),
                      max(1e-3, float(table.get("scale", 1.0))), compute, memory,
                      max(0.0, float(table.get("parallel_overhead_us", 0.0))))


def parse_target(data: dict[str, Any], path: Path) -> Target:
    """A Target from a parsed TOML document (TargetError names a missing or bad field)."""
    _check(data, path)
    c, m, o = data["compute"], data["memory"], data["overhead"]
    corrections = {kind: _correction(v) for kind, v in (data.get("correction") or {}).items()}
    return Target(
        name=data["name"], description=data.get("description", ""), cores=int(c["cores"]),
        peak_per_core={"fp32": c["fp32_gflops_per_core"] * 1e9,
                       "fp16": c["fp16_gflops_per_core"] * 1e9,
                       "int8": c["int8_gops_per_core"] * 1e9},
        dram_bps=m["dram_gbps"] * 1e9, cache_bps=m["cache_gbps"] * 1e9,
        llc_bytes=m["llc_kib"] * 1024.0, dispatch_s=o["dispatch_us"] * 1e-6,
        run_s=o["run_us"] * 1e-6, energy={k: float(v) for k, v in data["energy"].items()},
        corrections=corrections, sources=tuple(data.get("sources", ())), path=str(path))


def load_target(target: str | Path | Target) -> Target:
    """A target by name (`x86-avx2`, `host`, ...) or by the path of a .toml profile."""
    if isinstance(target, Target):
        return target
    text = str(target)
    path = Path(text)
    if not text.endswith(".toml"):
        known = known_targets()
        if text not in known:
            names = sorted(known)
            hint = "" if "host" in known else " (run `winnow cost calibrate` to make 'host')"
            raise TargetError(f"unknown target '{text}'; known targets: {', '.join(names)}{hint}.")
        path = known[text]
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TargetError(f"target file '{path}' does not exist.") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TargetError(f"target file '{path}' is not readable TOML ({exc}).") from None
    return parse_target(data, path)
