"""Hardware cost model (FLOPs, bytes, roofline latency, energy) per target."""
