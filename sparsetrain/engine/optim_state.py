"""Optimizer state that does not fit its parameter, refused by name at the optimizer's next step
(engine/formats.py registers the check when it builds the first sparse weight)."""
from __future__ import annotations

import threading
import weakref

import torch

from . import ddp_guard

__all__ = ["watch_state", "watch_resized", "shrink_state", "mark_stale", "retire", "retire_replaced"]


# ---- optimizer state that does not fit its parameter ----------------------------------------------
# PyTorch's optimizers match loaded state to parameters by position and never check its shape: the
# plain and foreach steps then fail on a size mismatch, the fused=True CPU kernels do not check sizes
# and read or write past the smaller tensor (memory corruption, or other weights' moments used
# silently). Two ways a sparse model meets such state:
# * a resize: load_state_dict into a layer of another nnz keeps the values Parameter (an optimizer
#   built before keeps training it), so state an optimizer already holds for it has the old nnz;
#   pruning in place (CSR.shrink_) too, but it shrinks the state of the optimizers that stepped the
#   values with them (shrink_state): only state loaded and not stepped with yet keeps the old nnz;
# * sparsify_ changes the parameters' order and shapes (a layer's bias now comes before its values),
#   so a dense model's optimizer state loaded into the sparse model's optimizer lands on the wrong
#   parameters.
# A step pre-hook common to all optimizers, registered when the first sparse weight is built, refuses
# such a step by name: state of a values Parameter's former shapes, and, for torch.optim's
# optimizers, per-element state (the keys below, each of its parameter's shape by construction)
# of another shape. Other state may differ from a parameter's shape by design (Adafactor's factored
# moments, LBFGS's flat vectors) and passes.
_PER_ELEMENT = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg",
                          "grad_avg", "acc_delta", "sum", "ax", "prev", "step_size"})
_TORCH_OPTIMS = tuple(getattr(torch.optim, n) for n in (
    "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop",
    "SparseAdam") if hasattr(torch.optim, n))
_resized = torch.utils.weak.WeakIdKeyDictionary()  # values Parameter -> {former shape: why it changed}
# (its latest _FORMER shapes: a prune adds one, so a study's rounds grew the record without bound; older
# state of torch.optim's optimizers is still refused by the per-element check below)
_FORMER = 16
_lock = threading.Lock()  # (a load in one thread while another steps)
_hook = None
# Another pattern of the same nnz keeps the shape: the state tensors the optimizers that stepped held for
# the values then (the old positions' momentum) are remembered by identity and refused; state loaded
# after (optimizer.load_state_dict) is new tensors and passes.
_optimizers = weakref.WeakSet()  # optimizers that stepped since the hook was registered
_stale = torch.utils.weak.WeakIdKeyDictionary()  # values Parameter -> WeakIdKeyDictionary of stale state
_AFTER_LOAD = ("restore the optimizer's state saved with that model (optimizer.load_state_dict) or build the "
               "optimizer after loading")  # (the remedy after a layer's load_state_dict)
# Parameters of layers sparsify_ / densify_ replaced (the dense weight and bias, the values and the
# sparse layer's bias copy): the model no longer uses them, so an optimizer built before the swap
# stepped them without effect (no gradient reaches them) and the model silently never trained. Such a
# Parameter without a gradient is refused at the step (one with a gradient may be another model's still).
_retired = torch.utils.weak.WeakIdKeyDictionary()  # Parameter -> ("weight of layer 'fc'", "sparsify_")
# The Parameter in place of one whose gradient the swap dropped (a backward before it, no step yet), until a
# gradient reaches it: an optimizer built after the swap stepped the other parameters with theirs, that layer
# without its own, silently.
_regrad = torch.utils.weak.WeakIdKeyDictionary()  # new Parameter -> ("weight of layer 'fc'", "sparsify_", _Pending)
# Why a values Parameter has another shape than state held for it, and the remedy (watch_resized):
LOADED = f"load_state_dict gave the layer a pattern of another nnz; {_AFTER_LOAD}"
PRUNED = ("pruning removed some of its weights (CSR.shrink_) while this optimizer held state it had not stepped "
          "with yet (loaded), so that state kept the old size; load it before pruning, or build the optimizer "
          "after pruning")


