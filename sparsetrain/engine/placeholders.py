"""The modules that stay at their names in a fused model (engine/fused.py, fuse_): the BatchNorm
and ReLU a SparseConvBNReLU computes, as pass-through placeholders holding the same parameters and
buffers (forward hooks still see each activation), and the 2x2 max-pooling on its C++ kernel.

Their forwards (and the fused layer's, engine/fused.py) hand tensors on through module state and
check them by identity, which torch.compile cannot trace: they run eagerly under it (`eager` of
engine/autograd.py: torch.compiler.disable, a graph break each) and the rest of the model compiles
around them."""
from __future__ import annotations

import functools
import threading

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from . import ops  # noqa: F401  (loads the C++ extension and max_pool2x2's autograd: MaxPool2x2 runs them)
from .args import pair, refuse_fx_proxy
from .autograd import eager

__all__ = ["FusedBatchNorm2d", "FusedReLU", "HandOff", "MaxPool2x2"]


def _backward_hooked(*modules: nn.Module, global_hooks: bool = True) -> bool:
    """A full backward hook (on one of `modules`, or a global one unless `global_hooks` is off) wraps
    their inputs and outputs in new tensors, whose gradients a pass-through placeholder cannot give
    as the unfused module would."""
    if global_hooks and (_nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks):
        return True
    return any(m._backward_hooks or m._backward_pre_hooks for m in modules)


