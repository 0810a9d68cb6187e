"""Built-in rewrite passes; importing this package registers them."""

from winnow.passes.rewrite import canonicalize, cse, dce, fold_constants, shape_inference  # noqa: F401
