"""Activation-state entropy of a model (DSD² Eq. 1), over the whole un-augmented training set.

For every ReLU-activated neuron i of layer l (each channel x position of a conv output, each unit
of a linear one), p_i = (# samples with activation > 0) / (# samples), the frequency of the
"positive" state (paper's ζ = 1; a zero pre-activation is the negative state, as in the authors'
code). Its binary entropy, in bits (log base 2, so 0 <= H <= 1):

    H_i = -p_i log2 p_i - (1 - p_i) log2(1 - p_i),   with 0 log 0 = 0.

The layer's entropy is the mean of H_i over its N_l neurons; the model's is the unweighted mean
over layers. Unlike the authors' script (whose hooks come off after the first batch, so its average
over batches is the first batch's entropy), p is counted over all batches before any log is taken.
Every ReLU output must hold the batch's samples along its first dimension (p is a frequency over
samples): a model that folds positions into dim 0 or runs [T, B, E] is refused, not mis-counted, and
so is one calling a ReLU in some batches only. A NaN activation has no ON/OFF state (NaN > 0 is
false: it counted as OFF, so a diverged model read as dead, 0 bits): when the model's output holds a
NaN on any batch (NaN propagates to it through convs, pooling and ReLU), every value returned is NaN.

Layers are the call sites of `nn.ReLU` modules, found by forward hooks: relu(x) > 0 iff x > 0, so
counting positive outputs equals counting positive pre-activations, also for in-place ReLUs. A
module called k times in one forward (a reused ReLU) gives k layers, named `name`, `name#1`, ...
Counting uses the C++ op `sparsetrain.engine.ops.relu_count_` on CPU, a torch reduction elsewhere.
A fused layer's ReLU (`FusedReLU`, engine/fused.py) is counted inside the kernel that applies it
(the conv's epilogue or `bn_act`, while the output is in cache): its `count_states` is set for
the pass and the hook takes the layer's counts instead of reading the activation again.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from ..engine.fused import FusedReLU
from ..engine.hooks import hooked_eval

__all__ = ["activation_entropy", "binary_entropy"]


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -p log2 p - (1-p) log2(1-p) in bits, elementwise, with H(0) = H(1) = 0; p a tensor or a
    number of probabilities in [0, 1] (NaN gives NaN; outside [0, 1] the formula gave -inf: refused)."""
    if isinstance(p, bool) or not isinstance(p, (torch.Tensor, numbers.Real)):
        raise TypeError(f"p must be a tensor or a number (probabilities), got {type(p).__name__}")
    p = torch.as_tensor(p).double()
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError(f"p must hold probabilities in [0, 1], got values from {float(p.nan_to_num(0.5).min())} "
                         f"to {float(p.nan_to_num(0.5).max())}")
    return (torch.special.entr(p) + torch.special.entr(1.0 - p)) / math.log(2.0)


def _counter():
    """The counting function: the C++ op when the extension loads, else a torch fallback."""
    try:
        from ..engine.ops import relu_count_
    except Exception:  # extension not built: same result, slower
        relu_count_ = None

    def count_(counts: torch.Tensor, out: torch.Tensor) -> None:
        if (relu_count_ is not None and out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64)
                and out.dim() >= 2):  # (the C++ op's cases; half precision and [B] outputs below)
            relu_count_(counts, out)
        else:
            counts += (out.detach().reshape(out.shape[0], -1) > 0).sum(0).to(counts)
    return count_


def _has_nan(out):
    """Whether a model output (a tensor, or a tuple/list/dict of them) holds a NaN: a bool tensor on
    its device (summed over the batches, read once: no sync per batch on a GPU), or False."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return sum((_has_nan(o) for o in out), False)
    return isinstance(out, torch.Tensor) and out.is_floating_point() and torch.isnan(out).any()


class _counting:
    """Within: the fused layers count their FusedReLU's states (count_states), restored after."""

    def __init__(self, relus: list):
        self.relus = relus

    def __enter__(self):
        for m in self.relus:
            m.count_states = True

    def __exit__(self, *exc):
        for m in self.relus:
            m.count_states = False
            m._state_counts = m._returned = None  # (an error in a hook left them: no activation kept)