def _watched(*modules: nn.Module, global_hooks: bool = True) -> bool:
    """A hook (on one of `modules`, or a global one unless `global_hooks` is off) would see the
    tensors these modules pass on: the fused layers then hand them the real tensors (no deferred BN,
    no pooling in the BN pass, no replicated head); fuse_ leaves such modules unfused."""
    if global_hooks and (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks):
        return True
    return (_backward_hooked(*modules, global_hooks=global_hooks)
            or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def _hands_on() -> bool:  # (no module-state hand-offs under saved-tensor hooks: a checkpoint's recompute)
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _recomputing() -> bool:
    """Inside a backward pass, under saved-tensor hooks: torch.utils.checkpoint(use_reentrant=False)
    recomputing a segment."""
    return torch._C._current_graph_task_id() != -1 and not _hands_on()


def _refuse_reentrant_recompute(m: nn.Module) -> None:
    """A forward with autograd on inside a backward pass, without saved-tensor hooks: the recompute of
    torch.utils.checkpoint(use_reentrant=True), which reruns each segment alone from what its first,
    no-grad pass handed across the segment's borders: in a fused model a BN's input y may stand there
    in an activation's place, and a deferred BN's backward belongs to the next segment (gradients were
    silently lost or wrong). The non-reentrant checkpoint recomputes under saved-tensor hooks, where
    the layers hand nothing on (_hands_on)."""
    if torch._C._current_graph_task_id() != -1 and torch.is_grad_enabled() and _hands_on():
        raise RuntimeError(f"a fused {type(m).__name__} was recomputed by torch.utils.checkpoint(..., "
                           "use_reentrant=True), which fused models do not support: use use_reentrant=False, or "
                           "call sparsetrain.unfuse_(model) first")


def _refuse_no_grad_hand_over(m: nn.Module, x: torch.Tensor, handed: torch.Tensor) -> torch.Tensor:
    """`handed` (what m returns for x), unless it was made without autograd while m runs with it on x:
    the first, no-grad pass of torch.utils.checkpoint(use_reentrant=True) handing across a segment
    border to code run with autograd (checkpoint_sequential's last segment): the gradient would stop
    there, silently."""
    if torch.is_grad_enabled() and x.requires_grad and not handed.requires_grad:
        raise RuntimeError(f"a fused {type(m).__name__} was handed its output by a forward run without "
                           "autograd (torch.utils.checkpoint(..., use_reentrant=True), which fused models do not "
                           "support): use use_reentrant=False, or call sparsetrain.unfuse_(model) first")
    return handed


def _refuse_tracing(m: nn.Module, x) -> None:
    """torch.fx.symbolic_trace and torch.jit.trace cannot run a fused module's forward (module state,
    identity checks): fx's proxies failed on its control flow, jit.trace with "unordered_map::at" inside
    the fused Function or "repeat must be an int >= 1, got tensor(49)" in the fused head."""
    refuse_fx_proxy(x, f"a fused {type(m).__name__}")
    if torch.jit.is_tracing():
        raise RuntimeError(f"torch.jit.trace cannot trace a fused {type(m).__name__}: trace the unfused model "
                           "(sparsetrain.unfuse_(model)), or use torch.export")


def _refuse_unsupported(m: nn.Module, x) -> None:
    """What a fused module cannot take: a reentrant checkpoint's recompute, a full backward hook, tracing,
    torch.func transforms (the fused Function has no setup_context: PyTorch's error asked for one)."""
    _refuse_tracing(m, x)
    if torch._C._are_functorch_transforms_active():  # (PyTorch's own condition for that error)
        raise NotImplementedError(f"torch.func transforms (vmap, grad, jacrev, jvp) cannot run a fused {type(m).__name__}: "
                                  "call sparsetrain.unfuse_(model) first (torch.func.vmap runs the unfused sparse "
                                  "layers), or use torch.autograd")
    _refuse_reentrant_recompute(m)
    if _backward_hooked(m):
        raise RuntimeError(f"a full backward hook on a fused {type(m).__name__} (or a global one) is not supported: "
                           "register it before fuse_() (that layer then stays unfused) or call sparsetrain.unfuse_(model)")


def _same_data(x: torch.Tensor, handed: torch.Tensor) -> bool:
    """x is `handed` or a view of the same elements (a reentrant checkpoint's detached segment input)."""
    return x is handed or (x.data_ptr() == handed.data_ptr() and x.shape == handed.shape
                           and x.stride() == handed.stride() and x.dtype == handed.dtype)


def _check_bn(bn: nn.BatchNorm2d, batch_stats: bool, n: int | None = None, shape=(), device=None,
              update: bool = False) -> None:
    """F.batch_norm's argument checks (batch statistics from n values per channel; the fused
    statistics also need a non-empty batch), and bn_scale_shift's on the BN's tensors, naming them
    (`bn.running_var`: the C++ op's message named neither the BN nor its attribute): each 1-D floating,
    of num_features channels, on `device` (y's); the running ones when read (eval, or `update`)."""
    if bn.eps <= 0 if batch_stats else bn.eps < 0:
        raise ValueError(f"batch_norm eps must be {'positive during training' if batch_stats else 'non-negative'}, "
                         f"but got {bn.eps}")
    if batch_stats and n is not None and n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape)}"
                         if n else f"the fused BatchNorm needs a non-empty batch in training, got input size {tuple(shape)}")
    running = ("running_mean", "running_var") if update or not batch_stats else ()
    if running and (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"bn.running_mean and bn.running_var ({type(bn).__name__}) must both be tensors or both None")
    for name in ("weight", "bias") + running:
        t = getattr(bn, name)
        if t is not None and (not t.is_floating_point() or t.dim() != 1 or t.shape[0] != bn.num_features
                              or device is not None and t.device != torch.device(device)):
            raise (TypeError if not t.is_floating_point() else ValueError)(
                f"bn.{name} ({type(bn).__name__}) must be a 1-D floating tensor of {bn.num_features} channels (its "
                f"num_features){f' on {device}, as the input' if device is not None else ''}, got {list(t.shape)} "
                f"{t.dtype} on {t.device}")
    if not update:
        return
    rm, rv, nbt = bn.running_mean, bn.running_var, bn.num_batches_tracked
    if (bad := TypeError if rm.dtype != rv.dtype or rm.dtype not in (torch.float32, torch.float64) else
            ValueError if not (rm.is_contiguous() and rv.is_contiguous()) else None):
        raise bad(f"bn.running_mean and bn.running_var ({type(bn).__name__}) must be contiguous and both float32 or "
                  f"both float64 to be updated, got {rm.dtype} and {rv.dtype}")
    if nbt is None and bn.momentum is None:
        raise ValueError(f"bn.num_batches_tracked ({type(bn).__name__}) is needed when bn.momentum is None")
    if nbt is not None and (nbt.dtype != torch.int64 or nbt.numel() != 1 or nbt.device != rm.device):
        raise (TypeError if nbt.dtype != torch.int64 else ValueError)(
            f"bn.num_batches_tracked ({type(bn).__name__}) must be a one-element int64 tensor on {rm.device}, got "
            f"{list(nbt.shape)} {nbt.dtype} on {nbt.device} (Module.type() casts it: .double() or .to(dtype) keep it)")


