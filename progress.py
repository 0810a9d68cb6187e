"""Progress for long steps: a spinner line on stderr for steps, tqdm bars for loops."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) all progress output."""
    global _QUIET
    _QUIET = quiet


@contextlib.contextmanager
def step(message: str, after: float = 1.0) -> Iterator[None]:
    """Show `message ...` with elapsed seconds on stderr if the step lasts longer than `after`."""
    if _QUIET or not sys.stderr:
        yield
        return
    start = time.perf_counter()
    done = threading.Event()
    shown = threading.Event()

    live = sys.stderr.isatty()

    def ticker() -> None:
        if done.wait(after):
            return
        shown.set()
        if not live:
            sys.stderr.write(f"{message} ...\n")
            sys.stderr.flush()
            return
        while not done.wait(0.5):
            sys.stderr.write(f"\r{message} ... {time.perf_counter() - start:5.1f}s")
            sys.stderr.flush()

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        done.set()
        thread.join()
        if shown.is_set():
            status = "done" if ok else "failed"
            prefix = "\r" if live else ""
            sys.stderr.write(f"{prefix}{message} ... {status} ({time.perf_counter() - start:.1f}s)\n")
            sys.stderr.flush()


def bar(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """A tqdm progress bar over `items` on stderr (silent when quiet)."""
    return tqdm(items, desc=desc, total=total, disable=_QUIET, file=sys.stderr, leave=False)


def counter(desc: str, total: int, initial: int = 0) -> tqdm:
    """A tqdm bar advanced by hand (`update`, `set_postfix_str`), silent when quiet."""
    return tqdm(desc=desc, total=total, initial=initial, disable=_QUIET, file=sys.stderr,
                leave=False)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence other libraries' chatter (stdout prints, INFO/WARNING logs) inside the block."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
