"""The `winnow` command line: parses arguments, calls the API, prints the result."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any

import click
import numpy as np

from winnow import __version__, progress
from winnow.driver.compile import DEFAULT_MAX_DROP
from winnow.errors import WinnowError


STARTED_AT = time.time()  # about the command's start: --time-budget counts from here
GLOBAL_FLAGS = ("--debug", "--quiet")
JSON_KEY = "winnow.json"


class _Group(click.Group):
    """A click group that turns WinnowError into `error: ...` and exit 2 (a JSON object under
    --json), and takes --debug / --quiet before or after the subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Move --debug / --quiet to the front wherever they are written; note --json."""
        end = args.index("--") if "--" in args else len(args)
        head = args[:end]
        ctx.meta[JSON_KEY] = "--json" in head
        flags = list(dict.fromkeys(a for a in head if a in GLOBAL_FLAGS))
        rest = [a for a in head if a not in GLOBAL_FLAGS]
        return super().parse_args(ctx, [*flags, *rest, *args[end:]])

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand, reporting errors as one line (tracebacks with --debug)."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise  # click's main ends a closed pipe (`winnow ... | head`) quietly
        except click.ClickException as exc:
            if not ctx.meta.get(JSON_KEY):
                raise
            _report(ctx, exc, exc.format_message(), exc.exit_code)
        except WinnowError as exc:
            _report(ctx, exc, exc.for_cli(), exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            _report(ctx, exc, f"{type(exc).__name__}: {exc} (rerun with --debug for the "
                              "traceback)", 1, prefix="internal error")


def _report(ctx: click.Context, exc: BaseException, message: str, code: int,
            prefix: str = "error") -> None:
    """Print the error (as {"error": {...}} on stdout under --json) and exit with `code`."""
    if (ctx.obj or {}).get("debug"):
        traceback.print_exc()
    if ctx.meta.get(JSON_KEY):
        click.echo(json.dumps({"error": {"type": type(exc).__name__, "message": message,
                                         "internal": prefix != "error", "exit_code": code}}))
    else:
        click.echo(f"{prefix}: {message}", err=True)
    ctx.exit(code)


def _dump(obj: Any) -> None:
    from winnow.backends.manifest import jsonable

    click.echo(json.dumps(jsonable(obj), indent=2))


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


INPUT_SHAPES_HELP = ("Shapes of the model's inputs for the check and calibration data, e.g. "
                     "'input=1,512;state=2,1,128' (random values; dims shared by name carry over).")
EXAMPLE_INPUTS_HELP = ".npz file with one array per model input (numpy.savez), used instead of random data."


def _input_options(func: Any) -> Any:
    """Add --input-shapes and --example-inputs to a command."""
    func = click.option("--example-inputs", default=None, metavar="FILE.npz",
                        help=EXAMPLE_INPUTS_HELP)(func)
    return click.option("--input-shapes", default=None, metavar="TEXT", help=INPUT_SHAPES_HELP)(func)


def _user_inputs(input_shapes: str | None, example_inputs: str | None) -> Any:
    from winnow.ir.user_inputs import UserInputs

    return UserInputs.from_options(input_shapes, example_inputs)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="winnow", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors (also after the subcommand).")
@click.option("--quiet", is_flag=True, help="No progress output (also after the subcommand).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """winnow: a model compiler that finds and removes redundancy."""
    ctx.obj = {"debug": debug}
    progress.set_quiet(quiet)
    if not debug:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # ORT's warnings only with --debug


@cli.command()
@click.argument("src")
@click.option("-o", "--out", required=True, metavar="OUT", help="Artifact folder to write.")
@click.option("--pipeline", default=None, metavar="TEXT", help="Pipeline text, e.g. 'fold-constants,cse,dce'.")
@click.option("--config", default=None, metavar="FILE.yaml", help="YAML file with a 'pipeline' list.")
@click.option("--backend", default="ort", show_default=True, metavar="NAME", help="Backend that emits the artifact.")
@click.option("--timings", is_flag=True, help="Print the time each pass took.")
@click.option("--dump-ir", default=None, metavar="DIR", help="Write the IR before/after each pass into DIR.")
@click.option("--verify-each", is_flag=True, help="Verify the model after every pass.")
@click.option("--no-check", is_flag=True, help="Skip the differential check against the source.")
@click.option("--eval", "evaluate", is_flag=True,
              help="Score the result on the zoo model's held-out data (always done after lossy passes).")
@click.option("--max-drop", default=None, metavar="X",
              help="Fidelity budget for lossy passes: largest task-metric drop (or 1 - cosine), "
                   "or a percentage of the source's metric such as 5% (perplexity); "
                   f"default {DEFAULT_MAX_DROP}, or 0.01 with --target.")
@click.option("--force", is_flag=True, help="Write the result even when it misses the budget.")
@click.option("--strict", is_flag=True,
              help="Fail (exit 2) when a lossless pass changes the outputs, instead of rolling it back.")
@click.option("--target", default=None, metavar="T",
              help="Search pass combinations for target T ('host') instead of running one pipeline; "
                   "with --backend tvm, the library's target (host, aarch64).")
@click.option("--tune-trials", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="With --backend tvm: tune the kernels with MetaSchedule, N trials in all (the database is kept in OUT and reused).")
@click.option("--tune-timeout", default=None, type=click.FloatRange(min=1), metavar="S",
              help="With --tune-trials: seconds each candidate's build may take [120].")
@click.option("--objective", default="latency", show_default=True, metavar="NAME",
              help="What the search minimises: latency or size.")
@click.option("--time-budget", default="10m", show_default=True, metavar="DURATION",
              help="The whole compile's time budget, e.g. 90s, 10m, 1h: trials stop when the finalists' check and the emit would no longer fit.")
@click.option("--trials", default=48, show_default=True, type=int, metavar="N",
              help="Search trials (a resumed search counts the trials already done).")
@click.option("--trial-cost", default="predicted", show_default=True, metavar="HOW",
              help="How trials' latency is judged: predicted (the cost model: fast, unmoved by a busy host) or measured (timed against the source). Finalists are always timed.")
@click.option("--study", default=None, metavar="URL",
              help="Optuna storage URL of the search (default: sqlite file OUT.search.db).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--force-overwrite", is_flag=True, help="Replace OUT when it is an earlier artifact.")
@_input_options
def compile(src: str, out: str, pipeline: str | None, config: str | None, backend: str,
            timings: bool, dump_ir: str | None, verify_each: bool, no_check: bool, evaluate: bool,
            max_drop: str | None, force: bool, strict: bool, target: str | None,
            tune_trials: int, tune_timeout: float | None, objective: str, time_budget: str,
            trials: int, trial_cost: str, study: str | None, as_json: bool,
            force_overwrite: bool, input_shapes: str | None,
            example_inputs: str | None) -> None:  # noqa: A001 - the command's name
    """Optimize SRC (.onnx, HF folder, zoo:NAME) and write a deployable artifact to OUT.

    With --target, search drop/prune/fuse/quantize combinations within --max-drop and emit the
    cheapest that holds the budget on held-out data (the lossless pipeline when none does)."""
    from winnow.driver.compile import compile_model

    user_inputs = _user_inputs(input_shapes, example_inputs)
    backend_options = None
    if backend != "ort":  # --target names the backend's target (TVM: host, aarch64)
        backend_options, target = ({"target": target} if target is not None else {}), None
    if tune_trials or tune_timeout is not None:
        if backend != "tvm":
            from winnow.errors import TargetError

            raise TargetError("--tune-trials and --tune-timeout tune the TVM backend's kernels; "
                              "add --backend tvm.")
        backend_options.update(tune_trials=tune_trials, tune_builder_timeout=tune_timeout)
    if target is not None:
        _compile_search(src, out, pipeline or config, target, objective, time_budget, trials,
                        study, max_drop, force_overwrite, as_json, user_inputs, trial_cost)
        return
    max_drop = DEFAULT_MAX_DROP if max_drop is None else max_drop
    result = compile_model(src, out, pipeline=pipeline, config=config, backend=backend,
                           timings=timings, dump_ir=dump_ir, verify_each=verify_each,
                           overwrite=force_overwrite, check=not no_check, evaluate=evaluate,
                           max_drop=max_drop, force=force, strict=strict,
                           user_inputs=user_inputs, backend_options=backend_options)
    if as_json:
        _dump(result.to_dict())
        return
    _print_compile(result, timings)


def _compile_search(src: str, out: str, pipeline: str | None, target: str, objective: str,
                    time_budget: str, trials: int, study: str | None, max_drop: str | None,
                    overwrite: bool, as_json: bool, user_inputs: Any = None,
                    trial_cost: str = "predicted") -> None:
    from winnow.driver import SearchOptions, search_compile
    from winnow.driver.search import SearchOptionError, parse_duration

    if pipeline is not None:
        raise SearchOptionError("--target searches the pipeline itself; drop --pipeline/--config, "
                                "or drop --target to run the pipeline you give.")
    options = SearchOptions(target=target, objective=objective, trials=trials, study=study,
                            time_budget=parse_duration(time_budget), trial_cost=trial_cost,
                            max_drop="0.01" if max_drop is None else max_drop)
    search = search_compile(src, out, options, overwrite=overwrite, user_inputs=user_inputs,
                            started_at=STARTED_AT)
    if as_json:
        _dump(dict(search.compile.to_dict(), search=search.to_dict()))
        return
    _print_compile(search.compile, False)
    click.echo("\n".join(_search_lines(search)))


def _search_lines(search: Any) -> list[str]:
    from winnow.driver.search import by_batch_text

    lines = ["", f"search    {search.trials} trials in {search.seconds:.0f} s, functional-hash "
                 f"cache hits {search.cache_hits} ({search.study})",
             f"judged    trials on {search.judged_on['trials']}; finalists on "
             f"{search.judged_on['finalists']}",
             "pareto front (cost relative to the source; drop on the judging data):"]
    for cand in search.front:
        held = "" if cand.heldout_drop is None else f"  held-out drop {cand.heldout_drop:.4f}"
        held += "" if cand.measured_cost is None else f", measured x{cand.measured_cost:.3f}"
        held += by_batch_text(cand)
        lines.append(f"  x{cand.cost:.3f}  drop {cand.drop:.4f}  {cand.pipeline}{held}")
    lines.append(search.message)
    return lines


def _print_compile(result: Any, timings: bool) -> None:
    params = result.params_after
    lines = [f"source    {result.source}", f"pipeline  {result.pipeline}",
             f"nodes     {result.nodes_before} -> {result.nodes_after}",
             f"params    {params['count']:,} ({_size(params['bytes'])})"]
    lines += _pass_lines(getattr(result, "passes", None) or [])
    if result.fidelity is not None:
        lines.append(f"fidelity  {_fidelity_text(result.fidelity)}")
        lines += [_rollback_text(r) for r in result.fidelity.get("rolled_back") or []]
        lines += [f"note      {note}" for note in result.fidelity.get("notes") or []]
        if result.fidelity.get("heldout"):
            lines.append(f"held-out  {_heldout_text(result.fidelity['heldout'])}")
        if result.fidelity.get("budget"):
            b = result.fidelity["budget"]
            over = b["drop"] > b["max_drop"]
            limit = f"{b['max_drop'] * 100:g}%" if b.get("relative") else b["max_drop"]
            lines.append(f"budget    {b['measure']} {b['drop']:.4f} "
                         f"{'exceeds' if over else '<='} {limit}"
                         + (" (forced)" if b["forced"] and over else ""))
    runtime = result.artifact.manifest.get("runtime")
    if runtime:
        lines.append(f"runtime   {runtime_text(runtime)}")
    lines.append(f"wrote     {result.artifact.path}/")
    for name, size in result.file_sizes().items():
        lines.append(f"  {name:<34} {_size(size):>10}")
    ort_format = result.artifact.manifest.get("ort_format") or {}
    if ort_format.get("error"):
        lines.append(f"  model.ort not written: {ort_format['error']}")
    if timings:
        lines += ["", result.timing_table()]
    click.echo("\n".join(lines))


def runtime_text(runtime: dict[str, Any]) -> str:
    """The manifest's tuned thread counts as one line, e.g. 'b1 1 (0.0114 vs 0.0154 ms on 2)'."""
    chosen = runtime.get("intra_op_num_threads") or {}
    if not chosen:
        return runtime.get("note", "threads: every CPU")
    default = runtime.get("default_threads")
    parts = []
    for label, threads in chosen.items():
        medians = runtime.get("median_ms", {}).get(label, {})
        if threads == default:
            parts.append(f"{label} {threads} (every CPU)")
        else:
            parts.append(f"{label} {threads} ({medians.get(str(threads), 0):.3g} vs "
                         f"{medians.get(str(default), 0):.3g} ms on {default})")
    return "ORT intra-op threads: " + ", ".join(parts)


