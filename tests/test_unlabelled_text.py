"""The unlabelled text minilm distils on: pydoc topics plus the standard library's docstrings,
with every held-out sentence cut out."""

from __future__ import annotations

import ast
import inspect
import json
import os
import sysconfig
import textwrap
from pathlib import Path

import pytest

from winnow.models_zoo import data

SKIPPED = {"test", "tests", "idlelib", "site-packages", "lib2to3"}


@pytest.fixture(scope="module")
def heldout() -> list[str]:
    return [s for s, _ in data.sentence_split("heldout")]


@pytest.fixture(scope="module")
def chunks(heldout: list[str]) -> list[str]:
    return data.unlabelled_chunks(heldout)


def _walked_docstrings() -> list[str]:
    """An oracle: os.walk that never enters a skipped folder, files in path-part order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    docs = []
    for path in sorted(files, key=lambda p: p.relative_to(root).parts):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    docs.append(doc)
    return docs


def test_stdlib_docstrings_are_every_long_docstring_outside_tests():
    docs = data.stdlib_docstrings()
    assert list(docs) == _walked_docstrings()
    size = sum(len(d) for d in docs)
    assert size > 2 * len(data.corpus_bytes())  # several times the pydoc topics
    assert all(len(d) >= 80 for d in docs)


def test_no_held_out_sentence_nor_its_probes_in_any_train_chunk(heldout, chunks):
    text = "\n".join(chunks)
    docs = data._plain(" ".join(data.stdlib_docstrings()))
    for sentence in heldout:
        plain = data._plain(sentence)
        assert plain not in text, sentence
        assert not any(p in text for p in data._probes(plain)), sentence
        half = len(plain) // 2  # independent of the probes: neither half (30+ characters)
        pieces = [plain[:half], plain[half:]] if half >= 30 else [plain]
        assert not any(piece in text for piece in pieces), sentence
    # the docstrings do repeat held-out text: the cuts above have something to cut
    assert sum(any(p in docs for p in data._probes(data._plain(s))) for s in heldout) >= 3


def test_sentence_length_windows_hold_no_held_out_sentence_either(heldout):
    short = data.unlabelled_chunks(heldout, 120)
    assert all(len(c) <= 120 or " " not in c for c in short)  # a longer word stands alone
    text = "\n".join(short)
    for sentence in heldout:
        plain = data._plain(sentence)
        assert plain not in text, sentence
        assert not any(p in text for p in data._probes(plain)), sentence


def test_docstring_sentences_are_clean_prose_and_hold_no_held_out_sentence(heldout):
    found = data.unlabelled_sentences(heldout)
    assert len(found) > 5 * len(data.sentence_split("calibration", rest_to_calibration=True))
    assert all(data._clean(s) == s for s in found)  # shaped as the held-out sentences are
    assert len({s.lower() for s in found}) == len(found)
    text = "\n".join(data._plain(s) for s in found)
    for sentence in heldout:
        plain = data._plain(sentence)
        assert plain not in text, sentence
        assert not any(p in text for p in data._probes(plain)), sentence
    # the docstrings do hold held-out text: without the filter some would come through
    everything = data.unlabelled_sentences([])
    assert sum(any(p in "\n".join(everything) for p in data._probes(data._plain(s)))
               for s in heldout) >= 1


@pytest.mark.parametrize("obj", [json, textwrap.TextWrapper, inspect.Signature])
def test_stdlib_docstring_text_is_in_the_train_chunks(chunks, obj):
    phrase = " ".join(inspect.cleandoc(obj.__doc__).split())[:60]
    assert phrase not in data._plain(" ".join(data.topic_texts().values()))
    assert any(phrase in c for c in chunks)


def test_train_chunks_are_deterministic_and_start_with_the_pydoc_windows(heldout, chunks):
    data.stdlib_docstrings.cache_clear()
    assert data.unlabelled_chunks(heldout) == chunks
    topics_only = data._windows(data._plain(" ".join(data.topic_texts().values())).split(), 250)
    assert chunks[0] == topics_only[0]  # distill's sample cap keeps taking the pydoc windows
    assert len(chunks) > 3 * len(topics_only)
