"""digits-cnn and digits-vit: small image classifiers trained here on sklearn's 8x8 digits."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from winnow.models_zoo import cache
from winnow.models_zoo.base import Feeds, Outputs, TorchZooModel, first

SEED = 0
HELDOUT = 360
CALIBRATION = 128
BATCH = 60
CNN_HPARAMS = {"epochs": 30, "batch": 32, "lr": 3e-3, "weight_decay": 1e-4, "shift": 1,
               "smoothing": 0.0}
VIT_HPARAMS = {"epochs": 40, "batch": 32, "lr": 2e-3, "weight_decay": 0.05, "shift": 1,
               "smoothing": 0.1, "dim": 64, "depth": 4, "heads": 4, "patch": 2, "mlp": 128}


@functools.cache
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 [N, 1, 8, 8] in [0, 1] with int64 labels, in a fixed shuffle."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(SEED).permutation(len(data.target))
    images = (data.images[order] / 16.0).astype(np.float32)[:, None]
    return images, data.target[order].astype(np.int64)


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """'train' (all but the held-out tail), 'calibration' (a train subset) or 'heldout'."""
    images, labels = digits_arrays()
    cut = len(labels) - HELDOUT
    ranges = {"train": slice(0, cut), "calibration": slice(0, CALIBRATION),
              "heldout": slice(cut, None)}
    return images[ranges[split]], labels[ranges[split]]


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU stages, a max-pool, global average pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(stage(1, 32), stage(32, 64), nn.MaxPool2d(2),
                                      stage(64, 128))
        self.head = nn.Linear(128, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits [batch, 10] for images [batch, 1, 8, 8]."""
        return self.head(self.features(pixels).mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention with separate Q/K/V/O linear layers."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the token axis of x [batch, tokens, dim]."""
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return self.o_proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """Linear, GELU, linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The position-wise feed-forward."""
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One residual attention step and one residual MLP step."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """A small vision transformer: conv patch embedding, class token, pre-norm blocks, head."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int, mlp: int) -> None:
        super().__init__()
        tokens = (8 // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits [batch, 10] for images [batch, 1, 8, 8]."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def _augment(images: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random per-image translation by up to `shift` pixels (zero padded)."""
    n = images.shape[0]
    padded = F.pad(images, (shift,) * 4)[:, 0]
    dx, dy = torch.randint(0, 2 * shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols][:, None]


def train_classifier(model: nn.Module, hp: dict) -> dict:
    """AdamW with a cosine schedule and shift augmentation; returns held-out accuracy."""
    images, labels = (torch.from_numpy(a) for a in digits_split("train"))
    with cache.deterministic(SEED):
        gen = torch.Generator().manual_seed(SEED)
        steps = hp["epochs"] * math.ceil(len(labels) / hp["batch"])
        opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, hp["lr"], total_steps=steps)
        model.train()
        for _ in range(hp["epochs"]):
            order = torch.randperm(len(labels), generator=gen)
            for idx in order.split(hp["batch"]):
                x = _augment(images[idx], hp["shift"], gen)
                loss = F.cross_entropy(model(x), labels[idx], label_smoothing=hp["smoothing"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
    x, y = (torch.from_numpy(a) for a in digits_split("heldout"))
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    return {"heldout_accuracy": round(accuracy, 4)}


class DigitsModel(TorchZooModel):
    """A digits classifier trained on first use and cached; metric: held-out accuracy."""

    has_training_split = True  # the images it was trained on (all but the held-out tail)

    kind = "image-classifier"
    metric_name = "accuracy"
    output_kind = "logits"
    input_names = ("pixels",)
    output_names = ("logits",)

    def __init__(self, name: str, make: type, hparams: dict, description: str) -> None:
        super().__init__(name)
        self.make, self.hparams, self.description = make, hparams, description

    def _new_module(self) -> nn.Module:
        with cache.deterministic(SEED):
            if self.make is DigitsViT:
                keys = ("dim", "depth", "heads", "patch", "mlp")
                return DigitsViT(**{k: self.hparams[k] for k in keys})
            return self.make()

    def cache_key(self) -> str:
        """Hash of the model class, the training code and the hyper-parameters."""
        objects = [self.make, DigitsModel._new_module, digits_arrays, digits_split, _augment,
                   train_classifier]
        if self.make is DigitsViT:
            objects += [Attention, Mlp, Block]
        return cache.code_hash(cache.source_text(objects), self.hparams)

    def is_cached(self) -> bool:
        """Whether the trained weights are in the cache."""
        return cache.is_cached(self.name, self.cache_key())

    def shape_module(self) -> nn.Module:
        """An untrained classifier of the same architecture (for counting parameters)."""
        return self._new_module()

    def build_module(self) -> nn.Module:
        """The trained classifier (from the cache, or trained now)."""
        module = self._new_module()
        self.train_info = cache.load_or_train(self.name, self.cache_key(), module,
                                              lambda m: train_classifier(m, self.hparams))
        return module

    def make_split(self, split: str) -> list[Feeds]:
        """Batches of real digit images."""
        images, _ = digits_split(split)
        return [{"pixels": images[i:i + BATCH]} for i in range(0, len(images), BATCH)]

    def dynamic_shapes(self) -> dict:
        """The batch axis is dynamic."""
        return {"pixels": {0: "batch"}}

    def compute_metric(self, outputs: Sequence[Outputs], split: str) -> dict[str, float]:
        """Top-1 accuracy against the true labels."""
        _, labels = digits_split(split)
        predicted = np.concatenate([first(o).argmax(-1) for o in outputs])
        return {"accuracy": float((predicted == labels).mean())}


def models() -> list[DigitsModel]:
    """The digits zoo entries."""
    return [
        DigitsModel("digits-cnn", DigitsCNN, CNN_HPARAMS,
                    "3-stage CNN with batch norm, trained here on sklearn digits"),
        DigitsModel("digits-vit", DigitsViT, VIT_HPARAMS,
                    "4-block pre-norm ViT (patch 2), trained here on sklearn digits"),
    ]
