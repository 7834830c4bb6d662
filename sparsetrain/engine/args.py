"""Argument parsing shared by the ops and the layers: nn.Conv2d-style int-or-pair and padding, a
layer's bias, a switch."""
from __future__ import annotations

import numbers
import sys

import numpy as np
import torch

__all__ = ["is_int", "check_flag", "pair", "conv2d_padding", "check_bias", "bias_parameter", "check_weight", "check_like", "check_bool_mask", "refuse_fx_proxy",
           "fixed_attribute", "MATERIALIZE"]

# what to do about a layer on the meta device (a shape without values), in every refusal of one
MATERIALIZE = ("materialize the layer first (module.to_empty(device=...), then load its state_dict; a dense "
               "layer may be initialized instead, but a sparse one's index comes only from a load)")


def is_int(a) -> bool:
    """An int, numpy's included (nn.Conv2d keeps np.int64 hyperparameters as given), but not a bool."""
    return isinstance(a, numbers.Integral) and not isinstance(a, bool)


def check_flag(v, name: str) -> None:
    """A switch argument: True or False (numpy's bool too); "no" or 0 was truthy or silently off."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {v!r}")


def pair(v, name: str) -> list[int]:
    """An int or a pair of ints as [a, b] of Python ints (TypeError naming `name` otherwise; ValueError for
    one past int64, which the ops' int[] refused as "Expected a value of type 'List[int]' ... found type 'list'").
    A one-int sequence is taken as F.conv2d and nn.Conv2d take it, for both dims (nn.Conv2d(3, 4, 3, stride=(2,))
    keeps stride (2,): such a conv was refused by sparsify_)."""
    if is_int(v):
        got = [int(v), int(v)]
    elif isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(is_int(a) for a in v):
        got = [int(v[0]), int(v[-1])]
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if not all(-2**63 <= a < 2**63 for a in got):
        raise ValueError(f"{name} must be in int64's range [-2^63, 2^63), got {v!r}")
    return got


def conv2d_padding(padding, kernel_size, stride) -> list[int]:
    """Resolve nn.Conv2d-style padding (int, pair, 'valid', 'same') to a symmetric [ph, pw]. (Compared with
    the strings only when a str: a numpy array's `==` raised numpy's "truth value ... is ambiguous".)"""
    if not isinstance(padding, str):
        return pair(padding, "padding")
    if padding not in ("valid", "same"):  # (as F.conv2d's "Invalid padding string"; "'SAME'" was a TypeError)
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    if padding == "valid":
        return [0, 0]
    if list(stride) != [1, 1] or any(k % 2 == 0 for k in kernel_size):
        raise ValueError("padding='same' is supported for stride 1 and odd kernel sizes only, "
                         f"got kernel_size={tuple(kernel_size)}, stride={tuple(stride)}")
    return [(k - 1) // 2 for k in kernel_size]


def check_bias(bias, out: int, values: torch.Tensor) -> None:
    """A layer's bias: None, or a tensor [out] of the weight values' dtype and device."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (out,):
        raise ValueError(f"bias must have shape ({out},), got {tuple(bias.shape)}")
    check_like(bias, "bias", values)


def bias_parameter(bias: torch.Tensor) -> torch.nn.Parameter:
    """A layer's own copy of `bias`: a Parameter's requires_grad carries over (a frozen layer stays
    frozen), a plain tensor's bias trains, as nn.Parameter(tensor) and CSR.from_dense's values (it was
    frozen: a tensor without requires_grad gave a bias that silently never trained)."""
    trainable = bias.requires_grad or not isinstance(bias, torch.nn.Parameter)
    return torch.nn.Parameter(bias.detach().clone(), requires_grad=trainable)


def check_like(t: torch.Tensor, name: str, values: torch.Tensor) -> None:
    """`t` (named `name`) on the weight values' dtype and device: TypeError for another dtype, else
    ValueError for another device."""
    if t.dtype != values.dtype or t.device != values.device:
        raise (TypeError if t.dtype != values.dtype else ValueError)(
            f"{name} must have the weight's dtype and device ({values.dtype}, {values.device}), got {t.dtype}, "
            f"{t.device}")


def check_weight(weight, mask=None) -> None:
    """A dense weight (and mask) to take values from: TypeError unless `weight` is a floating-point
    tensor; ValueError for a meta weight or mask (a shape without values: torch's errors from inside,
    .item() or nonzero() on meta tensors, or a masked_fill that silently changed nothing, before)."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():  # (values train: a float dtype)
        raise TypeError(f"weight must be a floating-point torch.Tensor, got "
                        f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.is_meta:
        raise ValueError(f"weight is a meta tensor (a shape without values): {MATERIALIZE}")
    if isinstance(mask, torch.Tensor) and mask.is_meta:
        raise ValueError("mask is a meta tensor (a shape without values): pass a mask holding its values")


def check_bool_mask(mask, shape, must: str) -> None:
    """A bool tensor of `shape`, else an error reading f"{must}, got <dtype shape | type>": TypeError for
    another type or dtype (a list, a float mask), ValueError for another shape."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == tuple(shape):
        return
    tensor = isinstance(mask, torch.Tensor)
    got = f"{mask.dtype} {tuple(mask.shape)}" if tensor else type(mask).__name__
    raise (ValueError if tensor and mask.dtype == torch.bool else TypeError)(f"{must}, got {got}")


def refuse_fx_proxy(x, what: str) -> None:
    """TypeError when torch.fx.symbolic_trace runs `what`'s forward (x is an fx Proxy): the layers' checks
    refused the proxies as "weight must be a sparsetrain.CSR, got CSR" (its values a Proxy), "x must be a
    torch.Tensor, got Proxy" or fx's "traced variables cannot be used as inputs to control flow"."""
    fx = sys.modules.get("torch.fx")  # (not imported here: fx is loaded only if a caller traces)
    if fx is not None and isinstance(x, fx.Proxy):
        raise TypeError(f"torch.fx.symbolic_trace cannot trace into {what}: trace the model with a torch.fx.Tracer "
                        "whose is_leaf_module(m, name) is True for sparsetrain's modules (type(m).__module__."
                        "startswith('sparsetrain.')), so that it calls them, or use torch.export")


def fixed_attribute(owner: str, name: str, value, read) -> property:
    """A read-only attribute of the layer class named `owner`: `value`, the only one its kernels take.
    Setting the same value (as `read` normalises it) is a no-op; another is a ValueError (kept, it
    would be silently ignored)."""
    def get(self):
        return value

    def refuse(self, v):
        if read(v) != value:
            raise ValueError(f"{owner} supports {name}={value!r} only, got {v!r}")
    get.__doc__ = f"{value!r}: the only {name} {owner} supports (the dense layer's attribute, which tools read)"
    return property(get, refuse)
