"""TVM coverage of the onnx package's shipped models (onnx/backend/test/data, the corpus of
tests/test_roundtrip_onnx_corpus.py): how many import, build with winnow's schedules and run on
the host with outputs matching the oracle, and the failures grouped by reason.

The oracle is the shipped expected outputs when ONNX Runtime (or onnx's reference evaluator, for
what ORT cannot run) reproduces them on the shipped inputs, else that runtime's outputs; a model
neither runs has no oracle and is counted apart. Each model is bound to its feeds' shapes as
`winnow compile --backend tvm` binds it. The cases run in a worker process, restarted past a
case that crashes it. Markdown printed and saved under bench/results/.

    python bench/tvm_coverage.py [--groups light,simple,...] [--limit N] [--timeout 300]
                                 [--budget SECONDS]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Run as a script, this file's folder leads sys.path and its name would shadow the tvm package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
PASSED, NO_ORACLE = "passed", "no oracle"
MARK = "@@case "  # a worker's result lines start with this (libraries print to stdout too)


def _corpus() -> Any:
    """tests/onnx_corpus.py, imported from the repository (tests/ is no package of the wheel)."""
    sys.path.insert(0, str(REPO))
    from tests import onnx_corpus

    return onnx_corpus


def _reason(exc: Exception) -> str:
    """The last line of an error, without the per-model details that would split a group."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:160]


def oracle(case: Any, model: Any, feeds: dict[str, np.ndarray]) -> tuple[list | None, str]:
    """The outputs to match and where they come from (None when no runtime runs the source)."""
    from onnx.reference import ReferenceEvaluator

    from winnow.errors import ExecutionError
    from winnow.ir.execute import run

    try:
        outputs, runtime = list(run(model, feeds).values()), "ORT"
    except ExecutionError:
        try:
            outputs = list(ReferenceEvaluator(str(case.model_path)).run(None, feeds))
            runtime = "reference evaluator"
        except Exception:  # noqa: BLE001 - the evaluator raises many types
            return None, "none"
    shipped = case.expected_outputs()
    corpus = _corpus()
    if shipped is not None and len(shipped) == len(outputs) and all(
            corpus.outputs_close(o, s) for o, s in zip(outputs, shipped)):
        return shipped, "shipped"
    return outputs, runtime


def run_case(case: Any) -> dict[str, Any]:
    """Bind, import, build and run one shipped model with TVM; the outcome and its reason."""
    import tvm
    from tvm import relax

    import winnow
    from winnow.backends import tvm as tvm_backend
    from winnow.errors import UnsupportedModelError
    from winnow.ir.inputs import random_feeds

    model = winnow.load(case.model_path)
    names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    feeds = case.inputs(names) or random_feeds(model, seed=0)
    want, against = oracle(case, model, feeds)
    if want is None:
        return {"outcome": NO_ORACLE, "reason": "neither ORT nor the reference evaluator runs it"}
    stage = "bind shapes"
    try:
        bound = tvm_backend.prepare(model, {k: list(np.shape(v)) for k, v in feeds.items()})
        stage = "import"
        mod = tvm_backend.to_relax(bound)
        stage = "build"
        executable = tvm_backend.build(mod, tvm_backend.resolve_target("host"))
        stage = "run"
        vm = relax.VirtualMachine(executable, tvm.cpu())
        inputs = [v.name for v in bound.graph.inputs if v.name not in bound.graph.initializers]
        got = tvm_backend.vm_outputs(vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(
            feeds[n])) for n in inputs]))
    except UnsupportedModelError as exc:
        return {"outcome": f"fails at {stage}", "reason": _reason(exc), "against": against}
    except Exception as exc:  # noqa: BLE001 - TVM raises many unrelated types
        return {"outcome": f"fails at {stage}", "reason": f"{type(exc).__name__}: {_reason(exc)}",
                "against": against}
    corpus = _corpus()
    if len(got) != len(want):
        return {"outcome": "wrong outputs", "reason": f"{len(got)} outputs, expected {len(want)}",
                "against": against}
    for index, (g, w) in enumerate(zip(got, want)):
        if not corpus.outputs_close(g, w):
            detail = (f"shape {list(np.shape(g))} vs {list(np.shape(w))}"
                      if np.shape(g) != np.shape(w) else "values differ beyond 1e-4")
            return {"outcome": "wrong outputs", "reason": f"output {index}: {detail}",
                    "against": against}
    return {"outcome": PASSED, "reason": "", "against": against}