def _count_positive(counts: torch.Tensor, act: torch.Tensor) -> None:
    """counts += per neuron, the samples with act > 0 (the kernels' relu_counts, off the CPU path)."""
    flat = act.detach().reshape(act.shape[0], -1)
    if counts.numel() != flat.shape[1]:
        raise ValueError(f"relu_counts must have one entry per neuron ({flat.shape[1]}), got {counts.numel()}")
    counts += (flat > 0).sum(0).to(counts)


def _marks_refusal(forward):
    """A placeholder's forward: a refusal it raises marks it (`_raised`), so that its fused conv's next
    call does not take the placeholders after it, which that forward never reached, as skipped."""
    @functools.wraps(forward)
    def wrapped(self, input):  # (the name of the replaced module's argument: module(input=x) works)
        try:
            return forward(self, input)
        except BaseException:
            self._raised = True
            raise
    return wrapped


class _PerThread:
    """A hand-over attribute, kept per thread: two threads running one model at once each hand their
    own tensors on, as each would through a copy of the model (before, one thread's deferred BN
    could be taken by the other's next conv, and that thread's conv then read a raw activation as
    normalised: a wrong result without an error). None until set in this thread."""

    SLOT = "_sparsetrain_handoffs"  # (the module's threading.local, in its __dict__)

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        local = obj.__dict__.get(self.SLOT)
        return None if local is None else getattr(local, self.name, None)

    def __set__(self, obj, value):
        _set_handoff(obj, self.name, value)


def _set_handoff(obj, name: str, value) -> None:
    """obj's hand-over attribute `name` set in this thread's slot (a threading.local made on the first set only)."""
    d = obj.__dict__
    local = d.get(_PerThread.SLOT)
    if local is None:
        local = d.setdefault(_PerThread.SLOT, threading.local())
    setattr(local, name, value)


class HandOff:
    """A module that receives tensors from another through attributes (`_transient`, one forward's
    hand-overs, part of its autograd graph, each kept per thread: _PerThread): a copy or pickle of
    the model (deepcopy, torch.save) leaves them out, as it leaves out graphs, also after a forward
    that stopped half-way."""

    _transient: tuple = ("_pending", "_raised")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls._transient:  # (replaces the class's `= None` default)
            setattr(cls, name, _PerThread(name))

    def __getstate__(self):
        state = super().__getstate__()
        state.pop(_PerThread.SLOT, None)
        return state

    def __setattr__(self, name, value):
        # (a hand-over straight to its slot: nn.Module.__setattr__'s parameter, module and buffer checks cost ~1 µs
        # a set, ~220 sets a ResNet-18 step, ~5% of a batch-1 fused step)
        if name in self._transient:
            _set_handoff(self, name, value)
        else:
            super().__setattr__(name, value)