def _pass_lines(passes: list[dict[str, Any]]) -> list[str]:
    """One line per lossy pass saying what it did, and which passes --verify-each checked."""
    lines = []
    for p in passes:
        if p.get("lossless", True):
            continue
        report = p.get("report") if isinstance(p.get("report"), dict) else {}
        nodes = p.get("nodes") or {}
        what = report.get("summary") or report.get("note") or (
            f"changed the model ({nodes.get('before')} -> {nodes.get('after')} nodes)"
            if p.get("modified") else "changed nothing")
        lines.append(f"lossy     {p['name']}: {what}")
    checked = [p["name"] for p in passes if str(p.get("verified", "")).startswith("passed")]
    if any("verified" in p for p in passes):
        lines.append(f"verified  after {', '.join(checked) or 'no pass (none changed the model)'}"
                     " (checker, shape inference, lint)")
    return lines


def _fidelity_text(fid: dict[str, Any]) -> str:
    if fid.get("measured") is False:
        return f"not measured: {fid['reason']}"
    err, cos = fid.get("max_abs_error"), fid.get("min_cosine")
    if err is None:
        return f"not comparable: {fid.get('error', 'no numeric outputs')}"
    return f"max abs error {err:.3g}, min cosine {cos:.6f} vs source (inputs: {fid.get('feeds')})"