def worker(ids: list[str]) -> None:
    """Run the cases `ids` in order, one JSON line per case on stdout (flushed)."""
    cases = {c.id: c for c in _corpus().collect()}
    for case_id in ids:
        start = time.perf_counter()
        try:
            result = run_case(cases[case_id])
        except Exception as exc:  # noqa: BLE001 - loading or oracle failures of odd models
            result = {"outcome": "fails before TVM", "reason": _reason(exc)}
        result.update(id=case_id, seconds=round(time.perf_counter() - start, 1))
        print(MARK + json.dumps(result), flush=True)


def run_all(ids: list[str], timeout: float, budget: float | None = None) -> list[dict[str, Any]]:
    """Every case through worker processes; a case that kills or stalls its worker is recorded
    as a crash (or timeout) and the next worker starts after it. With `budget` seconds, the
    cases not reached by then are left out (the table says how many)."""
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    while len(results) < len(ids):
        if budget is not None and time.perf_counter() - start > budget:
            break
        todo = ids[len(results):]
        proc = subprocess.Popen([sys.executable, __file__, "--worker", ",".join(todo)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout is not None
        import selectors

        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        current = len(results)
        while True:
            if not selector.select(timeout):
                proc.kill()
                results.append({"id": ids[current], "outcome": "timeout",
                                "reason": f"over {timeout:.0f} s"})
                break
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                if len(results) < len(ids):
                    results.append({"id": ids[len(results)], "outcome": "crash",
                                    "reason": f"the process died (exit {proc.returncode})"})
                break
            if not line.startswith(MARK):
                continue
            results.append(json.loads(line[len(MARK):]))
            if budget is not None and time.perf_counter() - start > budget:
                proc.kill()
                print(f"budget of {budget:.0f} s spent", file=sys.stderr)
                break
            print(f"{results[-1]['id']}: {results[-1]['outcome']} {results[-1]['reason']}",
                  file=sys.stderr, flush=True)
            current = len(results)
        proc.stdout.close()
    return results


def markdown(results: list[dict[str, Any]], total: int) -> str:
    """The count line, outcomes by oracle, and the failures grouped by reason."""
    passed = [r for r in results if r["outcome"] == PASSED]
    oracled = [r for r in results if r["outcome"] != NO_ORACLE]
    lines = [f"**{len(passed)} of {len(oracled)}** models with an oracle import, build and match "
             f"it through TVM ({len(results) - len(oracled)} more have no oracle: neither ORT nor "
             "the reference evaluator runs them)."
             + (f" {total - len(results)} of the {total} cases were not reached within the "
                "time budget." if total > len(results) else ""), ""]
    by_oracle = defaultdict(int)
    for r in passed:
        by_oracle[r.get("against", "?")] += 1
    lines += ["passed against: " + ", ".join(f"{k} {v}" for k, v in sorted(by_oracle.items())),
              "", "| outcome | reason | count | models |", "|---|---|---|---|"]
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in results:
        if r["outcome"] != PASSED:
            groups[(r["outcome"], r["reason"])].append(r["id"])
    for (outcome, reason), ids in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(ids[:6]) + (f", ... ({len(ids) - 6} more)" if len(ids) > 6 else "")
        lines.append(f"| {outcome} | {reason.replace('|', '/')} | {len(ids)} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse options, run the corpus, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=None, help="comma-separated corpus groups [all]")
    parser.add_argument("--limit", type=int, default=None, help="first N cases only")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; cases not reached are left out")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker.split(","))
        return
    from winnow.measure.timing import machine_info

    cases = _corpus().collect()
    if args.groups:
        cases = [c for c in cases if c.group in args.groups.split(",")]
    ids = [c.id for c in cases][:args.limit]
    start = time.perf_counter()
    results = run_all(ids, args.timeout, args.budget)
    info = machine_info()
    text = (f"# TVM coverage of the onnx package's shipped models "
            f"({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)\n\n"
            f"host: {info}\n\ncommand: python bench/tvm_coverage.py {' '.join(sys.argv[1:])} "
            f"({time.perf_counter() - start:.0f} s)\n\n" + markdown(results, len(ids)) + "\n")
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"tvm-coverage-{datetime.datetime.now(datetime.UTC):%Y-%m-%d-%H%M}.md"
        path.write_text(text)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
