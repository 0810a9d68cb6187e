"""Typed, frozen pass configs: declare fields with `option`, build them from text or values."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from winnow.errors import PassConfigError


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None) -> Any:
    """A config field with its default, one-line description and optional bounds."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults must be immutable; use a tuple")
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class EmptyConfig:
    """The config of a pass that takes no options."""


def config_fields(config_cls: type) -> list[dict[str, Any]]:
    """Describe each field of a config class: name, type, default, help, bounds."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        out.append({
            "name": f.name,
            "type": _type_name(hints[f.name]),
            "default": f.default,
            "help": f.metadata.get("help", ""),
            "choices": f.metadata.get("choices"),
        })
    return out


def build_config(pass_name: str, config_cls: type, options: dict[str, Any]) -> Any:
    """Build a frozen config from options given as text (pipeline) or Python values."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values = {}
    for key, raw in options.items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise PassConfigError(
                f"pass '{pass_name}' has no option '{key}'; its options are: {valid}.")
        values[key] = _coerce(pass_name, key, hints[key], raw)
        _check_bounds(pass_name, fields[key], values[key])
    try:
        return config_cls(**values)
    except PassConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise PassConfigError(f"pass '{pass_name}': {exc}") from exc


def _check_bounds(pass_name: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    if choices and value not in choices:
        raise PassConfigError(
            f"pass '{pass_name}' option '{f.name}' must be one of {', '.join(map(str, choices))}; "
            f"got {value!r}.")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise PassConfigError(
                f"pass '{pass_name}' option '{f.name}' must be in {bounds}; got {value!r}.")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(pass_name: str, key: str, tp: Any, raw: Any) -> Any:
    try:
        return _coerce_value(tp, raw)
    except (ValueError, TypeError):
        raise PassConfigError(
            f"pass '{pass_name}' option '{key}' expects {_type_name(tp)}; got {raw!r}.") from None


def _coerce_value(tp: Any, raw: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce_value(arg, raw)
            except (ValueError, TypeError):
                continue
        raise ValueError(raw)
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items = [t.strip() for t in text.split(",") if t.strip()]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise TypeError(raw)
        return tuple(_coerce_value(item_tp, x) for x in items)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(raw)
    if tp is int:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            return int(raw.strip())
        raise TypeError(raw)
    if tp is float:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            return float(raw.strip())
        raise TypeError(raw)
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise TypeError(raw)
    raise TypeError(f"unsupported config field type {tp!r}")