def _rollback_text(record: dict[str, Any]) -> str:
    from winnow.passes.instruments import difference_text

    return (f"rollback  lossless pass '{record['pass']}' {difference_text(record)}; "
            "its change was undone")


def _heldout_text(fid: dict[str, Any]) -> str:
    parts = [f"cosine {fid['cosine']:.5f}"]
    if fid.get("top1") is not None:
        parts.append(f"top-1 {fid['top1']:.4f}")
    if fid.get("metric_name") and fid.get("candidate_metric") is not None:
        parts.append(f"{fid['metric_name']} {fid['reference_metric']:.4f} -> "
                     f"{fid['candidate_metric']:.4f}")
    return ", ".join(parts) + f" ({fid['samples']} held-out samples)"


@cli.command()
@click.argument("src")
@click.option("-o", "--out", required=True, metavar="OUT", help="Folder for analysis.json and report.html.")
@click.option("--passes", "passes_text", default="layer-similarity,das-skip", show_default=True,
              metavar="TEXT", help="Analysis passes to run (pipeline text).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (analysis.json and the files).")
@click.option("--force-overwrite", is_flag=True, help="Replace OUT when it is an earlier winnow output.")
@_input_options
def analyze(src: str, out: str, passes_text: str, as_json: bool, force_overwrite: bool,
            input_shapes: str | None, example_inputs: str | None) -> None:
    """Measure where SRC is redundant; write analysis.json and report.html (plots) to OUT."""
    from winnow.driver.analyze import analyze_model

    result = analyze_model(src, out, passes=passes_text, overwrite=force_overwrite,
                           user_inputs=_user_inputs(input_shapes, example_inputs))
    if as_json:
        _dump(result.to_dict())
        return
    _print_analysis(result)


