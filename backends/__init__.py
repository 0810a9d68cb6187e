"""Backends: emit deployable artifacts (ONNX Runtime now, TVM later)."""
