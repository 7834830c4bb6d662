"""A model run in eval mode with forward hooks attached, for a measurement pass (the policy's input
shapes, the study's FLOPs count and entropy pass): however the pass ends, the hooks are removed and
every module's training mode is restored."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

__all__ = ["hooked_eval"]


@contextlib.contextmanager
def hooked_eval(model: nn.Module, handles: Iterable) -> Iterator[nn.Module]:
    """`with hooked_eval(model, handles): model(x)`: eval mode inside (no running-statistics
    update, dropout off); `handles` (from register_forward_hook / _pre_hook) removed after."""
    modes = [(m, m.training) for m in model.modules()]  # (per module: a frozen BN inside stays in eval)
    model.eval()
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