def _print_analysis(result: Any, top: int = 3) -> None:
    data = result.data
    calib = data["calibration"]
    lines = [f"source    {data['source']}", f"passes    {data['passes']}",
             f"data      {calib['batches']} batches, {calib['samples']} samples ({calib['source']})"]
    blocks = result.blocks
    if blocks:
        subs = sum(len(b.get("parts", [])) for b in blocks)
        lines.append(f"regions   {len(blocks)} blocks" + (f", {subs} sub-layers" if subs else "")
                     + f" (found from {data['regions']['source']})")
    else:
        lines.append("regions   no residual blocks detected: nothing to score")
    for name, res in result.analyses.items():
        res = res if isinstance(res, dict) else {}
        seconds = res.get("seconds")
        lines.append(f"{name}" + (f"  ({seconds:.1f} s)" if isinstance(seconds, float) else ""))
        if res.get("note"):
            lines.append(f"  {res['note']}")
            continue
        lines += _ranking_lines(res, top)
        unmeasured = res.get("not_measurable") or {}
        if unmeasured:
            name, reason = next(iter(unmeasured.items()))
            lines.append(f"  {'unmeasured':<10} {len(unmeasured)} region(s), never ranked "
                         f"(e.g. {name}: {reason})")
    lines.append(f"wrote     {result.path}/")
    for name, size in result.file_sizes().items():
        lines.append(f"  {name:<16} {_size(size):>10}")
    if data.get("next"):
        lines.append(f"apply     {data['next']}")
    click.echo("\n".join(lines))


