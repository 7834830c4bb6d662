"""First-order gradients for the sparse layers: their backward formulas run kernels (C++, Triton)
that have no derivatives of their own, so a second derivative through them must be refused, never
returned as zero."""
from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as fwAD
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.utils.checkpoint import CheckpointError

__all__ = ["first_order", "record_inputs", "eager", "grad_tracked", "refuse_func_transforms", "NO_FORWARD_MODE"]

# torch.compiler.disable imports torch._dynamo as it decorates (~1.5 s, half of `import sparsetrain`);
# torch's own lazy form (what torch.optim uses) imports it on the first call instead.
eager = getattr(torch, "_disable_dynamo", torch.compiler.disable)

_MESSAGE = (b"trying to differentiate twice through a sparsetrain sparse layer: its gradient ops have no "
            b"derivatives (create_graph=True / double backward is not supported)")


def record_inputs(setup):
    """A setup_context wrapper for an op linear in each of its differentiable inputs separately
    (y = f(x, W) + b: sparse products, pooling): records which saved slot holds which forward input,
    so that first_order links the gradient for input i to the saved tensors other than input i (the gradient
    for x, W^T dy, does not depend on x: a Hessian with respect to the input of a model whose sparse
    layer sees a constant dy needs no derivative of it). Recorded by saved slot and input position,
    while both are at hand (an id() compared in backward can be a freed tensor's, reused under
    saved-tensor hooks); a tensor passed as two inputs (sp(sp.weight.values)) is nobody's own."""
    @functools.wraps(setup)
    def wrapped(ctx, inputs, output):
        setup(ctx, inputs, output)
        to_save = getattr(ctx, "to_save", None)
        if to_save is not None:
            def owner(t):
                hits = [i for i, a in enumerate(inputs) if a is t] if isinstance(t, torch.Tensor) else []
                return hits[0] if len(hits) == 1 else None
            ctx._st_owner = tuple(owner(t) for t in to_save)
    return wrapped


def _saved(ctx) -> tuple:
    try:
        return tuple(ctx.saved_tensors)
    except AttributeError:
        return ()
    except CheckpointError as e:  # (non-reentrant checkpoint: its saved tensors unpack once, for the backward)
        raise RuntimeError(_MESSAGE.decode() + ": inside torch.utils.checkpoint(use_reentrant=False), "
                           "create_graph=True through a sparse layer is refused") from e


def first_order(backward):
    """A backward formula (autograd.Function.backward, or torch.library.register_autograd's) run
    without autograd, whose gradients, under create_graph=True, raise "differentiate twice" when
    differentiated. As torch.autograd.function.once_differentiable, which however marks them only
    when an incoming gradient requires grad: for a loss linear in the layer's output (a gradient
    penalty on critic(x).sum()) it returned plain tensors, and the second-order terms through the
    layer were silently zero.

    Each gradient's error node takes, as inputs whose outputs are dropped, the incoming gradients
    and the saved tensors it depends on (those that require grad: all of them, or all but its own
    input where record_inputs says which that is), and `ctx.links` (tensors the formula read through
    values derived without autograd, such as a BatchNorm's weight): its edges lead to what it depends on,
    so any second derivative through it runs it. With no edges (before 2026-12-05) autograd skipped
    it wherever `inputs=`, autograd.grad's inputs or allow_unused let it: jvp, hvp, hessian came back
    zero, a gradient penalty's gradient for a layer before this one wrong."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # (the engine enables grad mode in backward only for create_graph)
            return outputs
        single = not isinstance(outputs, tuple)
        saved = _saved(ctx)
        owner = getattr(ctx, "_st_owner", None)
        owner = owner if owner is not None and len(owner) == len(saved) else (None,) * len(saved)
        lead = [g for g in (*grads, *getattr(ctx, "links", ())) if isinstance(g, torch.Tensor) and g.requires_grad]
        failed = []
        for i, t in enumerate((outputs,) if single else outputs):
            if t is None:
                failed.append(None)
                continue
            links = lead + [s for s, o in zip(saved, owner) if isinstance(s, torch.Tensor) and s.requires_grad
                            and (o is None or o != i)]
            out = torch._C._functions.DelayedError(_MESSAGE, 1 + len(links))(t.detach().requires_grad_(True), *links)
            failed.append(out[0] if isinstance(out, tuple) else out)
        return failed[0] if single else tuple(failed)
    return wrapper


def grad_tracked(t) -> bool:
    """`t` is, or batches, a tensor a torch.func.grad/vjp/jacrev level differentiates: torch.library's
    autograd of a C++-schema op has no functorch rule there (PyTorch's error asked for a setup_context)."""
    f = torch._C._functorch
    while isinstance(t, torch.Tensor) and f.is_batchedtensor(t):
        t = f.get_unwrapped(t)
    return isinstance(t, torch.Tensor) and f.is_gradtrackingtensor(t)


NO_FORWARD_MODE = ("sparse layers have no forward-mode derivative: torch.func.jvp, jacfwd and hessian are not "
                   "supported (torch.autograd, torch.func.vmap are)")


def refuse_func_transforms(inputs) -> None:
    """NotImplementedError where a transform would differentiate a sparse product of `inputs` (x, values, bias;
    None allowed), for the CSR ops and the Triton BSRLinear alike. Forward mode: torch.func.jvp/jacfwd would give
    a zero tangent silently (no forward-mode formula), as did torch.autograd.forward_ad where no input requires
    grad (a frozen layer) and jvp under torch.compile. torch.func.grad/vjp/jacrev: torch.library's autograd of
    the C++-schema ops has no functorch rule (PyTorch's error asked the caller for a setup_context), and the
    Triton kernels cannot read the transform's wrapped tensors ("Cannot access storage of TensorWrapper")."""
    transforms = not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None
    if (transforms and any(i.key() == torch._C._functorch.TransformType.Jvp
                           for i in retrieve_all_functorch_interpreters())) or (
            fwAD._current_level >= 0 and any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in inputs)):
        raise NotImplementedError(NO_FORWARD_MODE)
    if transforms and any(grad_tracked(t) for t in inputs):
        raise NotImplementedError("sparse layers do not support torch.func.grad, vjp, jacrev or hessian: use "
                                  "torch.autograd.grad or torch.autograd.functional.jacobian (torch.func.vmap works)")
