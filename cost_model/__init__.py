"""Hardware cost model (FLOPs, bytes, roofline latency, energy) per target."""

from winnow.cost_model.predict import CostReport, predict
from winnow.cost_model.targets import Target, TargetError, known_targets, load_target

__all__ = ["predict", "load_target", "CostReport", "Target", "TargetError", "known_targets"]
