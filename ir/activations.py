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
