"""A bounded, derandomized fuzz run over every target of `fuzz_targets` (the longer run is
`bench/fuzz.py --examples N`): each bad input is one WinnowError sentence, never another
exception, a hang or a write outside OUT."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from winnow.tests import fuzz_targets as ft

BOUNDED = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                   suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A scratch folder shared by the examples of one module."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def hf_seed(tmp_path_factory):
    """The tiny BERT folder the HF target mutates."""
    if not ft.hf_available():
        pytest.skip("the Hugging Face target needs winnow[hf]")
    ft.quiet_environment()
    return ft.build_hf_folder(tmp_path_factory.mktemp("hf-seed") / "tiny")


def test_onnx_protobufs(work):
    tally = ft.Tally("onnx")

    @settings(BOUNDED, max_examples=250)
    @given(ft.onnx_files())
    def run(sample):
        ft.check_onnx_file(tally, work, sample)

    run()
    assert tally.inputs >= 250 and tally.refused > 0 and tally.accepted > 0


def test_hf_folders(work, hf_seed):
    tally = ft.Tally("hf")

    @settings(BOUNDED, max_examples=60)
    @given(ft.HF_SAMPLES)
    def run(sample):
        ft.check_hf_folder(tally, work, hf_seed, sample)

    run()
    assert tally.inputs >= 60 and tally.refused > 0


def test_pipeline_text():
    tally = ft.Tally("pipeline")

    @settings(BOUNDED, max_examples=400)
    @given(ft.PIPELINE_TEXT)
    def run(text):
        ft.check_pipeline_text(tally, text)

    run()
    assert tally.inputs >= 400 and tally.refused > 0 and tally.accepted > 0


def test_pipeline_yaml(work):
    tally = ft.Tally("yaml")

    @settings(BOUNDED, max_examples=300)
    @given(ft.YAML_TEXT)
    def run(text):
        ft.check_pipeline_yaml(tally, work, text)

    run()
    assert tally.inputs >= 300 and tally.refused > 0


def test_input_shapes():
    tally = ft.Tally("input-shapes")

    @settings(BOUNDED, max_examples=400)
    @given(ft.SHAPES_TEXT)
    def run(text):
        ft.check_input_shapes(tally, text)

    run()
    assert tally.inputs >= 400 and tally.refused > 0