def watch_state() -> None:
    """Registers the state check (once per process)."""
    global _hook
    with _lock:
        if _hook is None:
            from torch.optim.optimizer import register_optimizer_step_pre_hook
            _hook = register_optimizer_step_pre_hook(_check_state_shapes)


def watch_resized(values: torch.Tensor, old: torch.Size, why: str = LOADED) -> None:
    watch_state()
    ddp_guard.watch(values)  # (a DDP built before: its next forward refused)
    with _lock:  # (a new dict, not updated in place: a step's check reads it outside the lock)
        former = {k: v for k, v in _resized.get(values, {}).items() if k != old}
        former[old] = why
        _resized[values] = dict(list(former.items())[-_FORMER:])


def shrink_state(values: torch.Tensor, keep: torch.Tensor, old: torch.Size) -> None:
    """After `values` (a Parameter, formerly of shape `old`) kept only the entries `keep` (CSR.shrink_):
    the per-element state of the optimizers that stepped it shrinks alike (its surviving weights keep
    their momentum): every state tensor of the values' former 1-D shape, whatever its key (Adafactor's
    `variance` of a 1-D parameter, third-party optimizers' buffers); the state of optimizers that
    have not stepped with it (loaded) is refused at their next step."""
    watch_resized(values, old, PRUNED)
    with _lock:
        optimizers, stale = list(_optimizers), _stale.get(values)
    for opt in optimizers:
        state = opt.state.get(values)
        for key, t in list((state or {}).items()):
            if isinstance(t, torch.Tensor) and t.shape == old:
                state[key] = t[keep.to(t.device)]
                if stale is not None and t in stale:  # (state of a former pattern stays refused: before, its shrunk
                    with _lock:  # copy was a new tensor, so a prune after the load let the old momentum step)
                        stale[state[key]] = key


def mark_stale(values: torch.Tensor) -> None:
    watch_state()
    with _lock:
        tensors = _stale.setdefault(values, torch.utils.weak.WeakIdKeyDictionary())
        for opt in list(_optimizers):
            for key, t in opt.state.get(values, {}).items():
                if isinstance(t, torch.Tensor) and (key in _PER_ELEMENT or t.shape == values.shape):
                    tensors[t] = key


def retire(param: torch.Tensor, what: str, by: str, new: torch.Tensor | None = None) -> None:
    """`param` is no longer the model's (`what`: which tensor of which layer; `by`: the function that
    replaced the layer; `new`: the Parameter now in its place, if any): an optimizer's step over it is
    refused by name."""
    watch_state()
    ddp_guard.watch(param, replaced=True)
    # (its gradient dropped: zero_grad(set_to_none=False) kept the last one, zeroed, so the check below never
    # saw None and the old optimizer's steps trained nothing, silently; a model still running it makes another.
    # Kept, it could not be told from another model's gradient not stepped yet, which is lost: its step is
    # refused, saying so, until a gradient comes again)
    dropped = param.grad is not None
    param.grad = None
    with _lock:
        _retired[param] = (what, by, None if new is None else weakref.ref(new), dropped)
        if dropped and new is not None and param.requires_grad:
            _regrad[new] = (what, by, None)
            return True
    return False


class _Pending:
    """The gradients the model's other parameters held at a swap that dropped a layer's (a backward before it, not
    stepped): while one is still that tensor, never zeroed, later backwards accumulate into it, so a step would
    train the rest on both and the swapped layer on the later backwards only. A pre-hook on each (_Seen) lets go
    of one once a backward finds its gradient set to None, replaced or zeroed (zero_grad(set_to_none=False))."""

    def __init__(self, held):
        self.grads = {}  # id(Parameter) -> (its name, weakref to it, weakref to its gradient at the swap)
        self.handles = []
        for name, p in held:
            self.grads[id(p)] = (name, weakref.ref(p), weakref.ref(p.grad))
            self.handles.append(p.register_hook(_Seen(self, id(p))))

    def stale(self) -> str | None:
        """The name of a parameter still holding its gradient of before the swap (accumulated into since, or not),
        or None, the hooks then removed (none can come back)."""
        for key, (name, p, g) in list(self.grads.items()):
            p = p()
            if p is None or p.grad is None or p.grad is not g() or _zeroed(p.grad):
                with _lock:
                    self.grads.pop(key, None)
            else:
                return name
        for handle in self.handles:
            handle.remove()
        return None


