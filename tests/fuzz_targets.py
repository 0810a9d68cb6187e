"""Fuzz targets (hypothesis): mutated ONNX protobufs through `winnow compile`, Hugging Face
folders with mutated config.json and safetensors headers, pipeline text and YAML, and
`--input-shapes`. The property of every target: a bad input is a WinnowError with one sentence
(exit 2 and nothing at -o through the CLI), never another exception, a hang or a write outside
OUT. `tests/test_fuzz.py` runs a bounded, derandomized pass; `bench/fuzz.py` a longer one."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
from hypothesis import strategies as st
from onnx import TensorProto

from winnow.errors import WinnowError

HANG_SECONDS = 60  # one input may take this long before it counts as a hang


class FuzzFailure(AssertionError):
    """An input broke the property: another exception, a long message, a hang, a stray write."""


@dataclasses.dataclass
class Tally:
    """What one target ran: inputs, how many were accepted / refused, and the failures."""

    name: str
    inputs: int = 0
    accepted: int = 0
    refused: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)


def check_sentence(message: str) -> None:
    """A user-facing error: one line, not empty, no traceback."""
    if not message.strip() or "\n" in message.strip() or "Traceback" in message:
        raise FuzzFailure(f"not one sentence: {message!r}")


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise FuzzFailure when the block runs longer than `seconds` (SIGALRM, main thread)."""
    def expire(signum: int, frame: Any) -> None:
        raise FuzzFailure(f"hang: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(folder: Path) -> set[str]:
    """Every path under `folder`, relative."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_api(tally: Tally, call: Callable[[], Any]) -> None:
    """Run `call`; a WinnowError with one sentence is a refusal, anything else a failure."""
    tally.inputs += 1
    try:
        with time_limit(HANG_SECONDS):
            call()
    except WinnowError as exc:
        check_sentence(str(exc))
        tally.refused += 1
        return
    except FuzzFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        raise FuzzFailure(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    tally.accepted += 1


def run_cli(tally: Tally, args: list[str], work: Path, out: Path) -> None:
    """Run the CLI in-process in `work`: exit 0 writes OUT; exit 2 is one `error:` line and
    nothing at OUT; nothing else appears in `work` but OUT."""
    from click.testing import CliRunner

    from winnow.cli import cli

    tally.inputs += 1
    before = snapshot(work)
    shutil.rmtree(out, ignore_errors=True)
    with time_limit(HANG_SECONDS), contextlib.chdir(work):
        result = CliRunner().invoke(cli, ["--quiet", *args, "-o", str(out)])
    stray = {p for p in snapshot(work) - before if not p.startswith(out.name)}
    if stray:
        raise FuzzFailure(f"wrote outside OUT: {sorted(stray)[:3]}")
    if result.exit_code == 0:
        if not out.is_dir():
            raise FuzzFailure("exit 0 but nothing at OUT")
        tally.accepted += 1
        shutil.rmtree(out)
        return
    if isinstance(result.exception, FuzzFailure):
        raise result.exception
    message = result.stderr
    if result.exit_code != 2 or not message.startswith("error: "):
        raise FuzzFailure(f"exit {result.exit_code}: {message.strip()[:300]}")
    check_sentence(message)
    if out.exists() or list(out.parent.glob(f".{out.name}.*")):
        raise FuzzFailure("a refused input left files at OUT")
    tally.refused += 1


# --- ONNX protobufs ---------------------------------------------------------------------------

def seed_model() -> onnx.ModelProto:
    """The tiny model of the CLI tests (MatMul, Add, Mul, a dead Relu; symbolic batch)."""
    from winnow.tests.conftest import make_tiny_model

    return make_tiny_model()


OP_TYPES = ["Relu", "MatMul", "Add", "Identity", "Reshape", "Gelu", "If", "Loop", "Nope", ""]


def _set_dim(m: onnx.ModelProto, which: int, value: int | str) -> None:
    dims = [d for v in (*m.graph.input, *m.graph.output)
            for d in v.type.tensor_type.shape.dim]
    dim = dims[which % len(dims)]
    if isinstance(value, int):
        dim.dim_value = value
    else:
        dim.dim_param = value


def _set_dtype(m: onnx.ModelProto, which: int, dtype: int) -> None:
    values = [*m.graph.input, *m.graph.output]
    values[which % len(values)].type.tensor_type.elem_type = dtype


def _set_op(m: onnx.ModelProto, which: int, op: str) -> None:
    m.graph.node[which % len(m.graph.node)].op_type = op


def _rename_output(m: onnx.ModelProto, which: int, name: str) -> None:
    node = m.graph.node[which % len(m.graph.node)]
    node.output[0] = name


def _drop_node(m: onnx.ModelProto, which: int, _: Any) -> None:
    del m.graph.node[which % len(m.graph.node)]


def _init_dims(m: onnx.ModelProto, which: int, dims: list[int]) -> None:
    init = m.graph.initializer[which % len(m.graph.initializer)]
    del init.dims[:]
    init.dims.extend(dims)


def _external(m: onnx.ModelProto, which: int, fields: tuple[str, str, str]) -> None:
    init = m.graph.initializer[which % len(m.graph.initializer)]
    init.data_location = TensorProto.EXTERNAL
    init.ClearField("raw_data")
    del init.external_data[:]
    for key, value in zip(("location", "offset", "length"), fields):
        init.external_data.add(key=key, value=value)


def _versions(m: onnx.ModelProto, which: int, version: int) -> None:
    if which % 2:
        m.ir_version = version
    else:
        m.opset_import[0].version = version


def _attribute(m: onnx.ModelProto, which: int, value: int) -> None:
    node = m.graph.node[which % len(m.graph.node)]
    node.attribute.add(name="axis", type=onnx.AttributeProto.INT, i=value)


def _drop_outputs(m: onnx.ModelProto, which: int, _: Any) -> None:
    del m.graph.output[which % max(len(m.graph.output), 1):]


NAMES = st.sampled_from(["x", "y", "w", "b", "m1", "s", "", "../x", "a b", "é"])
SMALL_INTS = st.integers(-3, 40) | st.sampled_from([0, 1, 2**31, 2**40, 2**63 - 1])
PROTO_EDITS = st.one_of(
    st.tuples(st.just(_set_dim), st.integers(0, 50), SMALL_INTS | NAMES),
    st.tuples(st.just(_set_dtype), st.integers(0, 50), st.integers(0, 26)),
    st.tuples(st.just(_set_op), st.integers(0, 50), st.sampled_from(OP_TYPES)),
    st.tuples(st.just(_rename_output), st.integers(0, 50), NAMES),
    st.tuples(st.just(_drop_node), st.integers(0, 50), st.none()),
    st.tuples(st.just(_init_dims), st.integers(0, 50), st.lists(SMALL_INTS, max_size=4)),
    st.tuples(st.just(_external), st.integers(0, 50),
              st.tuples(st.sampled_from(["w.bin", "../w.bin", "/etc/passwd", "", "sub/w.bin"]),
                        st.sampled_from(["0", "8", "-1", "x", "99999999999"]),
                        st.sampled_from(["64", "0", "-4", "512", "1e3"]))),
    st.tuples(st.just(_versions), st.integers(0, 50), st.integers(-2, 30)),
    st.tuples(st.just(_attribute), st.integers(0, 50), st.integers(-5, 5)),
    st.tuples(st.just(_drop_outputs), st.integers(0, 50), st.none()),
)


def _byte_edit(data: bytes, edit: tuple[int, int, bytes]) -> bytes:
    kind, where, chunk = edit
    at = where % (len(data) + 1)
    if kind == 0:  # overwrite
        return data[:at] + chunk + data[at + len(chunk):]
    if kind == 1:  # insert
        return data[:at] + chunk + data[at:]
    if kind == 2:  # delete
        return data[:at] + data[at + max(len(chunk), 1):]
    return data[:at]  # truncate


BYTE_EDITS = st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.binary(min_size=1, max_size=8))


@st.composite
def onnx_files(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """Bytes of a mutated tiny model (proto-level edits, then byte-level ones) and, sometimes,
    the bytes of an external data file `w.bin` beside it."""
    model = seed_model()
    for edit, which, value in draw(st.lists(PROTO_EDITS, max_size=3)):
        with contextlib.suppress(IndexError, ValueError, TypeError):
            edit(model, which, value)
    data = model.SerializeToString()
    for edit in draw(st.lists(BYTE_EDITS, max_size=3)):
        data = _byte_edit(data, edit)
    side = draw(st.none() | st.binary(max_size=600))
    return data, side


def check_onnx_file(tally: Tally, work: Path, sample: tuple[bytes, bytes | None]) -> None:
    """`winnow compile` of the mutated file: written with outputs checked, or one sentence."""
    data, side = sample
    folder = work / "model"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "m.onnx").write_bytes(data)
    if side is not None:
        (folder / "w.bin").write_bytes(side)
    run_cli(tally, ["compile", str(folder / "m.onnx")], work, work / "out")


# --- Hugging Face folders ---------------------------------------------------------------------

HF_WORDS = ("the quick brown fox jumps over lazy dog . model compilers remove redundancy from "
            "neural networks before they run on small devices").split()


def build_hf_folder(folder: Path) -> Path:
    """A 1-layer, 8-wide BERT with a tiny word-piece vocabulary, saved as safetensors."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(HF_WORDS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from([0, -1, 1, 3, 7, 10**9]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)
CONFIG_KEYS = st.sampled_from(["model_type", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size", "vocab_size",
                               "max_position_embeddings", "hidden_act", "architectures",
                               "layer_norm_eps", "type_vocab_size", "pad_token_id", "torch_dtype"])
CONFIG_EDITS = st.one_of(
    st.tuples(st.just("set"), CONFIG_KEYS, JSON_VALUES),
    st.tuples(st.just("drop"), CONFIG_KEYS, st.none()),
    st.tuples(st.just("bytes"), st.none(), BYTE_EDITS),
)
HEADER_EDITS = st.one_of(
    st.tuples(st.just("dtype"), st.integers(0, 50), st.sampled_from(["F32", "F16", "I64", "BOOL",
                                                                     "X9", "", "F8_E4M3"])),
    st.tuples(st.just("shape"), st.integers(0, 50), st.lists(SMALL_INTS, max_size=4)),
    st.tuples(st.just("offsets"), st.integers(0, 50), st.lists(SMALL_INTS, max_size=3)),
    st.tuples(st.just("length"), st.none(), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("bytes"), st.none(), BYTE_EDITS),
)


def _edit_config(text: str, edits: list) -> bytes:
    config = json.loads(text)
    data = None
    for kind, key, value in edits:
        if kind == "set":
            config[key] = value
        elif kind == "drop":
            config.pop(key, None)
        else:
            data = _byte_edit(json.dumps(config).encode() if data is None else data, value)
    return data if data is not None else json.dumps(config).encode()


def _edit_safetensors(data: bytes, edits: list) -> bytes:
    (size,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + size]), data[8 + size:]
    names = sorted(k for k in header if k != "__metadata__")
    raw = None
    for kind, which, value in edits:
        if kind in ("dtype", "shape", "offsets"):
            entry = header[names[which % len(names)]]
            entry[{"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[kind]] = value
        elif kind == "length":
            text = json.dumps(header).encode()
            raw = struct.pack("<Q", value) + text + body
        else:
            text = json.dumps(header).encode()
            raw = _byte_edit(raw if raw is not None else
                             struct.pack("<Q", len(text)) + text + body, value)
    if raw is not None:
        return raw
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


HF_SAMPLES = st.tuples(st.lists(CONFIG_EDITS, max_size=3), st.lists(HEADER_EDITS, max_size=3))


def check_hf_folder(tally: Tally, work: Path, seed: Path, sample: tuple[list, list]) -> None:
    """Read a copy of the seed folder with mutated config.json / model.safetensors (everything
    the frontend does before torch.export): a model or one sentence."""
    from winnow.frontend.huggingface import read_hf_folder

    config_edits, header_edits = sample
    folder = work / "hf"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(seed, folder)
    if config_edits:
        text = (seed / "config.json").read_text()
        (folder / "config.json").write_bytes(_edit_config(text, config_edits))
    if header_edits:
        data = (seed / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(_edit_safetensors(data, header_edits))
    before = snapshot(work)
    run_api(tally, lambda: read_hf_folder(folder))
    if snapshot(work) - before:
        raise FuzzFailure(f"wrote files: {sorted(snapshot(work) - before)[:3]}")


# --- pipeline text and YAML -------------------------------------------------------------------

PASS_WORDS = st.sampled_from(["fold-constants", "cse", "dce", "canonicalize", "drop-layers",
                              "quantize", "prune-heads", "layer-similarity", "nope", "", "CSE"])
OPTION_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_=,{}[]0123456789.-+eE \"'\\:",
                      max_size=30)
PIPELINE_TEXT = st.one_of(
    st.text(max_size=60),
    st.lists(st.tuples(PASS_WORDS, st.none() | OPTION_TEXT), min_size=1, max_size=4).map(
        lambda items: ",".join(w + ("" if o is None else "{" + o + "}") for w, o in items)),
)
OPTION_NAMES = st.sampled_from(["size_limit", "count", "replacement", "regions", "max_iterations",
                                "mode", "ratio", "nope", ""])
YAML_TEXT = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
    st.builds(lambda items: "pipeline:\n" + "".join(f"  - {i}\n" for i in items),
              st.lists(PIPELINE_TEXT, max_size=3)),
    st.recursive(st.none() | st.integers() | st.text(max_size=8) | PASS_WORDS,
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(PASS_WORDS | OPTION_NAMES, inner, max_size=2),
                 max_leaves=8).map(lambda v: json.dumps({"pipeline": v})),
)


def check_pipeline_text(tally: Tally, text: str) -> None:
    """Parse and build the passes of a pipeline text: a pass list or one sentence."""
    from winnow.passes import PassManager

    run_api(tally, lambda: PassManager(text))


def check_pipeline_yaml(tally: Tally, work: Path, text: str) -> None:
    """Read a YAML pipeline file (written as UTF-8, or raw bytes) and build its passes."""
    from winnow.passes import PassManager
    from winnow.passes.pipeline import load_pipeline_file

    path = work / "pipeline.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    run_api(tally, lambda: PassManager(load_pipeline_file(path)))


# --- --input-shapes ---------------------------------------------------------------------------

SHAPES_TEXT = st.one_of(
    st.text(max_size=40),
    st.builds(lambda b, s, n: f"x={b},{s}" + ("" if n is None else f";ids={b},{n}"),
              st.integers(0, 4), st.integers(1, 9), st.none() | st.integers(1, 5)),
    st.text(alphabet="xstae=,;0123456789 []-+._", max_size=40),
    st.lists(st.tuples(st.sampled_from(["x", "state", "ids", "z", "", "x "]),
                       st.lists(st.integers(-2, 9) | st.integers(-2, 2**34)
                                | st.sampled_from(["", " ", "a", "1e3"]), max_size=4)),
             min_size=1, max_size=3).map(
        lambda items: ";".join(f"{n}={','.join(map(str, dims))}" for n, dims in items)),
)
SHAPES_SPECS = [{"name": "x", "dtype": "float32", "shape": ["batch", "samples"]},
                {"name": "state", "dtype": "float32", "shape": ["batch", 4]},
                {"name": "ids", "dtype": "int64", "shape": ["batch", None]}]


def check_input_shapes(tally: Tally, text: str) -> None:
    """Parse --input-shapes and build feeds for a three-input spec: feeds or one sentence."""
    from winnow.ir.user_inputs import UserInputs

    run_api(tally, lambda: UserInputs.from_options(input_shapes=text).feeds(SHAPES_SPECS))


@contextlib.contextmanager
def work_folder() -> Iterator[Path]:
    """A scratch folder for one target's files (removed afterwards)."""
    folder = Path(tempfile.mkdtemp(prefix="winnow-fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def hf_available() -> bool:
    """Whether the Hugging Face extra is installed (the HF target needs it)."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("torch", "transformers", "safetensors"))


def quiet_environment() -> None:
    """No network for transformers, no ORT warnings (as the CLI has them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
