"""The training cache: weights of models trained here, keyed by a hash of their code and settings."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from winnow.errors import OutputError
from winnow.progress import step

TRAIN_THREADS = 1


def cache_root() -> Path:
    """The zoo cache folder: $WINNOW_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, then winnow/zoo."""
    override = os.environ.get("WINNOW_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "winnow" / "zoo"


def source_text(objects: Iterable[Any]) -> list[str]:
    """The source text of each function, class or module (what the cache key hashes)."""
    return [inspect.getsource(obj) for obj in objects]


def code_hash(sources: Iterable[str], hparams: Mapping[str, Any]) -> str:
    """A hex key over source texts and hyper-parameters: any change to either changes it."""
    digest = hashlib.sha256()
    for text in sources:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    digest.update(json.dumps(dict(hparams), sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()[:20]


def weights_path(name: str, key: str) -> Path:
    """Where the weights of model `name` trained under `key` live."""
    return cache_root() / f"{name}-{key}.safetensors"


def is_cached(name: str, key: str) -> bool:
    """Whether weights for `name` under `key` are already in the cache."""
    return weights_path(name, key).is_file()


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """Hold the cache folder's lock so two processes never train into it at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".train.lock", "w")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise OutputError(f"cannot write the zoo cache folder '{folder}' ({exc.strerror}); set "
                          "WINNOW_CACHE_DIR to a writable folder.") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def deterministic(seed: int, threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Seed every generator, fix the thread count and ask torch for deterministic kernels."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def read_info(name: str, key: str) -> dict[str, str]:
    """The metadata saved with cached weights (training seconds, final metric, ...)."""
    from safetensors import safe_open

    with safe_open(str(weights_path(name, key)), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _train_and_save(name: str, path: Path, module: Any,
                    train: Callable[[Any], Mapping[str, Any]]) -> None:
    from safetensors.torch import save_file

    start = time.perf_counter()
    with step(f"training {name} (once; cached in {path.parent})", after=0.0):
        info = dict(train(module))
    info["train_seconds"] = round(time.perf_counter() - start, 1)
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(state, tmp, metadata={k: str(v) for k, v in info.items()})
    os.replace(tmp, path)


def load_or_train(name: str, key: str, module: Any,
                  train: Callable[[Any], Mapping[str, Any]]) -> dict[str, str]:
    """Fill `module` from the cache, training it (then saving atomically) on a miss."""
    from safetensors.torch import load_file

    path = weights_path(name, key)
    if not path.is_file():
        with _lock(path.parent):
            if not path.is_file():
                _train_and_save(name, path, module, train)
    module.load_state_dict(load_file(str(path)), strict=True)
    module.eval()
    return read_info(name, key)
