"""Pipeline text and YAML: exact round trips and clear errors."""

from __future__ import annotations

import pytest

from winnow.errors import PassConfigError, PipelineError
from winnow.passes import PassManager, format_pipeline, parse_pipeline
from winnow.passes.pipeline import PassSpec, load_pipeline_file

ROUND_TRIPS = [
    "fold-constants",
    "fold-constants,cse,dce,canonicalize{max_iterations=2}",
    "drop-layers{count=2,regions=[a,b]},quantize{mode=int8}",
    "x{a=[1,2,3],b=true,c=none}",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_parse_print_round_trip(text):
    specs = parse_pipeline(text)
    assert format_pipeline(specs) == text
    assert parse_pipeline(format_pipeline(specs)) == specs


def test_parse_structure():
    specs = parse_pipeline("cse, drop-layers{count=2, regions=[b0,b1]}")
    assert specs == [PassSpec("cse"), PassSpec("drop-layers", (("count", "2"), ("regions", "[b0,b1]")))]


@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("cse,,dce", "doubled comma"),
    ("cse{size_limit=3", "unclosed"),
    ("cse}", "unbalanced"),
    ("Fold_Constants", "kebab-case"),
    ("cse{size_limit}", "key=value"),
    ("cse{a=1,a=2}", "twice"),
])
def test_syntax_errors_are_clear(text, fragment):
    with pytest.raises(PipelineError, match=fragment):
        parse_pipeline(text)


def test_unknown_pass_lists_registered_names():
    with pytest.raises(PipelineError) as err:
        PassManager("fold-constants,no-such-pass")
    message = str(err.value)
    assert "unknown pass 'no-such-pass'" in message
    for name in ("canonicalize", "cse", "dce", "fold-constants", "shape-inference"):
        assert name in message


def test_bad_option_value_names_the_field():
    with pytest.raises(PassConfigError, match="'size_limit' expects int; got 'abc'"):
        PassManager("cse{size_limit=abc}")


def test_unknown_option_lists_the_fields():
    with pytest.raises(PassConfigError, match="no option 'nope'.*size_limit"):
        PassManager("cse{nope=1}")


def test_out_of_range_option_is_refused():
    with pytest.raises(PassConfigError, match="max_iterations"):
        PassManager("canonicalize{max_iterations=0}")


def test_manager_prints_its_pipeline_with_every_option_given():
    assert PassManager("cse,canonicalize{max_iterations=2}").text == "cse,canonicalize{max_iterations=2}"
    assert PassManager("canonicalize{max_iterations=10}").text == "canonicalize{max_iterations=10}"


def test_yaml_pipeline_equals_text(tmp_path):
    path = tmp_path / "pipe.yaml"
    path.write_text("pipeline:\n  - fold-constants\n  - cse\n  - canonicalize: {max_iterations: 2}\n"
                    "  - x: {flags: [a, b], enabled: true}\n")
    specs = load_pipeline_file(path)
    assert format_pipeline(specs) == "fold-constants,cse,canonicalize{max_iterations=2},x{flags=[a,b],enabled=true}"


def test_yaml_pipeline_errors(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        load_pipeline_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: {cse: 1, dce: 2}\n")
    with pytest.raises(PipelineError, match="non-empty list"):
        load_pipeline_file(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("pipeline: [cse\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_pipeline_file(broken)
