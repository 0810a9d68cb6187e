"""Real text shipped with Python: sentences and raw bytes from `pydoc_data.topics`, and the
docstrings of the standard library as more unlabelled text."""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
import sysconfig
from collections.abc import Collection
from pathlib import Path

SEED = 1234
_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_BAD = re.compile(r"::=|>>>|\*\*\*|[{}\[\]\\|]|\.\.\.|\s{2,}")
_NOT_DOCUMENTATION = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3"})
MIN_DOCSTRING = 80  # characters; shorter docstrings are mostly one-line summaries


def topic_texts() -> dict[str, str]:
    """The pydoc topic texts (Python's own reference manual), by topic name, sorted."""
    from pydoc_data import topics

    return {name: topics.topics[name] for name in sorted(topics.topics)}


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a topic: no headings, no indented code or grammar blocks."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(_HEADING_RULE.match(line.strip()) for line in lines):
            continue
        if any(line.startswith((" ", "\t")) for line in lines):
            continue
        out.append(" ".join(line.strip() for line in lines))
    return out


def _clean(sentence: str) -> str | None:
    """A tidy sentence of plain prose, or None when it is code, a fragment or a list item."""
    sentence = sentence.replace('"', "").replace("*", "").strip()
    if not 40 <= len(sentence) <= 220 or not sentence.endswith("."):
        return None
    if _BAD.search(sentence) or not sentence[0].isupper():
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in sentence)
    return sentence if letters >= 0.9 * len(sentence) else None


@functools.cache
def labelled_sentences() -> tuple[tuple[str, str], ...]:
    """(sentence, topic) pairs: cleaned, deduplicated, shuffled with a fixed seed."""
    seen: set[str] = set()
    pairs = []
    for topic, text in topic_texts().items():
        for paragraph in _paragraphs(text):
            for raw in _SENTENCE_END.split(paragraph):
                sentence = _clean(raw)
                if sentence and sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    pairs.append((sentence, topic))
    random.Random(SEED).shuffle(pairs)
    return tuple(pairs)


def sentences() -> list[str]:
    """All cleaned sentences in their fixed shuffled order."""
    return [s for s, _ in labelled_sentences()]


def sentence_split(split: str, calibration: int = 256, heldout: int = 256,
                   rest_to_calibration: bool = False) -> list[tuple[str, str]]:
    """Disjoint (sentence, topic) splits: the first `calibration`, then the next `heldout`;
    with `rest_to_calibration` every sentence after the held-out ones joins calibration too."""
    pairs = list(labelled_sentences())
    if split == "calibration":
        extra = pairs[calibration + heldout:] if rest_to_calibration else []
        return pairs[:calibration] + extra
    if split == "heldout":
        return pairs[calibration:calibration + heldout]
    raise ValueError(f"unknown split '{split}'; use 'calibration' or 'heldout'.")


def unlabelled_chunks(exclude: Collection[str], max_chars: int = 250) -> list[str]:
    """Windows of about `max_chars` over every unlabelled text (prose and code, whitespace
    collapsed; each starts half a window after the last) with every sentence in `exclude`
    (held-out sentences) cut out: no window spans a cut, and a window still holding a piece of
    one (a copy spelled differently) is left out. Unlabelled text for distillation."""
    sentences = sorted({_plain(s) for s in exclude}, key=len, reverse=True)
    probes = {p for sentence in sentences for p in _probes(sentence)}
    text = _plain(" ".join(unlabelled_texts()))
    for sentence in sentences:
        text = text.replace(sentence, "\0")
    probes = {p for p in probes if p in text}  # the few left after the cuts: far fewer checks
    chunks = []
    for segment in text.split("\0"):
        chunks += [c for c in _windows(segment.split(), max_chars)
                   if not any(p in c for p in probes)]
    return chunks


def unlabelled_sentences(exclude: Collection[str]) -> list[str]:
    """Prose sentences of the standard library's docstrings, cleaned as the labelled ones are
    (so shaped like the held-out sentences), deduplicated, in docstring order; none is a
    sentence in `exclude` or holds a piece of one. Unlabelled text for distillation."""
    held = {_plain(s) for s in exclude}
    seen, found = set(), []
    for doc in stdlib_docstrings():
        for paragraph in _paragraphs(doc):
            for raw in _SENTENCE_END.split(paragraph):
                sentence = _clean(raw)
                if sentence and sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    found.append(sentence)
    text = "\n".join(_plain(s) for s in found)
    probes = {p for sentence in held for p in _probes(sentence) if p in text}
    return [s for s in found if _plain(s) not in held
            and not any(p in _plain(s) for p in probes)]


def unlabelled_texts() -> list[str]:
    """The pydoc topic texts, then the standard library's docstrings (unlabelled text)."""
    return [*topic_texts().values(), *stdlib_docstrings()]


@functools.cache
def stdlib_docstrings() -> tuple[str, ...]:
    """Module, class and function docstrings of at least MIN_DOCSTRING characters from the
    standard library's .py files, in sorted path order (tests, idlelib, lib2to3 left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in sorted(root.rglob("*.py"))
             if _NOT_DOCUMENTATION.isdisjoint(p.relative_to(root).parts[:-1])]
    return tuple(doc for path in paths for doc in _docstrings(path))


def _docstrings(path: Path) -> list[str]:
    """The long docstrings of one source file (module first, then its classes and functions
    breadth first); none when the file does not parse."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))
    return [d for d in docs if d and len(d) >= MIN_DOCSTRING]


def _windows(words: list[str], max_chars: int) -> list[str]:
    """Runs of whole words of at most `max_chars` (a longer word stands alone), each starting
    half a run after the last."""
    out, start = [], 0
    while start < len(words):
        end, size = start, 0
        while end < len(words) and size + len(words[end]) + 1 <= max_chars:
            size += len(words[end]) + 1
            end += 1
        end = max(end, start + 1)
        out.append(" ".join(words[start:end]))
        if end == len(words):
            break
        start += max(1, (end - start) // 2)
    return out


def _plain(text: str) -> str:
    """Text without the quotes and asterisks `_clean` drops, whitespace collapsed."""
    return " ".join(text.replace('"', "").replace("*", "").split())


def _probes(sentence: str, width: int = 24) -> list[str]:
    """Pieces of a sentence at its start, middle and end (any one found means it is there)."""
    if len(sentence) <= width:
        return [sentence]
    mid = (len(sentence) - width) // 2
    return [sentence[:width], sentence[mid:mid + width], sentence[-width:]]


@functools.cache
def corpus_bytes() -> bytes:
    """All topic texts joined, as UTF-8 bytes (the byte-level LM corpus)."""
    return "\n\n".join(topic_texts().values()).encode("utf-8")


def corpus_digest() -> str:
    """A short hash of the corpus text (it changes between Python releases)."""
    return hashlib.sha256(corpus_bytes()).hexdigest()[:16]


def byte_split(split: str, heldout_fraction: float = 0.05) -> bytes:
    """Train / heldout / calibration byte ranges of the corpus, disjoint and contiguous."""
    data = corpus_bytes()
    n_held = int(len(data) * heldout_fraction)
    cut = len(data) - 2 * n_held
    parts = {"train": data[:cut], "calibration": data[cut:cut + n_held],
             "heldout": data[cut + n_held:]}
    if split not in parts:
        raise ValueError(f"unknown split '{split}'; use 'train', 'calibration' or 'heldout'.")
    return parts[split]