@torch.no_grad()
def activation_entropy(model: nn.Module, batches: Iterable, *, device=None,
                       relu_types: tuple[type, ...] = (nn.ReLU,), reduce=None) -> dict:
    """Eq. 1 of the paper for `model` over `batches` (an iterable of input tensors [B, ...] or of
    tuples/lists whose first item is the input, e.g. sparsetrain.data.iterate(..., augment=False)).

    Runs the model in eval mode without gradients (restoring its mode after). Returns
    {"mean": float (bits, mean over layers), "per_layer": {layer: float bits},
     "neurons": {layer: N_l}, "samples": int}; "mean" and "per_layer" NaN when an output held a NaN.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batches, torch.Tensor):  # (iterating it would count each sample's features as samples;
        # checked before the hooks go on: raised after, it left them on the model for good)
        raise TypeError("batches must be an iterable of batches, not a tensor: wrap one batch as [x]")
    if not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}")
    types = relu_types if isinstance(relu_types, tuple) else (relu_types,)
    if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"relu_types must be an nn.Module subclass or a tuple of them, got {relu_types!r}")
    if reduce is not None and not callable(reduce):
        raise TypeError(f"reduce must be a function (tensor -> tensor summed over ranks) or None, got "
                        f"{type(reduce).__name__}")
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, relu_types)]
    if not relus:
        raise ValueError(f"model has no {[t.__name__ for t in types]} modules to hook; Eq. 1 "
                         "needs ReLU activations as modules (not torch.relu calls)")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise (TypeError if not isinstance(device, str) else ValueError)(
            f"device must be a torch.device or device string, got {device!r}") from e
    count_ = _counter()
    counts: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    batch_rows = [0]  # the current batch's samples: every ReLU output must hold them along dim 0

    def make_hook(name):
        def hook(_mod, _inp, out):
            k = calls.get(name, 0)
            calls[name] = k + 1
            key = name if k == 0 else f"{name}#{k}"
            if out.dim() == 0 or out.shape[0] != batch_rows[0]:
                raise ValueError(f"layer {key!r} returned shape {tuple(out.shape)} for a batch of {batch_rows[0]} "
                                 "samples: Eq. 1 counts each neuron's positive samples, so every ReLU output "
                                 "must be [batch, ...] (a model folding positions into dim 0 or running "
                                 "[T, B, E] has no per-sample neurons here)")
            if key not in counts:
                counts[key] = torch.zeros(out[0].numel(), dtype=torch.int64, device=out.device)
            elif counts[key].numel() != out[0].numel():
                raise ValueError(f"layer {key!r} changed its number of neurons between batches "
                                 f"({counts[key].numel()} -> {out[0].numel()}); inputs must share a shape")
            counted = _mod.pop_state_counts(out) if isinstance(_mod, FusedReLU) else None
            if counted is not None and counted.numel() == counts[key].numel():
                counts[key] += counted  # (counted by the fused layer's kernel)
            else:
                count_(counts[key], out)
        return hook

    handles = [m.register_forward_hook(make_hook(n or "relu")) for n, m in relus]
    fused = [m for _, m in relus if isinstance(m, FusedReLU)]
    samples, nan_batches, first_calls = 0, 0, None
    with hooked_eval(model, handles), _counting(fused):
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"batches must yield tensors or (tensor, ...) tuples, got {type(x).__name__}")
            if x.dim() < 2:
                raise ValueError(f"each batch must be [batch, ...] (>= 2-D), got shape {tuple(x.shape)}")
            calls.clear()
            batch_rows[0] = x.shape[0]
            if x.shape[0]:
                nan_batches += _has_nan(model(x.to(device, non_blocking=True)))
                if first_calls is None:
                    first_calls = dict(calls)
                elif calls != first_calls:  # (a layer seen in some batches only: p over all samples is wrong)
                    raise ValueError(f"the ReLU modules were called {calls} times in one batch but {first_calls} "
                                     "in the first: Eq. 1 needs every layer to see every sample (no "
                                     "data-dependent control flow around ReLUs)")
            samples += x.shape[0]
    if reduce is not None:  # data parallel: every rank counted its rows; p needs the totals
        # (the totals first, with the ranks that saw no sample: such a rank has no layer's counts to add, so
        # its reduces met other ranks' counts of other sizes, a gloo error on every rank, or a hang)
        mine = torch.tensor([samples, int(nan_batches), int(samples == 0)], dtype=torch.int64, device=device)
        samples, nan_batches, empty = reduce(mine).tolist()
        if empty and samples:
            raise ValueError(f"{empty} rank(s) got no sample in batches: every rank must count at least one (a "
                             f"data-parallel pass needs at least as many samples as ranks)")
        counts = {k: reduce(counts[k]) for k in sorted(counts)}
    if samples == 0:
        raise ValueError("batches yielded no samples; the entropy needs at least one input")
    if not counts:
        raise ValueError("no ReLU module was called during the forward passes")
    per_layer, neurons = {}, {}
    for key, c in counts.items():
        per_layer[key] = float(binary_entropy(c.double() / samples).mean())
        neurons[key] = c.numel()
    mean = sum(per_layer.values()) / len(per_layer)
    if int(nan_batches):  # (which layers the NaN passed through is unknown: none is reported)
        per_layer, mean = dict.fromkeys(per_layer, math.nan), math.nan
    return {"mean": mean, "per_layer": per_layer, "neurons": neurons, "samples": samples}
