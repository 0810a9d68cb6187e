"""Built-in rewrite passes; importing this package registers them."""

from winnow.passes.rewrite import (  # noqa: F401
    bfp,
    canonicalize,
    cse,
    dce,
    distill,
    drop_layers,
    fold_constants,
    fuse,
    fuse_convs,
    lmul,
    prune_channels,
    prune_heads,
    quantize,
    shape_inference,
    smooth_activations,
    split_outliers,
    split_skip_norms,
    trim_padding,
)
