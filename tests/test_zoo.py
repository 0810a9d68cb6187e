"""Fast zoo tests: names and errors, data splits, the training cache, onnx:* models, `zoo` CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import winnow
from winnow import models_zoo
from winnow.models_zoo.minilm import TRAIN_WINDOWS
from winnow.errors import ExecutionError, OutputError, SourceError
from winnow.measure.fidelity import evaluate_zoo
from winnow.frontend import EXAMPLE_FEEDS_KEY
from winnow.models_zoo import cache, data, digits, tiny_gpt
from winnow.models_zoo.cli import zoo

CURATED = ["minilm", "digits-cnn", "digits-vit", "tiny-gpt", "ppocr-det", "ppocr-rec"]


def test_names_cover_the_curated_models_and_onnx_tests():
    assert models_zoo.names() == CURATED
    onnx_names = models_zoo.onnx_names()
    assert {"light_resnet50", "test_resnet50", "test_AvgPool1d"} <= set(onnx_names)
    assert models_zoo.get("zoo:minilm") is models_zoo.get("minilm")
    assert models_zoo.get("onnx:light_squeezenet").kind == "onnx-test"


@pytest.mark.parametrize("name", ["zoo:no-such-model", "no-such-model"])
def test_unknown_zoo_name_lists_the_available_names(name):
    with pytest.raises(SourceError) as info:
        models_zoo.get(name)
    message = str(info.value)
    assert "no-such-model" in message
    for known in CURATED:
        assert known in message


def test_unknown_names_through_winnow_load():
    with pytest.raises(SourceError, match="digits-cnn"):
        winnow.load("zoo:nope")
    with pytest.raises(SourceError, match="light_resnet50"):
        winnow.load("onnx:nope")
    with pytest.raises(SourceError, match="zoo:NAME"):
        models_zoo.get("hub:minilm")


def test_calibration_can_take_every_sentence_not_held_out():
    held = {s for s, _ in data.sentence_split("heldout")}
    calib = data.sentence_split("calibration", rest_to_calibration=True)
    assert len(calib) == len(data.labelled_sentences()) - len(held)
    assert not held & {s for s, _ in calib}


def test_sentence_splits_are_real_disjoint_and_deterministic():
    calib = data.sentence_split("calibration")
    held = data.sentence_split("heldout")
    assert len(calib) == len(held) == 256
    assert not {s for s, _ in calib} & {s for s, _ in held}
    assert data.sentence_split("heldout") == held
    for sentence, topic in held:
        assert sentence[0].isupper() and sentence.endswith(".") and topic
    with pytest.raises(ValueError):
        data.sentence_split("train")


def test_unlabelled_text_holds_no_piece_of_a_held_out_sentence():
    heldout = [s for s, _ in data.sentence_split("heldout")]
    chunks = data.unlabelled_chunks(heldout)
    text = "\n".join(chunks)
    assert len(text) > 5 * sum(len(s) for s, _ in data.sentence_split("calibration"))
    assert all(len(c) <= 250 or " " not in c for c in chunks)
    for sentence in heldout:  # independent of the probes: no half (30+ characters) is there
        plain = " ".join(sentence.split())
        half = len(plain) // 2
        pieces = [plain[:half], plain[half:]] if half >= 30 else [plain]
        assert not any(piece in text for piece in pieces), sentence
    # leaving out nothing keeps those sentences: the check above can fail
    unfiltered = "\n".join(data.unlabelled_chunks([]))
    assert sum(" ".join(s.split())[:30] in unfiltered for s in heldout) > len(heldout) // 2


def test_minilm_training_split_is_tokenized_unlabelled_text():
    zm = models_zoo.get("minilm")
    assert zm.has_training_split and not models_zoo.get("ppocr-rec").has_training_split
    batches = zm.training()
    heldout = [s for s, _ in data.sentence_split("heldout")]
    windows = [data.unlabelled_chunks(heldout, size) for size in TRAIN_WINDOWS]
    sentences = data.unlabelled_sentences(heldout)
    assert sum(b["input_ids"].shape[0] for b in batches) == sum(map(len, windows)) + len(sentences)
    assert batches[0]["input_ids"].shape[1] == 64 and batches[0]["attention_mask"].sum() > 0
    # the long windows first, then the sentence-length ones: shorter on average, and about as
    # long as the held-out sentences they stand in for
    tokens = np.concatenate([b["attention_mask"].sum(1) for b in batches])
    long, short = tokens[:len(windows[0])], tokens[len(windows[0]):-len(sentences)]
    held = np.concatenate([b["attention_mask"].sum(1) for b in zm.split("heldout")])
    assert np.median(short) < 0.7 * np.median(long)
    assert abs(np.median(short) - np.median(held)) < 0.5 * np.median(held)


def test_digits_and_tiny_gpt_train_on_their_own_training_data_only():
    from sklearn.datasets import load_digits

    from winnow.models_zoo.digits import digits_split

    train = np.concatenate([b["pixels"] for b in models_zoo.get("digits-vit").training()])
    held = np.concatenate([b["pixels"] for b in models_zoo.get("digits-vit").heldout()])
    assert np.array_equal(train, digits_split("train")[0])
    assert len(train) + len(held) == len(load_digits().target)  # together, every digit once
    gpt = models_zoo.get("tiny-gpt").training()
    text = data.byte_split("train")
    assert sum(b["input_ids"].shape[0] for b in gpt) == len(text) // 64 > 1000
    first = bytes(gpt[0]["input_ids"][0].astype("uint8"))
    assert first == text[:64] and first not in data.byte_split("heldout")


def test_byte_splits_partition_the_corpus():
    parts = [data.byte_split(s) for s in ("train", "calibration", "heldout")]
    assert b"".join(parts) == data.corpus_bytes()
    assert min(len(p) for p in parts) > 10_000


def test_code_hash_changes_with_source_and_hparams():
    base = cache.code_hash(["def f():\n    return 1\n"], {"lr": 0.1})
    assert base == cache.code_hash(["def f():\n    return 1\n"], {"lr": 0.1})
    assert base != cache.code_hash(["def f():\n    return 2\n"], {"lr": 0.1})
    assert base != cache.code_hash(["def f():\n    return 1\n"], {"lr": 0.2})
    assert base != cache.code_hash(["def f():\n    return 1\n", ""], {"lr": 0.1})


def test_zoo_cache_keys_hash_their_training_code():
    cnn, vit = models_zoo.get("digits-cnn"), models_zoo.get("digits-vit")
    assert cnn.cache_key() != vit.cache_key()
    changed = digits.DigitsModel("digits-cnn", digits.DigitsCNN,
                                 {**digits.CNN_HPARAMS, "epochs": 31}, "")
    assert changed.cache_key() != cnn.cache_key()
    gpt = tiny_gpt.TinyGPTModel(hparams={**tiny_gpt.HPARAMS, "steps": 1})
    assert gpt.cache_key() != models_zoo.get("tiny-gpt").cache_key()


def test_cache_trains_once_and_retrains_when_the_key_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("WINNOW_CACHE_DIR", str(tmp_path / "zoo"))
    calls = []

    def train(module):
        calls.append(1)
        with torch.no_grad():
            module.weight.fill_(float(len(calls)))
        return {"note": "trained"}

    key = cache.code_hash(["v1"], {})
    first = torch.nn.Linear(2, 2)
    info = cache.load_or_train("toy", key, first, train)
    assert calls == [1] and info["note"] == "trained" and "train_seconds" in info
    assert cache.is_cached("toy", key)
    second = torch.nn.Linear(2, 2)
    cache.load_or_train("toy", key, second, train)
    assert calls == [1] and torch.equal(first.weight, second.weight)
    cache.load_or_train("toy", cache.code_hash(["v2"], {}), torch.nn.Linear(2, 2), train)
    assert calls == [1, 1]
    files = sorted(p.name for p in (tmp_path / "zoo").iterdir())
    assert [f for f in files if f.endswith(".safetensors")] == [
        f"toy-{key}.safetensors", f"toy-{cache.code_hash(['v2'], {})}.safetensors"]
    assert not [f for f in files if f.endswith(".tmp")]


def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("WINNOW_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / "winnow" / "zoo"


@pytest.mark.parametrize("name", ["onnx:light_squeezenet", "onnx:test_Conv2d_groups",
                                  "onnx:test_operator_conv"])
def test_onnx_test_models_load_and_match_their_shipped_outputs(name):
    entry = models_zoo.get(name)
    model = winnow.load(name)
    assert model.metadata_props["winnow.source"] == name
    feeds = model.meta[EXAMPLE_FEEDS_KEY]
    assert set(feeds) == set(entry.heldout()[0])
    fid = evaluate_zoo(entry, model)
    assert fid.cosine > 0.99999 and fid.metric_name is None
    expected = entry.expected_outputs()
    got = list(entry.reference()(entry.heldout()[0]).values())
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-5)


def test_zoo_list_json_shows_every_curated_model():
    result = CliRunner().invoke(zoo, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    for name in CURATED:
        row = rows[f"zoo:{name}"]
        assert row["params"] > 0 and row["kind"] in models_zoo.base.KINDS
        assert row["metric"]
        assert row["cached"] in (True, False, "shipped")
    assert rows["zoo:minilm"]["params"] == 22_713_216
    assert rows["onnx:light_resnet50"]["metric"] is None


def test_zoo_list_table():
    result = CliRunner().invoke(zoo, ["list"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == ["NAME", "KIND", "PARAMS", "METRIC", "CACHED"]
    assert "zoo:tiny-gpt" in result.output


def test_zoo_export_writes_a_valid_onnx_file(tmp_path):
    out = tmp_path / "sq" / "model.onnx"
    result = CliRunner().invoke(zoo, ["export", "onnx:light_squeezenet", "-o", str(out)])
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(out))
    assert not [p for p in out.parent.iterdir() if p.name != "model.onnx"]


def test_zoo_export_unknown_name_exits_2():
    result = CliRunner().invoke(zoo, ["export", "nope", "-o", "x.onnx"])
    assert result.exit_code == 2
    assert "unknown zoo model 'nope'" in result.output and "minilm" in result.output


def test_onnx_test_model_that_ort_cannot_run_is_a_clear_error():
    with pytest.raises(ExecutionError, match="onnx:test_AvgPool1d"):
        models_zoo.get("onnx:test_AvgPool1d").reference()


def test_unwritable_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("WINNOW_CACHE_DIR", str(blocker / "zoo"))
    with pytest.raises(OutputError, match="WINNOW_CACHE_DIR"):
        cache.load_or_train("toy", "k", torch.nn.Linear(1, 1), lambda m: {})
