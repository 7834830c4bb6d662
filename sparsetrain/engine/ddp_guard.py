"""A DistributedDataParallel built before a prune, a load of another nnz or a layer swap, refused at its
next forward by name.

DDP registers its gradient hooks on its parameters' gradient accumulators when it is built. A resize
(CSR.shrink_, load_state_dict of another nnz: formats.resize_values_) gives the values a new
accumulator, and a swap (sparsify_, densify_, filter pruning) new Parameters, so a DDP that was not
rebuilt ran its next step without averaging any gradient, silently, and only the step after raised
PyTorch's "Expected to have finished reduction". Every DDP is recorded when it is built (a global module
registration hook: DDP sets `self.module` between listing its parameters and building its buckets), with
which of its parameters required grad then. Once the process group exists, a resize or swap
(optim_state.watch_resized / retire call `watch`) marks the live DDPs: one that held the changed Parameter
trainable is stale for good, the others are checked at their next forward (their parameters and
requires_grad flags against those at construction) by a global module forward pre-hook. The hook runs
only while a marked DDP lives and the group exists, and removes itself at the next module call after
(it was left installed for the rest of the process when no DDP came after a prune: ~1.3 µs on every
module call of every model; and the first DDP that passed removed it, another model's stale DDP then
running unchecked).
"""
from __future__ import annotations

import gc
import threading
import weakref

import torch
from torch import nn

__all__ = ["watch"]

_lock = threading.Lock()
_handle = None  # the forward pre-hook, while _marked holds a live DDP
_built = weakref.WeakKeyDictionary()  # every DDP -> requires_grad of its parameters when built (None: unknown)
_marked = weakref.WeakKeyDictionary()  # DDP built before a resize/swap -> why it is stale, or None: to check
_scanned = False  # (the DDPs built before this module's import, found once: gc)
_RESIZED = ("the model's trainable parameters changed size (pruning, or a state_dict of another nnz loaded): its "
            "gradient hooks sit on the old parameters, so this step would average no gradient")
_REPLACED = ("the model's layers were replaced (sparsify_, densify_ or filter pruning: new Parameters): its gradient "
             "hooks sit on the old parameters, so this step would average no gradient")


def _flags(ddp) -> tuple | None:
    params = getattr(ddp, "_module_parameters", None)  # (DDP's private record: another torch may lack it)
    return None if params is None else tuple(bool(p.requires_grad) for p in params)


def _registered(module, name, submodule):
    """Module registration hook: a DDP setting its `module` (in its __init__, before its buckets)."""
    if name == "module" and isinstance(module, nn.parallel.DistributedDataParallel):
        with _lock:
            _built[module] = _flags(module)


_registration = nn.modules.module.register_module_module_registration_hook(_registered)


def watch(param: torch.Tensor, replaced: bool = False) -> None:
    """After `param` was resized (or, `replaced`, swapped out of its model): every live DDP is checked at
    its next forward, one that held `param` trainable refused (nothing without an initialized process
    group, where no DDP exists)."""
    global _handle, _scanned
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    with _lock:
        if not _scanned:  # (DDPs built before this module was imported: no registration seen)
            _scanned = True
            for o in gc.get_objects():  # (type(o): a lazy proxy's __class__ would warn or import)
                if issubclass(type(o), nn.parallel.DistributedDataParallel) and o not in _built:
                    _built[o] = None
        for ddp, flags in list(_built.items()):
            params = getattr(ddp, "_module_parameters", ())
            held = any(p is param and f for p, f in zip(params, flags or [True] * len(params)))
            if held:
                _marked[ddp] = _REPLACED if replaced else _RESIZED
            else:
                _marked.setdefault(ddp, None)
        if _marked and _handle is None:
            _handle = nn.modules.module.register_module_forward_pre_hook(_check)


def _stale(ddp) -> str | None:
    """Why `ddp`'s buckets no longer fit its module's parameters, or None."""
    why = _marked.get(ddp)  # (told after a swap or a change of requires_grad, which it may be besides)
    built = getattr(ddp, "_module_parameters", None)
    if built is None:
        return why
    ignored = getattr(ddp, "parameters_to_ignore", ())
    now = [p for n, p in ddp.module.named_parameters() if n not in ignored]
    if len(now) != len(built) or any(a is not b for a, b in zip(now, built)):
        return _REPLACED
    flags, trainable = _built.get(ddp), [p for p in now if p.requires_grad]
    count = getattr(ddp, "_get_ddp_logging_data", dict)().get("num_parameter_tensors")  # (trainable then)
    # (the flags at construction: a freeze undone passes, a freeze of one and unfreeze of another is told apart)
    if flags is not None and flags != _flags(ddp) or flags is None and count is not None and int(count) != len(
            trainable):
        names = [n for n, p in ddp.module.named_parameters() if n not in ignored]
        which = "" if flags is None else ": " + ", ".join(
            f"{n!r} {'unfrozen' if p.requires_grad else 'frozen'}" for n, p, f in zip(names, now, flags)
            if p.requires_grad != f)
        return (f"requires_grad was changed on the model's parameters ({sum(flags) if flags else int(count)} -> "
                f"{len(trainable)} trainable tensors{which}): it averages the gradients of those trainable then, so a "
                "frozen one's missing gradient fails the step and an unfrozen one trains unaveraged")
    return why


def _check(module, args):
    global _handle
    dist = torch.distributed
    if not _marked or not dist.is_initialized():  # (no DDP built before a change lives, or no group: unhooked)
        with _lock:
            if not dist.is_initialized():
                _marked.clear()
            if _handle is not None and not _marked:
                _handle.remove()
                _handle = None
        return
    ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
    if ddp is None or module is not ddp.module or ddp not in _marked:  # (outside a marked DDP's forward)
        return
    why = _stale(ddp)
    if why is not None:
        raise ValueError(f"this DistributedDataParallel was built before {why}; wrap the model again "
                         "(DistributedDataParallel(model, ...)) after pruning, loading, swapping layers or changing "
                         "requires_grad")
    with _lock:
        _marked.pop(ddp, None)
