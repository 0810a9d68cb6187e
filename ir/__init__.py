"""IR helpers on top of onnx-ir: execution, verification, input feeds."""
