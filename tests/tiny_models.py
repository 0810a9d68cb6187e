"""Small torch models with known structure, for region and redundancy tests."""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention written with Linear layers."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    """A pre-norm block, x + attn(ln1(x)); x + mlp(ln2(x)), or the post-norm (BERT) form;
    sub-layers named in `skip` are left out (a torch-side oracle for skipping)."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, post: bool = False) -> None:
        super().__init__()
        self.post = post
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kv_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.skip: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:
            if "attn" not in self.skip:
                x = self.ln1(x + self.attn(x))
            if "mlp" not in self.skip:
                x = self.ln2(x + self.mlp(x))
            return x
        if "attn" not in self.skip:
            x = x + self.attn(self.ln1(x))
        if "mlp" not in self.skip:
            x = x + self.mlp(self.ln2(x))
        return x


class TinyTransformer(nn.Module):
    """Transformer blocks over [batch, seq, dim] inputs, then a final LayerNorm."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 3, kv_heads: int | None = None,
                 seed: int | None = 0, post: bool = False, final_norm: bool = True) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, post) for _ in range(layers))
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def zero_block_branches(model: TinyTransformer, index: int) -> None:
    """Make block `index` an exact identity by zeroing the output projections of its branches."""
    block = model.blocks[index]
    with torch.no_grad():
        for linear in (block.attn.out, block.mlp[2]):
            linear.weight.zero_()
            linear.bias.zero_()


def linearize_block(model: TinyTransformer, index: int) -> None:
    """Make block `index` nearly linear in its input: no attention output, and an MLP whose
    GELU only sees tiny pre-activations (GELU(z) ~ z/2 there), rescaled to its old size."""
    block = model.blocks[index]
    with torch.no_grad():
        block.attn.out.weight.zero_()
        block.attn.out.bias.zero_()
        block.mlp[0].weight.mul_(1e-3)
        block.mlp[0].bias.zero_()
        block.mlp[2].weight.mul_(2e3)


def scale_block(model: TinyTransformer, index: int, factor: float) -> None:
    """Scale what block `index` writes to the residual stream (both branches) by `factor`."""
    block = model.blocks[index]
    with torch.no_grad():
        for linear in (block.attn.out, block.mlp[2]):
            linear.weight.mul_(factor)
            linear.bias.mul_(factor)
