"""Built-in rewrite passes; importing this package registers them."""

from winnow.passes.rewrite import (  # noqa: F401
    canonicalize,
    cse,
    dce,
    drop_layers,
    fold_constants,
    prune_heads,
    shape_inference,
)