def _zeroed(grad: torch.Tensor) -> bool:
    """All zeros (zero_grad(set_to_none=False)); a sparse gradient (nn.Embedding(sparse=True)) by its values."""
    return not bool((grad._values() if grad.is_sparse else grad).any())


class _Seen:
    """A tensor pre-hook on a parameter of a _Pending: before a backward accumulates into its gradient."""
    __torch_unserializable__ = True  # (torch.save keeps no hooks: without a warning for this one)
    sparsetrain_own = True  # (not a user's: swap.uncarried_hook lets sparsify_/densify_ replace its layer)

    def __init__(self, pending: _Pending, key: int):
        self.pending, self.key = weakref.ref(pending), key

    def __call__(self, grad):
        pending = self.pending()
        entry = None if pending is None else pending.grads.get(self.key)
        p = None if entry is None else entry[1]()
        if p is not None and (p.grad is None or p.grad is not entry[2]() or _zeroed(p.grad)):
            with _lock:
                pending.grads.pop(self.key, None)
        return None


def retire_replaced(model: torch.nn.Module, before: dict, by: str) -> None:
    """After `by` (the function) swapped layers of `model` or their Parameters: `before` maps each layer's
    name to its {key: Parameter} before the swap; every one of those the model no longer holds is retired,
    named "{key} of layer {name!r}" (sparsify_, densify_ and keep_channels_ alike)."""
    kept, regrad = {id(p) for p in model.parameters()}, []
    for name, params in before.items():
        now = dict(model.get_submodule(name).named_parameters()) if params else {}
        for key, p in params.items():
            if id(p) not in kept:  # (in its place: the same key, or a CSR/BSR weight's values for a dense weight)
                new = now.get(key, now.get(key + ".values", now.get(key.removesuffix(".values"))))
                if retire(p, f"{key} of layer {name!r}", by, new):
                    regrad.append(new)
    held = [(n, p) for n, p in model.named_parameters() if p.grad is not None and p.requires_grad] if regrad else []
    if held:  # (the other layers' gradients of that backward: a step mixing them with later ones is refused)
        pending = _Pending(held)
        with _lock:
            for new in regrad:
                _regrad[new] = _regrad[new][:2] + (pending,)


def _replacement(entry: tuple) -> torch.Tensor | None:
    """The Parameter now in a retired one's place, through later swaps (sparsify_, then densify_), or None."""
    for _ in range(64):  # (each swap makes new Parameters: a chain, never a cycle)
        new = entry[2]() if entry[2] is not None else None
        entry = _retired.get(new) if new is not None else None
        if entry is None:
            return new
    return None