def _ranking_lines(res: dict[str, Any], top: int) -> list[str]:
    ranking = res.get("ranking")
    scores = {r.get("name"): r for r in res.get("regions", []) if isinstance(r, dict)}

    def label(name: str) -> str:
        r = scores.get(name, {})
        if "cos" in r:
            return f"{name} (cos {r['cos']:.4f})"
        if "p" in r:
            return f"{name} (p {r['p']:.3f})"
        return name

    if isinstance(ranking, dict):
        return [f"  {level:<10} {', '.join(label(n) for n in order[:top])}"
                for level, order in ranking.items() if order]
    if isinstance(ranking, list) and ranking:
        out = [f"  {res.get('level', 'ranking'):<10} {', '.join(label(n) for n in ranking[:top])}"]
        if res.get("selected"):
            out.append(f"  {'selected':<10} {', '.join(res['selected'])} (k={res.get('k')})")
        return out
    return []


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--markdown", is_flag=True, help="Print the pass reference as a Markdown table.")
def passes(as_json: bool, markdown: bool) -> None:
    """List every registered pass with its options (plugins that fail to load: warnings)."""
    from winnow.passes import plugin_problems, registered_passes
    from winnow.passes.config import config_fields
    from winnow.passes.reference import markdown_table

    for problem in plugin_problems():
        click.echo(f"warning: {problem}", err=True)
    if markdown:
        click.echo(markdown_table(registered_passes()), nl=False)
        return
    info = [{"name": name, "description": cls.description, "lossless": cls.lossless,
             "fields": config_fields(cls.Config)} for name, cls in registered_passes().items()]
    if as_json:
        _dump(info)
        return
    for p in info:
        click.echo(f"{p['name']:<18} {p['description']}")
        for f in p["fields"]:
            click.echo(f"    {f['name']}: {f['type']} = {f['default']!r}  {f['help']}")


