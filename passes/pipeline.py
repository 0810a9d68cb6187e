"""Pipeline text, MLIR style: `fold-constants,cse,drop-layers{count=2,regions=[a,b]}`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from winnow.errors import PipelineError, SourceError

PASS_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")  # what a pass name must match
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One pipeline element: a pass name and its options as text, in the order written."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}"


def format_value(value: Any) -> str:
    """Print one option value the way the pipeline parser reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if value is None:
        return "none"
    return str(value)


def format_pipeline(specs: list[PassSpec]) -> str:
    """Print a pipeline; `parse_pipeline(format_pipeline(x)) == x`."""
    return ",".join(str(s) for s in specs)


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse pipeline text into specs; a syntax error says where it is."""
    text = text.strip()
    if not text:
        raise PipelineError("the pipeline is empty; give at least one pass name, e.g. 'fold-constants'.")
    _refuse_control_characters(text, "the pipeline text")
    return [_parse_element(part, text) for part in _split_top(text, ",", text)]


def _refuse_control_characters(text: str, what: str) -> None:
    """Line breaks, tabs and other control characters have no place in a pipeline (and would
    break the one-line error messages that quote it)."""
    import unicodedata

    for index, ch in enumerate(text):
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            raise PipelineError(f"{what} holds the control character {ascii(ch)} at position "
                                f"{index}; write the pipeline on one line of printable text.")


def _split_top(text: str, sep: str, whole: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '{ch}' in pipeline '{whole}'.")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise PipelineError(f"unclosed '{{' or '[' in pipeline '{whole}'.")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _parse_element(part: str, whole: str) -> PassSpec:
    if not part:
        raise PipelineError(f"empty pass name in pipeline '{whole}' (check for a doubled comma).")
    name, _, rest = part.partition("{")
    name = name.strip()
    if not PASS_NAME.match(name):
        raise PipelineError(f"'{name}' in pipeline '{whole}' is not a kebab-case pass name.")
    if not rest:
        return PassSpec(name)
    if not rest.endswith("}"):
        raise PipelineError(f"options of '{name}' in pipeline '{whole}' must end with '}}'.")
    options = []
    body = rest[:-1].strip()
    for item in (_split_top(body, ",", whole) if body else []):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not _KEY.match(key) or not value:
            raise PipelineError(
                f"option '{item}' of '{name}' in pipeline '{whole}' must be written key=value.")
        options.append((key, value))
    keys = [k for k, _ in options]
    if len(set(keys)) != len(keys):
        raise PipelineError(f"an option of '{name}' is given twice in pipeline '{whole}'.")
    return PassSpec(name, tuple(options))


def load_pipeline_file(path: str | Path) -> list[PassSpec]:
    """Read a YAML pipeline: `pipeline: [fold-constants, {canonicalize: {max_iterations: 2}}]`."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"pipeline config '{path}' does not exist; give a YAML file path.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise PipelineError(f"pipeline config '{path}' is not UTF-8 text (byte {exc.start}); save "
                            "it as UTF-8 YAML.") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"pipeline config '{path}' is not valid YAML: "
                            f"{_yaml_problem(exc)}.") from None
    items = data.get("pipeline") if isinstance(data, dict) else data
    if isinstance(items, str):
        return parse_pipeline(items)
    if not isinstance(items, list) or not items:
        raise PipelineError(
            f"pipeline config '{path}' must hold a non-empty list under the key 'pipeline'.")
    return [_yaml_item(item, path) for item in items]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The YAML error on one line: what is wrong and where (line and column)."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{' '.join(str(problem).split())}{where}"


def _yaml_item(item: Any, path: Path) -> PassSpec:
    if isinstance(item, str):
        _refuse_control_characters(item, f"an entry of '{path}'")
        return _parse_element(item, str(path))
    if isinstance(item, dict) and len(item) == 1:
        ((name, opts),) = item.items()
        opts = opts or {}
        if not isinstance(opts, dict):
            raise PipelineError(f"options of '{name}' in '{path}' must be a mapping.")
        spec = PassSpec(str(name), tuple((str(k), format_value(v)) for k, v in opts.items()))
        _refuse_control_characters(str(spec), f"an entry of '{path}'")
        return _parse_element(str(spec), str(path))
    raise PipelineError(
        f"each entry of 'pipeline' in '{path}' must be a pass name or {{name: {{option: value}}}}.")
