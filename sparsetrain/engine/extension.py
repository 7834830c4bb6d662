"""The C++ extension `sparsetrain._C` (csrc/): importing it registers the op schemas and CPU kernels.

Only those: the autograd formulas, fake impls and autocast rules are registered by
`sparsetrain.engine.ops`, which imports this module; import that one to use `torch.ops.sparsetrain`.
"""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against: imported alone it failed)

try:
    from .. import _C
except ImportError as e:  # (an editable install made with SPARSETRAIN_SKIP_EXT=1 and never built, or a failed build)
    raise ImportError(f"sparsetrain's C++ extension (sparsetrain._C) cannot be loaded ({e}): build it with "
                      "`make install`, or `python setup.py build_ext --inplace` in the checkout") from e

__all__ = ["_C"]