@cli.command()
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(src: str, as_json: bool) -> None:
    """Show a model's opsets, inputs/outputs, ops and parameters."""
    from winnow.driver.compile import inspect_model

    info = inspect_model(src)
    if as_json:
        _dump(info)
        return
    click.echo(f"source    {info['source']}")
    opsets = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in info["opset_imports"].items())
    click.echo(f"opsets    {opsets}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            click.echo(f"{kind[:-1]:<9} {v['name']}  {v['dtype']}  {v['shape']}")
    click.echo(f"params    {info['params']['count']:,} ({_size(info['params']['bytes'])})")
    click.echo(f"nodes     {info['nodes']}")
    for op, n in info["ops"].items():
        click.echo(f"  {op:<30} {n:>6}")
    if "regions" in info:
        blocks = info["regions"]["blocks"]
        click.echo(f"regions   {len(blocks)} blocks (found from {info['regions']['source']})")
        for block in blocks:
            click.echo(f"  {block['name']:<30} {block['kind']:<10} {block['nodes']:>5} nodes"
                       f"{'' if block['droppable'] else '  (not droppable)'}")


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz", delete=False) as f:
            np.savez(f, **arrays)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(f.name, 0o666 & ~mask)  # a temporary file is 0600; give the usual mode
        os.replace(f.name, path)
    except OSError as exc:
        from winnow.errors import OutputError

        raise OutputError(f"cannot write '{path}': {exc.strerror or exc}.") from None


@cli.command(name="run")
@click.argument("artifact")
@click.option("--inputs", "--example-inputs", "inputs_path", default=None, metavar="FILE.npz",
              help=".npz file with one array per input.")
@click.option("--input-shapes", default=None, metavar="TEXT",
              help="Run on random data of these shapes instead, e.g. 'input=1,512;state=2,1,128'.")
@click.option("-o", "--out", default=None, metavar="OUT.npz", help="Write the outputs to this .npz file.")
def run_cmd(artifact: str, inputs_path: str | None, input_shapes: str | None,
            out: str | None) -> None:
    """Run a compiled artifact on inputs from an .npz file (or random data of given shapes)."""
    from winnow.backends import run_artifact
    from winnow.backends.ort import load_artifact
    from winnow.errors import InputsError
    from winnow.ir.user_inputs import load_npz

    if inputs_path is None and input_shapes is None:
        raise InputsError("give the inputs to run on: --inputs FILE.npz, or --input-shapes "
                          "'name=D1,D2,...' for random data.")
    if input_shapes is not None:
        specs = load_artifact(artifact).manifest.get("inputs") or []
        feeds = _user_inputs(input_shapes, inputs_path).feeds(specs)
    else:
        feeds = load_npz(inputs_path, "--inputs")
    outputs = run_artifact(artifact, feeds)
    for name, value in outputs.items():
        value = np.asarray(value)
        click.echo(f"{name}  {value.dtype}  {list(value.shape)}")
    if out is not None:
        _save_npz(out, {k: np.asarray(v) for k, v in outputs.items()})
        click.echo(f"wrote {out}")


@cli.command()
@click.argument("artifact")
@click.option("--vs", "other", default=None, metavar="OTHER_DIR", help="A second artifact, timed interleaved with the first (A B A B ...).")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N", help="ONNX Runtime intra-op threads [default: each artifact's manifest count for this batch, tuned at compile; else the CPUs this process may use].")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, metavar="B", help="Size of each input's symbolic first dim.")
@click.option("--seq", type=click.IntRange(min=1), default=None, metavar="S", help="Size of the other symbolic dims [random feeds: 64; zoo feeds: their own length, cropped to S].")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, metavar="R", help="Timed runs per artifact.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, metavar="W", help="Untimed runs per artifact first.")
@click.option("--random-feeds", is_flag=True, help="Random feeds even when the source is a zoo model.")
@click.option("--rotate", type=click.IntRange(min=1), default=16, show_default=True, metavar="N", help="Zoo feeds: time N groups of held-out samples in turn, one a round (1: the first samples only).")
@click.option("--no-rss", is_flag=True, help="Skip the peak-memory measurement (a fresh process per artifact).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_input_options
def bench(artifact: str, other: str | None, threads: int | None, batch: int, seq: int | None,
          repeats: int, warmup: int, random_feeds: bool, rotate: int, no_rss: bool,
          as_json: bool, input_shapes: str | None, example_inputs: str | None) -> None:
    """Time ARTIFACT (and OTHER_DIR): median/min/max latency, A/B ratio, peak RSS.

    --input-shapes / --example-inputs replace the feeds --batch and --seq would build."""
    from winnow.driver.bench import bench as run_bench

    result = run_bench(artifact, other, threads=threads, batch=batch, seq=seq, repeats=repeats,
                       warmup=warmup, random=random_feeds, memory=not no_rss,
                       user_inputs=_user_inputs(input_shapes, example_inputs), rotate=rotate)
    if as_json:
        _dump(result.to_dict())
    else:
        click.echo(result.table())
    for line in result.warnings:
        click.echo(line, err=True)


@cli.command()
@click.argument("artifact")
@click.option("--edge", is_flag=True, required=True, help="Write an edge bundle (the only export kind).")
@click.option("-o", "--out", required=True, metavar="BUNDLE", help="Bundle folder to write.")
@click.option("--target", default=None, metavar="T", help="Device: host or aarch64 [default: the artifact's target].")
@click.option("--json", "as_json", is_flag=True, help="Print the bundle's manifest as JSON.")
@click.option("--force-overwrite", is_flag=True, help="Replace BUNDLE when it is an earlier bundle.")
def export(artifact: str, edge: bool, out: str, target: str | None, as_json: bool,
           force_overwrite: bool) -> None:
    """Package ARTIFACT for a device: model, runtime config, samples, expected outputs, run.py."""
    from winnow.backends.edge_export import export_edge

    bundle = export_edge(artifact, out, target=target, overwrite=force_overwrite)
    if as_json:
        _dump(dict(bundle.manifest, sizes=bundle.sizes()))
        return
    click.echo(bundle.table())


class _CostGroup(_Group):
    """`winnow cost SRC ...` predicts; `winnow cost calibrate ...` fits the host profile."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Route anything that is not a subcommand (or help) to the hidden `model` command."""
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["model", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_CostGroup)
def cost() -> None:
    """Predicted latency and energy per kernel: `winnow cost SRC --target T`, `winnow cost calibrate`."""


def _shapes(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, _, size = item.partition("=")
        try:
            dims = [int(d) for d in size.lower().split("x")]
        except ValueError:
            raise click.BadParameter(f"'{item}' is not NAME=SIZE or NAME=D1xD2x...",
                                     param_hint="--shape") from None
        out[name] = dims[0] if len(dims) == 1 and "x" not in size.lower() else dims
    return out


@cost.command(name="model", hidden=True)
@click.argument("src")
@click.option("--target", default="host", show_default=True, metavar="T", help="Target profile name or .toml file.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=SIZE", help="A symbolic dim (batch=8) or an input's shape (x=1x3x48x320); repeatable.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=1), help="Kernels to list.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cost_model_cmd(src: str, target: str, shapes: tuple[str, ...], top: int, as_json: bool) -> None:
    """Predict SRC's latency and energy on target T: top kernels, roofline vs predicted."""
    from winnow.cost_model import predict

    report = predict(src, target, _shapes(shapes))
    if as_json:
        _dump(report.to_dict())
    else:
        click.echo(report.table(top))


@cost.command(name="calibrate")
@click.option("--quick", is_flag=True, help="A short suite (about 2 minutes on a quiet host).")
@click.option("--out", default=None, metavar="FILE.toml", help="Where to write the profile [default: ~/.cache/winnow/targets/host.toml].")
@click.option("--repeats", default=None, type=click.IntRange(min=1), metavar="R", help="Timed rounds [7 quick, 21 full].")
@click.option("--threads", default=None, type=click.IntRange(min=1), metavar="N", help="ORT intra-op threads [the CPUs this process may use].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cost_calibrate(quick: bool, out: str | None, repeats: int | None, threads: int | None,
                   as_json: bool) -> None:
    """Time micro-benchmarks through ORT on this host and write the fitted `host` profile."""
    from winnow.cost_model.calibrate import calibrate, summary

    path, data, times = calibrate(quick=quick, out=out, repeats=repeats, threads=threads)
    if as_json:
        _dump({"path": str(path), "profile": data, "median_s": times})
    else:
        click.echo(summary(path, data, times))


@cli.group()
def search() -> None:
    """The compile search's scale-out: `winnow search worker --study URL` joins a running search."""


@search.command(name="worker")
@click.option("--study", "url", required=True, metavar="URL", help="The study database the compile was given with --study (e.g. postgresql://user@host/db).")
@click.option("--wait", default=0.0, show_default=True, type=click.FloatRange(min=0), metavar="SECONDS", help="Wait this long for a compile to create the study.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def search_worker(url: str, wait: float, as_json: bool) -> None:
    """Run trials of the winnow search at URL until its trial or time budget is spent."""
    from winnow.driver.worker import run_worker

    result = run_worker(url, wait=wait)
    if as_json:
        _dump(result.to_dict())
    else:
        click.echo(f"worker    ran {result.trials_run} trial(s) of study {result.study} "
                   f"({result.source})")


def _attach_zoo() -> None:
    from winnow.models_zoo.cli import zoo

    cli.add_command(zoo)


_attach_zoo()


def main() -> None:
    """Entry point of the `winnow` command."""
    try:
        cli(prog_name="winnow")
    except SystemExit:
        _flush_stdout()
        raise


def _flush_stdout() -> None:
    """Flush stdout now; a reader that went away (`| head`) ends the command quietly."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


if __name__ == "__main__":
    sys.exit(main())
