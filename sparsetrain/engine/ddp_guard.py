"""A DistributedDataParallel built before a prune, a load of another nnz or a layer swap, refused at its
next forward by name.

DDP registers its gradient hooks on its parameters' gradient accumulators when it is built. A resize
(CSR.shrink_, load_state_dict of another nnz: formats.resize_values_) gives the values a new
accumulator, and a swap (sparsify_, densify_, filter pruning) new Parameters, so a DDP that was not
rebuilt ran its next step without averaging any gradient, silently, and only the step after raised
PyTorch's "Expected to have finished reduction". Once the process group exists, a resize or swap
(optim_state.watch_resized / retire call `watch`) installs a global module forward pre-hook: inside a
DDP's forward (`DistributedDataParallel._active_ddp_module`) it compares the DDP's parameters at
construction (the same Parameters; their bytes, from its logging data) with its module's now, and
refuses the stale one before its forward runs. The first DDP that passes removes the hook: a single
process, or a study that rebuilds its DDP every round, pays one check per round.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

__all__ = ["watch"]

_lock = threading.Lock()
_handle = None


def watch() -> None:
    """After a resize or swap of a model's parameters: check the next DDP forward (once per process
    group at a time; nothing without an initialized one, where no DDP exists)."""
    global _handle
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    with _lock:
        if _handle is None:
            _handle = nn.modules.module.register_module_forward_pre_hook(_check)


def _stale(ddp) -> str | None:
    """Why `ddp`'s buckets no longer fit its module's parameters, or None."""
    built = getattr(ddp, "_module_parameters", None)  # (DDP's private record: another torch may lack it)
    if built is None:
        return None
    ignored = getattr(ddp, "parameters_to_ignore", ())
    now = [p for n, p in ddp.module.named_parameters() if n not in ignored]
    hooks = "its gradient hooks sit on the old parameters, so this step would average no gradient"
    if len(now) != len(built) or any(a is not b for a, b in zip(now, built)):
        return f"the model's layers were replaced (sparsify_, densify_ or filter pruning: new Parameters): {hooks}"
    data = getattr(ddp, "_get_ddp_logging_data", dict)()
    trainable = [p for p in now if p.requires_grad]
    count = data.get("num_parameter_tensors")  # (the trainable ones at construction, as DDP logged them)
    if count is not None and int(count) != len(trainable):  # (blamed on a prune before: sizes differ too)
        return (f"requires_grad was changed on the model's parameters ({int(count)} -> {len(trainable)} trainable "
                "tensors): it averages the gradients of those trainable then, so a frozen one's missing gradient "
                "fails the step and an unfrozen one trains unaveraged")
    logged = data.get("total_parameter_size_bytes")
    size = sum(p.numel() * p.element_size() for p in trainable)
    if logged is not None and int(logged) != size:  # (bytes of the trainable parameters, as DDP logged them)
        return (f"the model's trainable parameters changed size ({int(logged)} -> {size} bytes: pruning, or a "
                f"state_dict of another nnz loaded): {hooks}")
    return None


def _check(module, args):
    global _handle
    ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
    if ddp is None or module is not ddp.module:  # (outside a DDP forward, or an inner module of one)
        return
    why = _stale(ddp)
    if why is not None:
        raise ValueError(f"this DistributedDataParallel was built before {why}; wrap the model again "
                         "(DistributedDataParallel(model, ...)) after pruning, loading, swapping layers or changing "
                         "requires_grad")
    with _lock:
        if _handle is not None:
            _handle.remove()
            _handle = None
