"""Inputs a user gives for a model instead of invented ones: `--input-shapes 'x=1,512;s=2,1,128'`
(random data of those shapes) or `--example-inputs feeds.npz` (the arrays themselves), parsed once
and checked against the model's inputs (names, rank, fixed dims, dims shared by name, dtype)."""

from __future__ import annotations

import dataclasses
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.errors import InputsError

USER_INPUTS_KEY = "winnow.user_inputs"  # model.meta: the record of the inputs the user gave
MAX_RANDOM_ELEMENTS = 2**27  # per input; larger random feeds would take gigabytes
SHAPES_EXAMPLE = "'input=1,512;state=2,1,128'"

Spec = Mapping[str, Any]  # {"name", "dtype", "shape"}, as manifest.json lists a model's inputs
Feeds = dict[str, np.ndarray]


def parse_input_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """`NAME=D1,D2,...` items separated by ';' as {name: shape}; `NAME=` is a scalar."""
    if not isinstance(text, str) or not text.strip():
        raise InputsError(f"--input-shapes is empty; write NAME=D1,D2,... per input, e.g. "
                          f"{SHAPES_EXAMPLE}.")
    bad = next((ch for ch in text if not ch.isprintable()), None)
    if bad is not None:
        raise InputsError(f"--input-shapes holds the control character {ascii(bad)}; write "
                          f"NAME=D1,D2,... items on one line, e.g. {SHAPES_EXAMPLE}.")
    shapes: dict[str, tuple[int, ...]] = {}
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        name, equals, dims = item.rpartition("=")
        name = name.strip()
        if not equals or not name:
            raise InputsError(f"--input-shapes item {item!r} is not NAME=D1,D2,...; write e.g. "
                              f"{SHAPES_EXAMPLE}.")
        if name in shapes:
            raise InputsError(f"--input-shapes gives input '{name}' twice; give each input once.")
        shapes[name] = _parse_dims(name, dims)
    if not shapes:
        raise InputsError(f"--input-shapes names no input; write e.g. {SHAPES_EXAMPLE}.")
    return shapes


def _parse_dims(name: str, text: str) -> tuple[int, ...]:
    body = text.strip().removeprefix("[").removesuffix("]").strip()
    if not body:
        return ()
    dims = []
    for part in body.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()) or int(part) < 1:
            raise InputsError(f"--input-shapes gives input '{name}' the dim {part!r}; dims are "
                              "positive integers separated by commas, e.g. "
                              f"{SHAPES_EXAMPLE}.")
        dims.append(int(part))
    return tuple(dims)


def load_npz(path: str | Path, option: str = "--example-inputs") -> Feeds:
    """The named arrays of an .npz file (never unpickled); InputsError when it cannot be read."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputsError(f"inputs file '{path}' does not exist; give an .npz file.") from None
    except IsADirectoryError:
        raise InputsError(f"inputs file '{path}' is a folder; give an .npz file.") from None
    except EOFError:
        raise InputsError(f"inputs file '{path}' is empty or truncated; write it with "
                          "numpy.savez.") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputsError(f"inputs file '{path}' is not a readable .npz of arrays "
                          f"({_first_line(exc)}); write it with numpy.savez.") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputsError(f"inputs file '{path}' holds a single array, not named arrays; write "
                          "it with numpy.savez(path, input_name=array, ...).")
    with data:
        try:
            return {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise InputsError(f"inputs file '{path}' has an array {option} cannot read "
                              f"({_first_line(exc)}); write plain numeric arrays with "
                              "numpy.savez.") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def model_input_specs(model: ir.Model) -> list[dict[str, Any]]:
    """The model's real inputs (initializer-backed ones left out) as name, dtype, shape specs."""
    inits = model.graph.initializers
    return [value_spec(v) for v in model.graph.inputs if v.name not in inits]