def _rebuild_bn(bn: nn.BatchNorm2d, cls: type) -> nn.BatchNorm2d:
    """A `cls` (BatchNorm2d or FusedBatchNorm2d) holding bn's own parameter and buffer objects
    (optimizers and other references keep working)."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.weight, new.bias = bn.weight, bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(bn, name))
    return new.train(bn.training)


class FusedBatchNorm2d(HandOff, nn.BatchNorm2d):
    """A BatchNorm2d computed by the SparseConvBNReLU before it: same parameters and buffers; its
    forward returns what that layer computed for it (hooks see the normalised activation)."""

    _transient = ("_pending", "_raised", "_plain", "_through")
    _pending: tuple | None = None  # (the tensor this module will be called on, its output)
    _plain: bool | None = None  # (True while the SparseConvBNReLU owning it runs the unfused ops: a hook watches it)
    # (under torch.utils.checkpoint's saved-tensor hooks: whether its conv handed it its output, which it passed
    # through, or, conv -> ReLU -> BN, the BN's input; and whether what it returned required grad. A checkpoint
    # segment starting here recomputes it so)
    _through: tuple[bool, bool] | None = None

    @eager
    @_marks_refusal
    def forward(self, input):  # (nn.Module's argument name: module(input=x) works)
        if self._plain:
            return nn.BatchNorm2d.forward(self, input)
        x = input
        pending, self._pending = self._pending, None
        _refuse_unsupported(self, x)
        if pending is None and self._through is not None and _recomputing():
            return x if self._through[0] else self._recompute(x, self._through[1])
        if pending is not None and not _hands_on():
            self._through = (pending[0] is pending[1], pending[1].requires_grad)
        if pending is None or pending[0] is not x:
            raise RuntimeError("FusedBatchNorm2d was called on a tensor its fused conv did not produce: a hook "
                               "added after fuse_() changed it (a forward pre-hook on this BN, or a forward hook on "
                               "the module before it; register it before fuse_(): that layer then stays unfused), "
                               "or the model's graph changed after fuse_(); call sparsetrain.unfuse_(model); or "
                               "this BN belongs to a SparseConvBNReLU built directly, which applies it itself (call "
                               "the layer alone, or build it with owns_bn=False)")
        return _refuse_no_grad_hand_over(self, x, pending[1])

    def _recompute(self, x: torch.Tensor, grad: bool) -> torch.Tensor:
        """torch.utils.checkpoint(use_reentrant=False) recomputing a segment that starts after the fused conv
        (conv -> ReLU -> BN): nothing handed. Its first forward ran under the same hooks, where this module
        returned the conv's BN(x), saving no tensor, so the recompute must save none either (checkpoint checks):
        BN(x) without autograd and without a second running-statistics update, requiring grad as that output
        did (`grad`; x, the conv's y, does not: the gradient went through the output). A recompute's graph is
        never run backward: only the tensors the segment's later modules save are used, which need the values,
        and the graph they were saved in."""
        batch = self.training or self.running_mean is None
        with torch.no_grad():
            out = torch.nn.functional.batch_norm(x, None if batch else self.running_mean,
                                                 None if batch else self.running_var, self.weight, self.bias, batch,
                                                 0.0, self.eps)
        return out.requires_grad_(grad)


def _check_taken(*modules: nn.Module, hooked: bool = False, layer: nn.Module | None = None) -> None:
    """Before a fused conv runs: its last forward called each of its placeholders (`modules`: the
    BN, ReLU and pool it computes for, in call order) after it. A forward that skipped one (a branch
    fx traced the other way, or part of the model called alone) got it applied anyway: a skipped pool
    even handed the next layer the BN's input. From the first module with a hook on (all of them when
    `hooked`: the conv has one), a hand-over left is not taken for a skip (the hook may have raised: a
    NaN guard's skipped batch). Told once: every hand-over is dropped. A ReLU shared with other fused
    layers may hold another `layer`'s hand-over: hooks from that layer on count then."""
    modules = [m for m in modules if m is not None]
    skipped = []
    for m in modules:  # (in call order: a hook's error stops the forward at its module, not a skip)
        hooked = hooked or _watched(m)
        owner = m._pending[-1] if isinstance(m, FusedReLU) and m._pending is not None else layer
        if owner is not layer and owner is not None:  # (its conv, then its placeholders up to this ReLU)
            chain = owner._placeholders
            left = not _watched(owner, *chain[:chain.index(m) + 1] if m in chain else chain)
        else:
            left = not hooked
        if m._pending is not None and left:
            skipped.append(type(m).__name__)
    refused = any(m._raised for m in modules)  # (that forward stopped at a refusal: told then)
    for m in modules:
        m._pending = m._raised = None
    if skipped and not refused:
        raise RuntimeError(f"the last forward did not call this {' / '.join(skipped)} after its fused conv: a branch, "
                           "or part of the model called alone (fuse_() fixed the graph: call sparsetrain.unfuse_(model)"
                           "), or that forward stopped at an error raised in between (told once: run again)")


class FusedReLU(HandOff, nn.ReLU):
    """A ReLU applied by the SparseConvBNReLU before it: passes its input through (forward hooks
    still see the activation, for the entropy of Eq. 1). With `shared` (set by fuse_: a ReLU module
    called at several sites, torchvision's residual blocks), a call no fused layer handed a tensor
    (`out += identity; out = self.relu(out)`) applies the ReLU, as nn.ReLU (in place where built so);
    a checkpoint segment that starts at its fused site recomputes it without the hand-over: it applies
    the ReLU and saves its output, which torch.utils.checkpoint's check refuses (CheckpointError).
    With `count_states` set, each call of that layer also counts, per neuron of this activation, the
    samples where it is positive, inside the kernel that applies the ReLU; a forward hook on this
    module takes them with pop_state_counts() (the activation entropy does, instead of reading the
    activation again)."""

    count_states = False
    shared = False  # called at other sites too, where it applies the ReLU (set by fuse_)
    _state_counts: torch.Tensor | None = None
    _pending: tuple | None = None  # (the tensor this module will be called on, the fused layer that handed it)
    _transient = ("_state_counts", "_pending", "_raised", "_returned")

    @eager  # (the identity its fused layer's successor checks: no traced copy)
    @_marks_refusal
    def forward(self, input):  # (nn.Module's argument name: module(input=x) works)
        x = input
        pending, self._pending = self._pending, None
        _refuse_unsupported(self, x)
        if pending is None and self.shared:  # (a site no fused layer precedes: fuse_ checked that a fused layer's
            return super().forward(x)  # site is the ReLU's next call)
        if pending is not None and not _same_data(x, pending[0]):  # (its layer applied the ReLU to other values)
            raise RuntimeError("FusedReLU was called on a tensor its fused conv did not hand it: a hook added "
                               "after fuse_() changed it (a forward pre-hook on this ReLU, or a forward hook on the "
                               "module before it; register it before fuse_(): that layer then stays unfused), or "
                               "the model's graph changed after fuse_(); call sparsetrain.unfuse_(model)" + (
                                   "; or, at another site of this shared ReLU, the last forward stopped at an error "
                                   "between a fused conv and its site (told once: run again)" if self.shared else ""))
        if self._state_counts is not None:
            self._returned = x  # (the activation the counts are of: pop_state_counts)
        return x

    def pop_state_counts(self, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The int64 counts [neurons] of this module's latest activation, once; None when its layer
        did not count it (count_states off, or already taken), or when `out` (a forward hook's output
        argument) is not that activation: a hook before it returned another tensor, count `out`."""
        counts, self._state_counts = self._state_counts, None
        returned, self._returned = self._returned, None
        return None if out is not None and out is not returned else counts


class MaxPool2x2(HandOff, nn.MaxPool2d):
    """nn.MaxPool2d(2) (stride 2, no padding, floor) on the C++ kernel `max_pool2x2` for CPU float
    tensors: the same outputs, ties and NaN, and gradients, one pass each way with one-byte window
    positions (forward on a [128, 32, 32, 32] batch: 1.1 ms, PyTorch's CPU kernel ~14 ms). Swapped
    in by fuse_; other devices, dtypes and autocast use nn.MaxPool2d's forward. When the fused layer
    before it pooled its own output in its BN pass (SparseConvBNReLU.pools), it returns that."""

    _pending: tuple | None = None  # (the tensor this module will be called on, the pooled output)
    fed = False  # a fused layer may pool into it (its `pools`): set by fuse_

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # (other settings were taken and ignored: the kernel pools 2x2)
        got = [pair(getattr(self, a), a) for a in ("kernel_size", "stride", "padding", "dilation")]
        if got != [[2, 2], [2, 2], [0, 0], [1, 1]] or self.ceil_mode or self.return_indices:
            raise ValueError(f"MaxPool2x2 is nn.MaxPool2d(2) only (kernel 2, stride 2, padding 0, dilation 1, no "
                             f"ceil_mode or return_indices), got {self.extra_repr()}: use nn.MaxPool2d")

    @eager
    @_marks_refusal
    def forward(self, input):  # (nn.Module's argument name: module(input=x) works)
        x = input
        pending, self._pending = self._pending, None
        if self.fed:  # (alone, a recompute of it is safe)
            _refuse_reentrant_recompute(self)
        if pending is not None:
            if pending[0] is not x:
                raise RuntimeError("MaxPool2x2 was called on a tensor its fused layer did not hand it; the "
                                   "model's graph changed after fuse_(), or torch.utils.checkpoint(..., "
                                   "use_reentrant=True) cut the model here (use use_reentrant=False): call "
                                   "sparsetrain.unfuse_(model)")
            return _refuse_no_grad_hand_over(self, x, pending[1])
        if (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu")):
            out = torch.ops.sparsetrain.max_pool2x2(x)[0]  # (NCHW-contiguous, whatever x's layout)
            if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                out = out.contiguous(memory_format=torch.channels_last)  # (as nn.MaxPool2d keeps it: the same values)
            return out
        return super().forward(x)
