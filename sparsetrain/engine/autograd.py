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
        # The error node also takes, as inputs whose outputs are dropped, every incoming gradient and
        # saved tensor that requires grad: its edges then lead to what the gradients depend on, so any
        # second derivative through them runs it. Without them it hung off the graph, and autograd
        # skipped it wherever `inputs=` / autograd.grad's inputs or allow_unused let it: jvp, hvp,
        # hessian came back zero, a gradient penalty's gradient for a layer before this one wrong.
        try:
            saved = tuple(ctx.saved_tensors)
        except (AttributeError, RuntimeError):
            saved = ()
        links = [t for t in (*grads, *saved) if isinstance(t, torch.Tensor) and t.requires_grad]
        fail = torch._C._functions.DelayedError(_MESSAGE, len(outputs) + len(links))
        failed = fail(*[None if t is None else t.detach().requires_grad_(True) for t in outputs], *links)
        failed = failed if isinstance(failed, tuple) else (failed,)
        return failed[0] if len(outputs) == 1 else failed[:len(outputs)]
    return wrapper
