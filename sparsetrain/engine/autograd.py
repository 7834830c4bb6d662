"""First-order gradients for the sparse layers: their backward formulas run kernels (C++, Triton)
that have no derivatives of their own, so a second derivative through them must be refused, never
returned as zero."""
from __future__ import annotations

import functools

import torch

__all__ = ["first_order"]

_MESSAGE = (b"trying to differentiate twice through a sparsetrain sparse layer: its gradient ops have no "
            b"derivatives (create_graph=True / double backward is not supported)")


def first_order(backward):
    """A backward formula (autograd.Function.backward, or torch.library.register_autograd's) run
    without autograd, whose gradients, under create_graph=True, raise "differentiate twice" when
    differentiated. As torch.autograd.function.once_differentiable, which however marks them only
    when an incoming gradient requires grad: for a loss linear in the layer's output (a gradient
    penalty on critic(x).sum()) it returned plain tensors, and the second-order terms through the
    layer were silently zero."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # (the engine enables grad mode in backward only for create_graph)
            return outputs
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        fail = torch._C._functions.DelayedError(_MESSAGE, len(outputs))
        return fail(*[None if t is None else t.detach().requires_grad_(True) for t in outputs])
    return wrapper
