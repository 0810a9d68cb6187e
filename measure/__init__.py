"""Measurement: `timing` (interleaved runs, paired ratios, peak RSS; every winnow timer uses it)
and `fidelity` (the one evaluator of a lossy change against its source)."""