def _check_state_shapes(optimizer, args, kwargs):
    with _lock:
        _optimizers.add(optimizer)
        watched = list(_resized.items())
        stale = [(p, t) for p, t in _stale.items() if len(t)]
        retired = len(_retired) > 0
        regrad = len(_regrad) > 0
    params = [p for group in optimizer.param_groups for p in group["params"]] if retired or regrad else []
    held = {id(p) for p in params}
    # (a step changes only parameters with a gradient: none at all, as with no backward yet, is PyTorch's no-op)
    grads = any(p.grad is not None for p in params)
    for g, group in enumerate(optimizer.param_groups if regrad else ()):
        for i, p in enumerate(group["params"]):
            entry = _regrad.get(p)
            mixed = entry[2].stale() if entry is not None and p.grad is not None and entry[2] is not None else None
            if mixed is not None:
                raise ValueError(
                    f"{type(optimizer).__name__} param_groups[{g}]['params'][{i}] is the {entry[0]} as {entry[1]} "
                    f"made it, whose gradient comes from backwards after {entry[1]}, while parameter {mixed!r} still "
                    f"holds its gradient of a backward before {entry[1]}: {entry[1]} dropped that layer's share, so "
                    f"this step would train the rest on both backwards and that layer on the later one only; step or "
                    f"zero_grad(set_to_none=True) before {entry[1]}, or run both backwards after it")
            if entry is not None and p.grad is not None:
                with _lock:  # (a backward since the swap)
                    _regrad.pop(p, None)
            elif entry is not None and grads and p.requires_grad:
                raise ValueError(
                    f"{type(optimizer).__name__} param_groups[{g}]['params'][{i}] is the {entry[0]} as {entry[1]} "
                    f"made it, without a gradient while other parameters have one: {entry[1]} dropped the gradient "
                    f"the replaced tensor held (a backward before {entry[1]}, not stepped), so this step would train "
                    f"the rest without that layer; step before {entry[1]}, or run the backward again after it")
    for g, group in enumerate(optimizer.param_groups if retired else ()):
        for i, p in enumerate(group["params"]):
            entry = _retired.get(p)
            # (a gradient: another model still uses that layer; frozen: a layer no optimizer trained, before
            # either, unless its replacement was unfrozen since, which this optimizer then does not train)
            if entry is not None and p.grad is not None and entry[3]:
                with _lock:  # (a gradient since the swap: none was lost)
                    _retired[p] = entry[:3] + (False,)
            if entry is None or p.grad is not None:
                continue
            what, by, _, dropped = entry
            new = _replacement(entry)
            if new is not None and id(new) in held:  # (it trains the replacement too)
                continue
            active = grads or (new is not None and new.grad is not None)
            where = f"{type(optimizer).__name__} param_groups[{g}]['params'][{i}] is the {what}, which {by} replaced"
            if p.requires_grad and (active or dropped):
                raise ValueError(
                    f"{where}, and has no gradient: the model no longer uses it, so this optimizer would train "
                    f"nothing there; build the optimizer after {by}, from model.parameters()" + (
                        f" ({by} dropped the gradient it held: a model that still runs that layer needs its backward "
                        f"again after {by}, or its step before)" if dropped else ""))
            if not p.requires_grad and active and new is not None and new.requires_grad:
                raise ValueError(
                    f"{where} while frozen (requires_grad=False); its replacement requires grad now, and this "
                    f"optimizer does not hold it, so it would train nothing there; build the optimizer after {by} "
                    f"and the unfreezing, from model.parameters()")
    for p, former in watched:  # (first: a stale tensor of another shape is told its shape)
        for key, t in optimizer.state.get(p, {}).items():
            if isinstance(t, torch.Tensor) and t.shape in former and t.shape != p.shape:
                raise ValueError(
                    f"{type(optimizer).__name__} state {key!r} of a sparse weight's values has shape "
                    f"{tuple(t.shape)}, the values now {tuple(p.shape)}: {former[t.shape]}")
    for p, tensors in stale:
        for key, t in optimizer.state.get(p, {}).items():
            if isinstance(t, torch.Tensor) and t in tensors:
                raise ValueError(
                    f"{type(optimizer).__name__} state {key!r} of a sparse weight's values belongs to its former "
                    f"pattern: load_state_dict has since given the layer another pattern of the same nnz, so "
                    f"that state would move to other weights; {_AFTER_LOAD}")
    if not isinstance(optimizer, _TORCH_OPTIMS):
        return
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            for key, t in optimizer.state.get(p, {}).items():
                if key in _PER_ELEMENT and isinstance(t, torch.Tensor) and t.shape != p.shape:
                    raise ValueError(
                        f"{type(optimizer).__name__} state {key!r} of param_groups[{g}]['params'][{i}] has "
                        f"shape {tuple(t.shape)}, the parameter {tuple(p.shape)}: the optimizer's state was "
                        f"saved for other parameters (sparsify_ changes a model's parameters, their order and "
                        f"shapes: a dense model's optimizer state does not fit the sparse model's); build the "
                        f"optimizer after sparsify_, or load state saved with the sparse model")
