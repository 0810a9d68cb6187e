"""Residual-stream activations as vectors: tokens of [batch, seq, dim] tensors (padding dropped)
or channel vectors per spatial position of [batch, channels, H, W] tensors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from winnow.ir.execute import run

MASK_NAMES = ("attention_mask",)


def padding_mask(feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The [batch, seq] attention mask among the feeds (1 = real token), if there is one."""
    for name, value in feeds.items():
        if any(m in name for m in MASK_NAMES) and value.ndim == 2:
            return value.astype(bool)
    return None


def as_vectors(array: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Flatten an activation into row vectors in float64 (channel vectors for 4-D NCHW)."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 4:
        return a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])
    if a.ndim == 3:
        if mask is not None and mask.shape == a.shape[:2]:
            return a[mask]
        return a.reshape(-1, a.shape[-1])
    if a.ndim == 2:
        return a
    return a.reshape(a.shape[0], -1)


def iter_pairs(model, batches: Sequence[Mapping[str, np.ndarray]], pairs: Sequence[tuple[str, str]]
               ) -> Iterator[dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]]:
    """Per batch: for each (entry, exit) value-name pair, its (X, Y) vectors."""
    names = sorted({n for pair in pairs for n in pair})
    for feeds in batches:
        values = run(model, feeds, capture=names)
        mask = padding_mask(feeds)
        yield {(e, x): (as_vectors(values[e], mask), as_vectors(values[x], mask)) for e, x in pairs}


def collect_pairs(model, batches: Sequence[Mapping[str, np.ndarray]], pairs: Sequence[tuple[str, str]]
                  ) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """For each (entry, exit) pair, the (X, Y) vectors stacked over all batches."""
    chunks = list(iter_pairs(model, batches, pairs))
    return {p: (np.concatenate([c[p][0] for c in chunks]), np.concatenate([c[p][1] for c in chunks]))
            for p in pairs}


def rowwise_cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows."""
    num = np.einsum("ij,ij->i", x, y)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return num / np.maximum(den, 1e-12)


NEAR_ZERO = 1e-6  # a vector with a smaller L2 norm counts as zero (cosines of it mean nothing)
MOSTLY = 0.5  # a side is degenerate when more than this fraction of its vectors is (near) zero
ALIGNED = 1e-7  # |cos| within this of 1 between every vector and the first: one direction


def one_direction(a: np.ndarray) -> bool:
    """Whether every non-zero row of `a` lies on one line (constant vectors, or a model whose
    channels are all copies of one another): cosines against such a stream are +-1 by construction."""
    norms = np.linalg.norm(a, axis=1)
    rows = a[norms >= NEAR_ZERO] / norms[norms >= NEAR_ZERO, None]
    if len(rows) < 2 or rows.shape[1] < 2:
        return False
    return bool(np.all(np.abs(rows @ rows[0]) >= 1.0 - ALIGNED))


class Degeneracy:
    """Watches the (X, Y) vectors of one region over all batches and says why cosines of them
    would mean nothing: NaN/Inf, (near) zero vectors, or every vector on one line."""

    def __init__(self) -> None:
        self.rows = 0
        self.nonfinite = [False, False]
        self.zeros = [0, 0]

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Fold in one batch's vectors (rows of x and y)."""
        self.rows += len(x)
        for side, a in enumerate((x, y)):
            finite = bool(np.isfinite(a).all())
            self.nonfinite[side] |= not finite
            if finite and a.size:
                self.zeros[side] += int((np.linalg.norm(a, axis=1) < NEAR_ZERO).sum())

    def reason(self, sample: tuple[np.ndarray, np.ndarray] | None = None,
               names: tuple[str, str] = ("input", "output")) -> str | None:
        """Why the region is not measurable on this data, or None when it is; `sample` (rows of
        X and Y, e.g. a subsample) is checked for vectors that all lie on one line."""
        if self.rows == 0:
            return "no calibration vectors reached it"
        for side, name in enumerate(names):
            if self.nonfinite[side]:
                return f"its {name} holds NaN or Inf on the calibration data"
            if self.zeros[side] > MOSTLY * self.rows:
                share = self.zeros[side] / self.rows
                return (f"its {name} is (near) zero (norm < {NEAR_ZERO:g}) for {share:.0%} of "
                        "the calibration vectors")
            if sample is not None and one_direction(sample[side]):
                return (f"its {name} points the same way at every position of the calibration "
                        "data (constant, or all channels alike), so cosines of it are +-1 "
                        "whatever the region does")
        return None


SAMPLE_ROWS = 512  # rows per batch kept for the one-direction test


def degenerate_regions(model, regions: Sequence, batches: Sequence[Mapping[str, np.ndarray]]
                       ) -> dict[str, str]:
    """Regions whose input (its shortcut) or output stream is degenerate on `batches` (NaN/Inf,
    (near) zero, every vector on one line), each with the reason; scores of them mean nothing."""
    pairs = {r.name: (r.skip.name, r.exit.name) for r in regions if r.skip is not None}
    live = sorted(set(pairs.values()))
    if not live:
        return {}
    watch = {pair: Degeneracy() for pair in live}
    kept: dict[tuple, list] = {pair: [] for pair in live}
    for chunk in iter_pairs(model, batches, live):
        for pair in live:
            x, y = chunk[pair]
            if x.shape != y.shape:
                continue
            watch[pair].update(x, y)
            kept[pair].append((x[:SAMPLE_ROWS], y[:SAMPLE_ROWS]))
    reasons = {}
    for pair in live:
        if not kept[pair]:
            continue
        sample = (np.concatenate([x for x, _ in kept[pair]]),
                  np.concatenate([y for _, y in kept[pair]]))
        reasons[pair] = watch[pair].reason(sample if np.isfinite(sample[0]).all()
                                           and np.isfinite(sample[1]).all() else None)
    return {name: reasons[pair] for name, pair in pairs.items() if reasons.get(pair)}
