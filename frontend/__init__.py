"""Frontends: turn a model source (ONNX file, HF folder, nn.Module, zoo name) into the IR."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import onnx_ir as ir

from winnow.errors import SourceError, require_extra

EXAMPLE_FEEDS_KEY = "winnow.example_feeds"


def load(source: Any, example_inputs: Any = None, dynamic_shapes: Any = None) -> ir.Model:
    """Load a model into the IR from a path, a `zoo:NAME`/`onnx:NAME` name or an nn.Module."""
    torch = sys.modules.get("torch")  # an nn.Module means torch is imported; never import it here
    if torch is not None and isinstance(source, torch.nn.Module):
        from winnow.frontend.torch_export import load_module

        if example_inputs is None:
            raise SourceError("loading an nn.Module needs example_inputs (a tuple of tensors).")
        return load_module(source, example_inputs, dynamic_shapes=dynamic_shapes)
    if isinstance(source, ir.Model):
        return source
    if not isinstance(source, (str, Path)):
        raise SourceError(f"cannot load a model from a {type(source).__name__}; give a path, "
                          "'zoo:NAME', 'onnx:NAME' or a torch.nn.Module.")
    text = str(source)
    if text.startswith(("zoo:", "onnx:")):
        from winnow.models_zoo import load_named

        return load_named(text)
    return _load_path(Path(text))


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise SourceError(f"model source '{path}' does not exist; give an .onnx file, a Hugging "
                          "Face folder, or 'zoo:NAME'.")
    if path.is_dir():
        if not any(path.iterdir()):
            raise SourceError(f"folder '{path}' is empty; give a Hugging Face model folder "
                              "(with config.json) or an .onnx file.")
        if (path / "config.json").is_file():
            require_extra(f"loading the Hugging Face folder '{path}'", "hf",
                          ("torch", "transformers", "safetensors", "tokenizers"))
            from winnow.frontend.huggingface import load_hf_folder

            return load_hf_folder(path)
        onnx_files = sorted(path.glob("*.onnx"))
        if len(onnx_files) == 1:
            from winnow.frontend.onnx_file import load_onnx

            return load_onnx(onnx_files[0])
        raise SourceError(f"folder '{path}' has no config.json and not exactly one .onnx file; "
                          "give a Hugging Face model folder or the .onnx file itself.")
    if path.suffix.lower() == ".onnx":
        from winnow.frontend.onnx_file import load_onnx

        return load_onnx(path)
    raise SourceError(f"'{path}' is not a model winnow can read; give an .onnx file, a Hugging "
                      "Face folder or 'zoo:NAME'.")


def example_feeds(model: ir.Model) -> dict | None:
    """The example inputs a frontend attached to the model, if any."""
    return model.meta.get(EXAMPLE_FEEDS_KEY)
