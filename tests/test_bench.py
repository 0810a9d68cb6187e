"""`winnow bench`, the timing helpers and bench/peers.py (fields and plumbing, never speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from winnow.driver.bench import INT_HIGH, build_feeds, feed_groups, random_feeds, zoo_feeds
from winnow.measure.timing import (
    Timing,
    available_cpus,
    paired_ratios,
    peak_rss_mb,
    rotating,
    time_interleaved,
)
from winnow.cli import cli
from winnow.driver.compile import compile_model
from winnow.errors import ExecutionError, SourceError, UnsupportedModelError

REPO = Path(__file__).resolve().parents[1]
TIMING_FIELDS = {"label", "path", "source", "pipeline", "median_ms", "min_ms", "max_ms", "runs",
                 "noisy", "spread", "peak_rss_mb"}


def invoke(*args: object):
    """Run the CLI in-process (quiet) and return click's Result."""
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


@pytest.fixture
def artifacts(tiny_model_path: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two artifacts of the tiny model: the default pipeline and 'cse' only."""
    a, b = tmp_path / "a", tmp_path / "b"
    compile_model(tiny_model_path, a)
    compile_model(tiny_model_path, b, pipeline="cse")
    return a, b


def test_bench_vs_json_has_every_field(artifacts):
    a, b = artifacts
    result = invoke("bench", a, "--vs", b, "--repeats", 5, "--warmup", 1, "--batch", 3, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert [x["label"] for x in info["artifacts"]] == ["A", "B"]
    for entry in info["artifacts"]:
        assert TIMING_FIELDS <= set(entry)
        assert entry["runs"] == 5 and isinstance(entry["noisy"], bool)
        assert entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
        assert entry["peak_rss_mb"] > 0
    assert {"median", "min", "max", "pairs", "speedup"} <= set(info["ratio"])
    assert info["ratio"]["pairs"] == 5 and info["ratio"]["min"] <= info["ratio"]["max"]
    assert info["settings"]["batch"] == 3 and info["settings"]["repeats"] == 5
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": [3, 16]}]
    assert info["agreement"]["max_abs_error"] < 1e-4  # same model, two pipelines
    assert isinstance(info["warnings"], list)
    assert all(w.startswith("warning: ") for w in info["warnings"])


def test_bench_single_artifact_table(artifacts):
    a, _ = artifacts
    result = invoke("bench", a, "--repeats", 3, "--no-rss", "--threads", 1)
    assert result.exit_code == 0, result.output
    for needle in ("median ms", "min ms", "max ms", "peak RSS MB", str(a), "1 thread"):
        assert needle in result.stdout
    assert "A/B latency ratio" not in result.stdout


@pytest.mark.parametrize("case", ["missing", "not-artifact", "corrupt-manifest", "vs-missing"])
def test_bad_artifact_is_one_error_exit_2(case, artifacts, tmp_path):
    a, _ = artifacts
    args = {"missing": [tmp_path / "nope"], "not-artifact": [tmp_path],
            "corrupt-manifest": [tmp_path / "bad"], "vs-missing": [a, "--vs", tmp_path / "nope"]}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    result = invoke("bench", *args[case], "--repeats", 1)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output


def test_bench_vs_needs_the_same_inputs(artifacts, tmp_path):
    a, _ = artifacts
    graph = helper.make_graph([helper.make_node("Relu", ["z"], ["y"])], "other",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])])
    src = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), src)
    compile_model(src, tmp_path / "other")
    result = invoke("bench", a, "--vs", tmp_path / "other", "--repeats", 1, "--no-rss")
    assert result.exit_code == 2
    assert "same inputs" in result.output


def test_modified_artifact_is_refused(artifacts):
    a, _ = artifacts
    with open(a / "model.onnx", "ab") as f:
        f.write(b"\0")
    result = invoke("bench", a, "--repeats", 1)
    assert result.exit_code == 2 and "checksum" in result.output


def test_feeds_from_symbolic_specs():
    specs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
             {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
             {"name": "pixels", "dtype": "float32", "shape": ["N", 3, None, "W"]},
             {"name": "flag", "dtype": "bool", "shape": [2]},
             {"name": "scale", "dtype": "float16", "shape": []}]
    feeds = random_feeds(specs, batch=4, seq=7)
    assert feeds["input_ids"].shape == (4, 7) and feeds["input_ids"].dtype == np.int64
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < INT_HIGH
    assert len(np.unique(feeds["input_ids"])) > 1
    assert (feeds["attention_mask"] == 1).all() and feeds["attention_mask"].dtype == np.int64
    assert feeds["pixels"].shape == (4, 3, 7, 7) and feeds["pixels"].dtype == np.float32
    assert feeds["flag"].shape == (2,) and feeds["scale"].shape == ()
    assert feeds["scale"].dtype == np.float16
    again = random_feeds(specs, batch=4, seq=7)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)  # seeded


def test_random_feeds_default_seq_and_bad_specs():
    feeds, description = build_feeds({"inputs": [{"name": "ids", "dtype": "int32",
                                                  "shape": ["b", "s"]}], "source": "x.onnx"})
    assert feeds["ids"].shape == (1, 64) and description.startswith("random")
    with pytest.raises(UnsupportedModelError, match="no known rank"):
        random_feeds([{"name": "x", "dtype": "float32", "shape": None}])


def test_zoo_source_uses_heldout_data():
    from winnow import models_zoo

    specs = [{"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    feeds, description = build_feeds({"inputs": specs, "source": "zoo:digits-cnn"}, batch=5)
    first = models_zoo.get("digits-cnn").heldout()[0]["pixels"]
    np.testing.assert_array_equal(feeds["pixels"], first[:5])
    assert "held-out" in description
    big = zoo_feeds("digits-cnn", specs, batch=1000)  # more than the split: rows repeat
    assert big["pixels"].shape == (1000, 1, 8, 8)
    random, text = build_feeds({"inputs": specs, "source": "zoo:digits-cnn"}, random=True)
    assert text.startswith("random") and random["pixels"].shape == (1, 1, 8, 8)
    with pytest.raises(SourceError, match="no input"):
        zoo_feeds("digits-cnn", [{"name": "other", "dtype": "float32", "shape": [1]}])


def test_zoo_feeds_rotate_through_consecutive_heldout_groups():
    from winnow import models_zoo

    specs = [{"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    manifest = {"inputs": specs, "source": "zoo:digits-cnn"}
    groups, description = feed_groups(manifest, batch=2, rotate=3)
    rows = np.concatenate([b["pixels"] for b in models_zoo.get("digits-cnn").heldout()])
    assert [g["pixels"].shape for g in groups] == [(2, 1, 8, 8)] * 3
    for i, group in enumerate(groups):
        np.testing.assert_array_equal(group["pixels"], rows[2 * i:2 * i + 2])
    assert "3 groups of 2 in turn" in description
    assert len(feed_groups(manifest, batch=2, rotate=3, random=True)[0]) == 1


def test_timing_statistics_and_noise_warning():
    steady = Timing("A", [0.010, 0.011, 0.012])
    assert steady.median == 0.011 and not steady.noisy and steady.noise_warning() is None
    noisy = Timing("B", [0.010, 0.011, 0.030])
    assert noisy.noisy and noisy.spread == pytest.approx(3.0)
    assert noisy.noise_warning().startswith("warning: B timings are noisy")
    assert noisy.to_dict()["max_ms"] == pytest.approx(30.0)
    ratios = paired_ratios(Timing("a", [2.0, 4.0, 6.0]), Timing("b", [1.0, 1.0, 2.0]))
    assert ratios == {"median": 3.0, "min": 2.0, "max": 4.0}


def test_rotated_timings_judge_noise_among_runs_on_the_same_inputs():
    """Two input groups of very different lengths, steady on each: not noisy; the same spread
    inside one group is."""
    steady = Timing("a", [1.0, 3.0, 1.01, 3.03, 0.99, 2.98], period=2)
    assert steady.spread == pytest.approx(1.01 / 0.99) and not steady.noisy
    assert Timing("a", steady.samples).noisy  # unrotated, the lengths look like noise
    busy = Timing("a", [1.0, 3.0, 2.0, 3.0], period=2)
    assert busy.spread == pytest.approx(2.0) and busy.noisy
    assert Timing("a", [1.0, 3.0], period=2).noisy  # no group ran twice: all runs judged


def test_time_interleaved_alternates_order():
    calls: list[str] = []
    result = time_interleaved({"A": lambda: calls.append("A"), "B": lambda: calls.append("B")},
                              repeats=3, warmup=1)
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B"]
    assert [len(t.samples) for t in result.values()] == [3, 3]
    with pytest.raises(ValueError):
        time_interleaved({"A": lambda: None}, repeats=0)


def test_peak_rss_failure_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    with pytest.raises(ExecutionError, match="fresh process"):
        peak_rss_mb(bad, {"x": np.zeros(1, np.float32)}, 1, tmp_path)


@pytest.mark.slow
def test_peers_script_prints_every_row(tmp_path):
    out = tmp_path / "peers.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "peers.py"), "--models",
                           "digits-cnn", "--repeats", "3", "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout
    rows = [line for line in text.splitlines() if line.startswith("| digits-cnn |")]
    variants = [row.split("|")[2].strip() for row in rows]
    assert variants == ["torch eager", "ORT fp32", "ORT dyn int8", "ORT dyn int8 pc",
                        "ORT dyn int8 pc rr", "ORT dyn int8 MatMul", "ORT QDQ int8",
                        "ORT transformers"]
    for row in rows[:-1]:  # every runnable variant has a latency, a ratio and a metric
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[2] != "-" and cells[3].endswith("x") and "accuracy" in cells[7], row
    assert "n/a: not a transformer" in rows[-1]
    for needle in ("Command: `python", "--models digits-cnn", "Machine: ", "onnxruntime ",
                   "vs fp32"):
        assert needle in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["rows"]) == 8 and data["machine"]["available_cpus"] >= 1


def _layer_drop_script():
    """bench/layer_drop.py as a module (bench scripts are not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("layer_drop", REPO / "bench" / "layer_drop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _SessionSpy:
    """Records how every ORT session the harnesses build is configured and what it is fed."""

    def __init__(self, monkeypatch):
        import onnxruntime as ort

        self.runs: list[tuple[tuple[int, str], dict[str, tuple[int, ...]]]] = []
        real_run = ort.InferenceSession.run

        def run(session, output_names, feeds, *args, **kwargs):
            options = session.get_session_options()
            try:
                spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
            except Exception:  # noqa: BLE001 (ORT raises when the entry was never set)
                spinning = "default"
            setup = (options.intra_op_num_threads, spinning)
            self.runs.append((setup, {k: np.shape(v) for k, v in feeds.items()}))
            return real_run(session, output_names, feeds, *args, **kwargs)

        monkeypatch.setattr(ort.InferenceSession, "run", run)

    def take(self):
        """The distinct (session setup, feed shapes) seen since the last take."""
        seen = {(setup, tuple(sorted(shapes.items()))) for setup, shapes in self.runs}
        self.runs = []
        return seen


@pytest.mark.slow
def test_layer_drop_script_and_winnow_bench_time_one_drop_alike(tmp_path, monkeypatch):
    """bench/layer_drop.py's latency column and `winnow bench` time the same way: sessions with the
    same threads and no spin-waiting, fed one sample (the script once reported 2.43x where `winnow
    bench` measured 1.26x: its sessions spun and it timed a 60-row batch). Checked on the sessions
    themselves, not on timings, which a shared CI host makes noisy. `--threads` sets winnow
    bench to the script's count (by default it follows each manifest's tuned count)."""
    script = _layer_drop_script()
    spy, script_runs = _SessionSpy(monkeypatch), set()

    def timed_latency_ratio(*args, **kwargs):
        spy.take()
        ratio = real_latency_ratio(*args, **kwargs)
        script_runs.update(spy.take())
        return ratio

    real_latency_ratio = script.latency_ratio
    monkeypatch.setattr(script, "latency_ratio", timed_latency_ratio)
    rows = script.bench_model("digits-vit", [1], repeats=3, threads=None, levels=["block"],
                              replacements=("linear",), batch=1)
    region = next(r for r in rows if r[3].startswith("similarity"))[3].split("(")[1].rstrip(")")
    base, dropped = tmp_path / "base", tmp_path / "dropped"
    compile_model("zoo:digits-vit", base)
    assert invoke("compile", "zoo:digits-vit", "-o", dropped, "--max-drop", "1", "--pipeline",
                  f"drop-layers{{regions=[{region}],replacement=linear}}").exit_code == 0
    spy.take()
    result = invoke("bench", dropped, "--vs", base, "--repeats", 3, "--no-rss", "--json",
                    "--threads", available_cpus())
    assert result.exit_code == 0, result.output
    bench_runs = spy.take()
    assert len(bench_runs) == 1 and script_runs == bench_runs, (script_runs, bench_runs)
    (threads, spinning), shapes = next(iter(bench_runs))
    assert spinning == "0" and threads == available_cpus()
    assert all(shape[0] == 1 for _, shape in shapes), shapes


def test_peers_rotates_the_timed_samples_in_step_across_variants(peers_script):
    """Each round, every interleaved variant runs the same group of held-out samples, and the
    rounds walk through consecutive groups (wrapping around the split)."""
    peers = peers_script
    split = [{"x": np.arange(0, 3)[:, None]}, {"x": np.arange(3, 5)[:, None]}]
    groups = peers.row_groups(split, 2, 3)
    assert [g["x"][:, 0].tolist() for g in groups] == [[0, 1], [2, 3], [4, 0]]
    seen: dict[str, list[int]] = {"A": [], "B": []}
    runners = {k: rotating(lambda f, k=k: seen[k].append(int(f["x"][0, 0])), groups)
               for k in seen}
    time_interleaved(runners, repeats=4, warmup=1)
    assert seen["A"] == seen["B"] == [0, 2, 4, 0, 2]
