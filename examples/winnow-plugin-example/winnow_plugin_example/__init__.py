"""An example winnow plugin: `dedup-weights` (a pass) and `fold-scales` (a rule pass)."""
