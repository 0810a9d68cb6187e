"""`dedup-weights`: initializers that hold identical tensors become one."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import onnx_ir as ir

from winnow.passes import Pass, PassContext, PassResult, option


class DedupWeightsPass(Pass):
    """Merge initializers with the same dtype, shape and bytes; every user reads the first."""

    name = "dedup-weights"
    description = ("Merge initializers that hold identical tensors (same dtype, shape and bytes), "
                   "e.g. shared layers exported twice.")
    lossless = True

    @dataclass(frozen=True)
    class Config:
        """Options of dedup-weights."""

        min_elements: int = option(1, "smallest tensor (elements) considered", min=1)

    def call(self, model: ir.Model) -> PassResult:
        """Redirect every use of a duplicate to its first copy and drop the duplicate."""
        graph = model.graph
        removed, saved = 0, 0
        for keep, *copies in self._groups(graph).values():
            for copy in copies:
                copy.replace_all_uses_with(keep)
                del graph.initializers[copy.name]
                removed += 1
                saved += copy.const_value.nbytes
        PassContext.current().report[self.name] = {"merged": removed, "bytes_saved": saved}
        return PassResult(model, modified=removed > 0)

    def _groups(self, graph: ir.Graph) -> dict[tuple, list[ir.Value]]:
        """Initializers by content; graph inputs and outputs are never merged."""
        fixed = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
        groups: dict[tuple, list[ir.Value]] = defaultdict(list)
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or id(value) in fixed or tensor.size < self.config.min_elements:
                continue
            data = tensor.numpy()
            key = (str(tensor.dtype), tuple(data.shape), hashlib.sha256(data.tobytes()).digest())
            groups[key].append(value)
        return groups
