"""`winnow zoo`: list the zoo models and export one to an ONNX file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from winnow.errors import OutputError, WinnowError


class _ZooGroup(click.Group):
    """Reports WinnowError as one line and exit 2 when used on its own (the main CLI does too)."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; a WinnowError becomes `error: ...` and exit code 2."""
        if ctx.parent is not None:  # under `winnow`: its group reports errors (and --json)
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except WinnowError as exc:
            click.echo(f"error: {exc.for_cli()}", err=True)
            ctx.exit(exc.exit_code)


def _params(n: int) -> str:
    """A parameter count for people: 22.7M, 94.2k."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def entry_row(model: Any, score: bool = False) -> dict[str, Any]:
    """The `zoo list` facts about one model (training or running it only when `score`)."""
    cached = model.is_cached()
    row = {"name": model.source, "kind": model.kind, "params": model.num_params(),
           "metric": model.metric_name, "cached": "shipped" if cached is None else cached,
           "description": model.description}
    if score and model.metric_name:
        row["score"] = model.score(split="heldout")
    return row


def _rows(include_all: bool, score: bool) -> list[dict[str, Any]]:
    from winnow import models_zoo

    rows = []
    for name in models_zoo.names():
        try:
            rows.append(entry_row(models_zoo.get(name), score))
        except WinnowError as exc:  # a missing extra or model package: listed, with the reason
            rows.append({"name": f"zoo:{name}", "kind": "-", "params": 0, "metric": None,
                         "cached": "unavailable", "description": "", "error": exc.for_cli()})
    chosen = [models_zoo.get(f"onnx:{n}") for n in models_zoo.onnx_names()
              if include_all or n.startswith("light_")]
    return rows + [entry_row(m, score) for m in chosen]


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("NAME", "KIND", "PARAMS", "METRIC", "CACHED")
    lines = [(r["name"], r["kind"], _params(r["params"]), r["metric"] or "-",
              {True: "yes", False: "no"}.get(r["cached"], str(r["cached"]))) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip()] + [fmt.format(*line).rstrip() for line in lines]
    for r in rows:
        if "error" in r:
            out.append(f"{r['name']}: {r['error']}")
        if "score" in r:
            values = ", ".join(f"{k} {v:.4f}" for k, v in r["score"].items())
            out.append(f"{r['name']}: {values}")
    return "\n".join(out)


def shape_text(shape: Any) -> str:
    """A shape as people write it: `[batch, 1, 8, 8]` (`?` for an unknown dim or rank)."""
    if shape is None:
        return "?"
    dims = [str(d) if isinstance(d, int) else (getattr(d, "value", None) or "?") for d in shape]
    return "[" + ", ".join(dims) + "]"


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@click.group(cls=_ZooGroup)
def zoo() -> None:
    """Real models with real data: `zoo:NAME` and `onnx:NAME` sources."""


@zoo.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--all", "include_all", is_flag=True,
              help="Also list every onnx:test_* model the onnx package ships.")
@click.option("--score", is_flag=True,
              help="Compute each model's metric on its held-out split (trains uncached models).")
def list_models(as_json: bool, include_all: bool, score: bool) -> None:
    """List the zoo: name, kind, parameters, metric and whether trained weights are cached."""
    rows = _rows(include_all, score)
    click.echo(json.dumps(rows, indent=2) if as_json else _table(rows))


@zoo.command("export")
@click.argument("name")
@click.option("-o", "--out", required=True, metavar="FILE.onnx", help="ONNX file to write.")
def export(name: str, out: str) -> None:
    """Export zoo model NAME (as captured into the IR) to an ONNX file."""
    import onnx_ir as ir

    from winnow import models_zoo

    model = models_zoo.load_named(name if ":" in name else f"zoo:{name}")
    path = Path(out)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".export-", suffix=".onnx")
        os.close(fd)
        ir.save(model, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write '{path}': {exc.strerror or exc}; choose a writable "
                          "path.") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    inputs = ", ".join(f"{v.name} {shape_text(v.shape)}" for v in model.graph.inputs
                       if v.name not in model.graph.initializers)  # the ones a caller feeds
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; inputs {inputs})")
