"""tiny-gpt: a small byte-level decoder-only LM (RoPE, GQA, RMSNorm, SwiGLU) trained here."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from winnow.models_zoo import cache, data
from winnow.models_zoo.base import Feeds, Outputs, TorchZooModel, first

SEED = 0
EVAL_SEQ = 64
EVAL_BATCH = 32
EVAL_BATCHES = 8
HPARAMS = {"dim": 128, "layers": 4, "heads": 8, "kv_heads": 2, "hidden": 352, "max_seq": 256,
           "rope_base": 10000.0, "seq": 64, "batch": 32, "steps": 500, "lr": 3e-3,
           "warmup": 30, "weight_decay": 0.1}
ARCH = ("dim", "layers", "heads", "kv_heads", "hidden", "max_seq", "rope_base")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) * weight over the last axis."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(max_seq: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq, head_dim] for rotary position embeddings (half-split)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by position (cos/sin [seq, head_dim])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal grouped-query attention: `heads` query heads share `kv_heads` key/value heads."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Attention over x [batch, seq, dim] with an additive causal mask [seq, seq]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gated feed-forward."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), Attention(dim, heads, kv_heads)
        self.norm2, self.mlp = RMSNorm(dim), SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """One residual attention step and one residual MLP step."""
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Byte embedding, decoder blocks, final RMSNorm and an untied LM head over 256 bytes."""

    def __init__(self, dim: int, layers: int, heads: int, kv_heads: int, hidden: int,
                 max_seq: int, rope_base: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, hidden) for _ in range(layers))
        self.norm, self.lm_head = RMSNorm(dim), nn.Linear(dim, 256, bias=False)
        cos, sin = rope_tables(max_seq, dim // heads, rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        causal = torch.full((max_seq, max_seq), float("-inf")).triu(1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-byte logits [batch, seq, 256] for input_ids [batch, seq]."""
        t = input_ids.shape[1]
        cos, sin, mask = self.rope_cos[:t], self.rope_sin[:t], self.causal_mask[:t, :t]
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def train_lm(model: TinyGPT, hp: dict) -> dict:
    """AdamW on random windows of the training bytes, warm-up then cosine decay."""
    corpus = torch.frombuffer(bytearray(data.byte_split("train")), dtype=torch.uint8).long()
    with cache.deterministic(SEED):
        gen = torch.Generator().manual_seed(SEED)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                                 {"params": other, "weight_decay": 0.0}], lr=hp["lr"],
                                betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / hp["warmup"])
                                                  * 0.5 * (1 + math.cos(math.pi * s / hp["steps"])))
        model.train()
        offsets = torch.arange(hp["seq"] + 1)
        for _ in range(hp["steps"]):
            starts = torch.randint(0, len(corpus) - hp["seq"] - 1, (hp["batch"], 1), generator=gen)
            window = corpus[starts + offsets]
            logits = model(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        model.eval()
    return {"final_train_loss": round(loss.item(), 4)}


def byte_windows(split: str) -> np.ndarray:
    """Non-overlapping int64 windows [n, EVAL_SEQ] of a split's bytes (EVAL_BATCHES batches; the
    train split, what distillation learns from, keeps every window)."""
    raw = np.frombuffer(data.byte_split(split), dtype=np.uint8).astype(np.int64)
    n = len(raw) // EVAL_SEQ
    n = n if split == "train" else min(n, EVAL_BATCH * EVAL_BATCHES)
    return raw[:n * EVAL_SEQ].reshape(n, EVAL_SEQ)


def perplexity(logits: np.ndarray, input_ids: np.ndarray) -> tuple[float, int]:
    """Summed next-byte negative log-likelihood and the number of predicted bytes."""
    pred = logits[:, :-1].astype(np.float64)
    target = input_ids[:, 1:]
    top = pred.max(-1, keepdims=True)
    log_z = np.log(np.exp(pred - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(pred, target[..., None], axis=-1)[..., 0]
    return float((log_z - picked).sum()), int(target.size)


class TinyGPTModel(TorchZooModel):
    """The tiny-gpt zoo entry; metric: held-out perplexity per byte (lower is better)."""

    kind = "causal-lm"
    metric_name = "perplexity"
    higher_is_better = False
    output_kind = "logits"
    input_names = ("input_ids",)
    output_names = ("logits",)
    description = "4-layer byte-level decoder (RoPE, GQA 8q/2kv, RMSNorm, SwiGLU), trained here"
    has_training_split = True  # the bytes it was trained on

    def __init__(self, name: str = "tiny-gpt", hparams: dict | None = None) -> None:
        super().__init__(name)
        self.hparams = dict(hparams or HPARAMS)

    def cache_key(self) -> str:
        """Hash of the model code, the training code, the hyper-parameters and the corpus."""
        objects = [RMSNorm, rope_tables, apply_rope, Attention, SwiGLU, Block, TinyGPT,
                   TinyGPTModel.shape_module, train_lm, data.byte_split, data.corpus_bytes]
        return cache.code_hash(cache.source_text(objects),
                               {**self.hparams, "corpus": data.corpus_digest()})

    def is_cached(self) -> bool:
        """Whether the trained weights are in the cache."""
        return cache.is_cached(self.name, self.cache_key())

    def shape_module(self) -> TinyGPT:
        """An untrained LM of the same architecture (for counting parameters)."""
        with cache.deterministic(SEED):
            return TinyGPT(**{k: self.hparams[k] for k in ARCH})

    def build_module(self) -> TinyGPT:
        """The trained LM (from the cache, or trained now)."""
        module = self.shape_module()
        self.train_info = cache.load_or_train(self.name, self.cache_key(), module,
                                              lambda m: train_lm(m, self.hparams))
        return module

    def make_split(self, split: str) -> list[Feeds]:
        """Batches of real text bytes (pydoc topics) as input_ids."""
        windows = byte_windows(split)
        return [{"input_ids": windows[i:i + EVAL_BATCH]}
                for i in range(0, len(windows), EVAL_BATCH)]

    def dynamic_shapes(self) -> dict:
        """Batch and sequence axes are dynamic (sequence at most max_seq)."""
        return {"input_ids": {0: "batch", 1: "seq"}}

    def task_loss(self, outputs: Outputs, feeds: Feeds) -> float:
        """Mean next-byte cross-entropy (nats) of one batch: the LM's own training loss."""
        total, count = perplexity(first(outputs), feeds["input_ids"])
        return total / count

    def compute_metric(self, outputs: Sequence[Outputs], split: str) -> dict[str, float]:
        """exp(mean next-byte cross-entropy) over the split."""
        nll, count = 0.0, 0
        for out, feeds in zip(outputs, self.split(split)):
            total, n = perplexity(first(out), feeds["input_ids"])
            nll, count = nll + total, count + n
        return {"perplexity": math.exp(nll / count), "bits_per_byte": nll / count / math.log(2)}


def models() -> list[TinyGPTModel]:
    """The tiny-gpt zoo entry."""
    return [TinyGPTModel()]
