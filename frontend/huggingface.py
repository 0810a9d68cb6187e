"""Load a local Hugging Face folder (offline, safetensors only) into the IR via torch.export."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir
import torch

from winnow.errors import ModelFormatError, SourceError, UnsupportedModelError
from winnow.frontend.torch_export import first_line, load_module

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Model compilers remove redundancy from neural networks before they run on small devices.",
)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def load_hf_folder(path: str | Path) -> ir.Model:
    """Export a local transformers folder's base AutoModel (last_hidden_state) into the IR."""
    path = Path(path)
    hf_model, encoded = read_hf_folder(path)
    return _export(path, hf_model, encoded)


def read_hf_folder(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The folder's base AutoModel (config, safetensors weights) and example tokens from its
    tokenizer, offline; WinnowError naming what is wrong with the folder."""
    path = Path(path)
    _check_folder(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    config = _load_config(path)
    hf_model = _load_weights(path, config)
    return hf_model, _example_tokens(path, hf_model)


def _check_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise SourceError(f"'{path}' has no config.json; give a Hugging Face model folder.")
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise SourceError(f"'{path}' only has pickle weights ({', '.join(pickles)}), which winnow "
                          "never loads; convert them to model.safetensors first.")
    raise SourceError(f"'{path}' has config.json but no weights; add model.safetensors.")


def _load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read '{path / 'config.json'}': {first_line(exc)}") from exc
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"'{path}' has an architecture transformers does not know "
                                    f"(or that needs remote code): {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - config classes validate fields with many types
        raise ModelFormatError(f"'{path / 'config.json'}' is not a config transformers can use: "
                               f"{one_line(exc)}") from exc


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (its lines joined), cut at `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _load_weights(path: Path, config):
    from transformers import AutoModel

    try:
        with _quiet_transformers():
            model, info = AutoModel.from_pretrained(
                path, config=config, local_files_only=True, use_safetensors=True,
                trust_remote_code=False, attn_implementation="eager", output_loading_info=True)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"transformers has no base model for '{path}' "
                                    f"({type(config).__name__}): {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - safetensors and torch raise several types
        raise ModelFormatError(f"cannot read the weights in '{path}': {first_line(exc)}") from exc
    missing = [k for k in info.get("missing_keys", ()) if "pooler" not in k]
    if missing:
        raise ModelFormatError(f"the weights in '{path}' do not fit {type(model).__name__}: "
                               f"{len(missing)} tensor(s) missing, e.g. '{missing[0]}'.")
    return model.eval()


def _example_tokens(path: Path, hf_model) -> dict:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizer loading raises many types
        raise SourceError(f"cannot load the tokenizer in '{path}' (needed for example inputs): "
                          f"{first_line(exc)}") from exc
    words = tokenizer(SENTENCES[0], add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in words):
        raise SourceError(f"'{path}' has no usable tokenizer (every word maps to the unknown "
                          "token); add the model's tokenizer files.")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(list(SENTENCES), padding=True, return_tensors="pt",
                        return_attention_mask=True)
    accepted = inspect.signature(hf_model.forward).parameters
    return {k: encoded[k] for k in INPUT_NAMES if k in encoded and k in accepted}


def _export(path: Path, hf_model, encoded: dict) -> ir.Model:
    if list(encoded) != list(INPUT_NAMES[:len(encoded)]):
        raise UnsupportedModelError(f"'{path}' does not take input_ids and attention_mask; "
                                    "winnow exports text encoders only.")
    axes = {0: "batch", 1: "sequence"}
    model = load_module(LastHiddenState(hf_model), tuple(encoded.values()),
                        dynamic_shapes=tuple(axes for _ in encoded),
                        output_names=["last_hidden_state"], label=type(hf_model).__name__)
    model.metadata_props["winnow.source"] = f"hf:{path.resolve()}"
    model.metadata_props["winnow.hf_class"] = type(hf_model).__name__
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' 'Loading weights' bar and load report (winnow raises its own errors)."""
    from transformers.utils import logging as hf_logging

    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


class LastHiddenState(torch.nn.Module):
    """Takes the tokenizer tensors positionally and returns the model's last_hidden_state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The base model's last_hidden_state for these tokens."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state