def value_spec(value: ir.Value) -> dict[str, Any]:
    """Name, dtype and shape of one graph input or output (as the manifest records them)."""
    return {"name": value.name, "dtype": dtype_name(value.dtype), "shape": shape_spec(value.shape)}


def dtype_name(dtype: ir.DataType | None) -> str | None:
    """A dtype as numpy spells it (`float32`), or the ONNX name when numpy has none."""
    if dtype is None:
        return None
    try:
        name = np.dtype(dtype.numpy()).name
    except (TypeError, ValueError):
        return dtype.name.lower()
    return dtype.name.lower() if name == "object" else name


def shape_spec(shape: ir.Shape | None) -> list[int | str | None] | None:
    """A shape as a list: ints, symbolic dims as strings, unknown dims as None."""
    if shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in shape]


@dataclasses.dataclass(frozen=True)
class UserInputs:
    """What the user gave for a model's inputs: shapes (random data) or arrays, and whence."""

    origin: str
    shapes: Mapping[str, tuple[int, ...]] | None = None
    arrays: Mapping[str, np.ndarray] | None = None

    @classmethod
    def from_options(cls, input_shapes: str | None = None,
                     example_inputs: str | Path | Mapping[str, Any] | None = None
                     ) -> UserInputs | None:
        """Parse --input-shapes text or read --example-inputs (a path or a feed dict); None
        when neither is given."""
        if input_shapes is not None and example_inputs is not None:
            raise InputsError("give either --input-shapes or --example-inputs, not both (the "
                              "arrays already have shapes).")
        if input_shapes is not None:
            return cls(f"random data shaped by --input-shapes '{input_shapes}'",
                       shapes=parse_input_shapes(input_shapes))
        if example_inputs is None:
            return None
        if isinstance(example_inputs, Mapping):
            return cls("the given example inputs", arrays={k: np.asarray(v) for k, v in
                                                          example_inputs.items()})
        return cls(f"--example-inputs {example_inputs}", arrays=load_npz(example_inputs))

    def feeds(self, specs: Sequence[Spec], seed: int = 0) -> Feeds:
        """Feeds for inputs `specs`: the arrays, or random data of the given shapes (inputs not
        named take the sizes their symbolic dims got elsewhere); InputsError when they do not
        fit."""
        given = dict(self.arrays if self.arrays is not None else self.shapes or {})
        _check_names(specs, given, self.origin, require_all=self.arrays is not None)
        shapes = {name: tuple(np.shape(v)) if self.arrays is not None else tuple(v)
                  for name, v in given.items()}
        bound = _bind_symbols(specs, shapes, self.origin)
        if self.arrays is not None:
            for spec in specs:
                _check_dtype(spec, self.arrays[spec["name"]], self.origin)
            return {spec["name"]: self.arrays[spec["name"]] for spec in specs}
        rng = np.random.default_rng(seed)
        return {spec["name"]: random_array(rng, spec, _full_shape(spec, shapes, bound, self.origin))
                for spec in specs}

    def record(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """What the manifest keeps: where the inputs came from and the shape of each."""
        return {"origin": self.origin,
                "shapes": {name: list(np.shape(v)) for name, v in feeds.items()},
                "dtypes": {name: np.asarray(v).dtype.name for name, v in feeds.items()}}

    def attach(self, model: ir.Model) -> dict[str, Any]:
        """Make these the model's example feeds (the check inputs and default calibration data)
        and return their record."""
        from winnow.frontend import EXAMPLE_FEEDS_KEY

        feeds = self.feeds(model_input_specs(model))
        model.meta[EXAMPLE_FEEDS_KEY] = feeds
        model.meta[USER_INPUTS_KEY] = self.record(feeds)
        return model.meta[USER_INPUTS_KEY]


def user_inputs_record(model: ir.Model) -> dict[str, Any] | None:
    """The record of the inputs the user gave for this model, if any."""
    return model.meta.get(USER_INPUTS_KEY)


def _check_names(specs: Sequence[Spec], given: Mapping[str, Any], origin: str,
                 require_all: bool) -> None:
    names = [s["name"] for s in specs]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise InputsError(f"{origin} names '{unknown[0]}', which is not an input of the model; "
                          f"its inputs are: {', '.join(names) or 'none'}.")
    missing = [n for n in names if n not in given]
    if require_all and missing:
        raise InputsError(f"{origin} has no array for input '{missing[0]}'; give one array per "
                          f"input ({', '.join(names)}).")


def _bind_symbols(specs: Sequence[Spec], shapes: Mapping[str, tuple[int, ...]],
                  origin: str) -> dict[str, int]:
    """Check rank and fixed dims of every given shape; the size each symbolic dim name takes."""
    bound: dict[str, tuple[int, str]] = {}
    for spec in specs:
        name = spec["name"]
        if name not in shapes:
            continue
        want, got = spec.get("shape"), shapes[name]
        if want is None:
            continue
        if len(want) != len(got):
            raise InputsError(f"{origin} gives input '{name}' {len(got)} dims {list(got)}, but "
                              f"the model's input has rank {len(want)} {_shape_text(want)}.")
        for axis, (dim, size) in enumerate(zip(want, got)):
            if isinstance(dim, int) and dim >= 0 and dim != size:
                raise InputsError(f"{origin} gives input '{name}' size {size} at axis {axis}, "
                                  f"which the model fixes at {dim} {_shape_text(want)}.")
            if isinstance(dim, str) and dim:
                if dim in bound and bound[dim][0] != size:
                    raise InputsError(f"{origin} gives dim '{dim}' size {size} in input "
                                      f"'{name}' but {bound[dim][0]} in input '{bound[dim][1]}'; "
                                      "a dim shared by name takes one size.")
                bound.setdefault(dim, (size, name))
    return {dim: size for dim, (size, _) in bound.items()}


def _full_shape(spec: Spec, shapes: Mapping[str, tuple[int, ...]], bound: Mapping[str, int],
                origin: str) -> tuple[int, ...]:
    name, want = spec["name"], spec.get("shape")
    if name in shapes:
        shape = shapes[name]
    elif want is None:
        raise InputsError(f"input '{name}' has no known rank and {origin} does not give its "
                          f"shape; add '{name}=D1,D2,...'.")
    else:
        open_dims = [str(d) if d else f"axis {axis}" for axis, d in enumerate(want)
                     if not (isinstance(d, int) and d >= 0) and bound.get(d) is None]
        if open_dims:
            raise InputsError(f"input '{name}' {_shape_text(want)} has dims ({', '.join(open_dims)}"
                              f") that {origin} does not size; add '{name}=D1,D2,...'.")
        shape = tuple(d if isinstance(d, int) and d >= 0 else bound[d] for d in want)
    if math.prod(shape) > MAX_RANDOM_ELEMENTS:
        raise InputsError(f"input '{name}' of shape {list(shape)} has {math.prod(shape):,} "
                          f"elements, more than the {MAX_RANDOM_ELEMENTS:,} winnow makes random "
                          "data for; give smaller shapes or the arrays with --example-inputs.")
    return shape


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_dtype(spec: Spec, array: np.ndarray, origin: str) -> None:
    want = spec.get("dtype")
    if want is None:
        return
    got = np.asarray(array).dtype
    if want == "string" and got.kind in "US":
        return
    if got.name != want:
        raise InputsError(f"{origin} gives input '{spec['name']}' as {got.name}, but the model "
                          f"takes {want}; save it as {want} (array.astype('{want}')).")


def random_array(rng: np.random.Generator, spec: Spec, shape: Sequence[int]) -> np.ndarray:
    """Random data for one input: floats ~ N(0, 1), booleans and other integers in {0, 1}."""
    name = spec.get("dtype") or "float32"
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf":
        raise InputsError(f"input '{spec['name']}' is {name}, which winnow cannot make random "
                          "data for; give its values with --example-inputs.")
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 2, shape).astype(dtype)
