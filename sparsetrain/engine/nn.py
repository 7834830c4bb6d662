"""Sparse layers and the masks of a model's prunable layers.

`SparseLinear` and `SparseConv2d` hold a `CSR` weight (only nonzeros are parameters) and run the
sparsetrain ops (engine/convert.py's `sparsify_(model, masks)` swaps dense layers for them). A
model's prunable layers are its conv and linear layers, dense (`nn.Conv2d`/`nn.Linear` with a
bool mask kept beside the model) or sparse (whose CSR *is* the mask): `prunable_layers`,
`masks_of`, `model_sparsity`, and the dense masked training helpers `mask_grads_` /
`enforce_masks_`.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import ops
from .args import MATERIALIZE, bias_parameter, check_bias, fixed_attribute, is_int
from .formats import CSR, _check_mask, _fill_dense
from .index import check_index
from .torch_prune import bias_writer, check_own_bias, current_param, parametrized_of, pruned_by_torch

__all__ = ["SparseLinear", "SparseConv2d", "SPARSE_TYPES", "is_sparse", "stored_weight", "prunable_layers",
           "check_model", "check_masks", "check_untied", "masks_of", "valued_masks", "model_sparsity", "weight_count", "mask_grads_", "enforce_masks_"]


def _dense_args(mod: nn.Module, mask: torch.Tensor | None):
    """The weight, mask and bias from_dense converts. For a layer pruned with torch.nn.utils.prune,
    the product orig * mask computed now (`mod.weight` is recomputed only by the next forward: after
    an optimizer step it is stale) and the mask ANDed with prune's (masks only shrink)."""
    w, bias = current_param(mod, "weight"), current_param(mod, "bias")
    if pruned_by_torch(mod):
        keep = mod.weight_mask.to(w.device) != 0
        mask = keep if mask is None else _check_mask(w, mask) & keep
    return w, mask, bias


class _SparseLayer(nn.Module):
    """What SparseLinear and SparseConv2d share: a CSR weight of `ndim` dims, an optional dense
    bias, nnz/sparsity, and the copy back into the dense layer built by `_dense_layer()`."""

    ndim = 2
    shape_doc = "[out, in]"

    def __init__(self, weight: CSR, bias: torch.Tensor | None):
        super().__init__()
        if not isinstance(weight, CSR):
            raise TypeError(f"weight must be a sparsetrain.CSR, got {type(weight).__name__}")
        if len(weight.shape) != self.ndim:
            raise ValueError(f"weight must be {self.ndim}-D {self.shape_doc}, got shape {weight.shape}")
        self.weight = weight
        out = weight.shape[0]
        check_bias(bias, out, weight.values)
        if bias is not None:
            self.bias = bias_parameter(bias)
        else:
            self.register_parameter("bias", None)

    def to_dense(self) -> nn.Module:
        """The equivalent dense layer (zeros where pruned)."""
        check_own_bias(self, type(self).__name__)
        dense = self._dense_layer(bias=self.bias is not None, device=self.weight.values.device,
                                  dtype=self.weight.values.dtype)
        return _fill_dense(dense, self.weight, self.bias, self.training)

    @property
    def nnz(self) -> int:
        """Stored (surviving) weights."""
        return self.weight.nnz

    @property
    def sparsity(self) -> float:
        """Fraction of the dense weight pruned: 1 - nnz / (out * in [* kh * kw])."""
        return self.weight.sparsity

    def _sparse_repr(self) -> str:
        return f"bias={self.bias is not None}, nnz={self.nnz}, sparsity={self.sparsity:.4f}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw the kept weights and the bias as the dense layer's reset_parameters does (kaiming-uniform,
        bound 1/sqrt(fan_in) of the dense fan_in): under one seed, the dense layer's draws at the kept
        positions. The pattern stays (masks only shrink); in place, so an optimizer keeps its parameters. A bias a
        parametrization computes is set through its right_inverse; one it cannot be set in is refused first."""
        w = self.weight
        name = type(self).__name__.removeprefix("Parametrized")  # (parametrize's subclass: its layer's name)
        write_bias = bias_writer(self, name) if self.bias is not None else None
        check_index(w)  # (to_empty() without a load: no pattern to draw in; the draws' gather failed or drew garbage)
        dense = self._dense_layer(bias=self.bias is not None, device="meta", dtype=w.values.dtype)
        dense.to_empty(device=w.values.device).reset_parameters()  # (meta first: one draw, as nn.Linear's)
        w.values.copy_(dense.weight.reshape(w.shape[0], -1)[w.row_indices(), w.col_indices.long()])
        if write_bias is not None:
            write_bias(dense.bias)


class SparseLinear(_SparseLayer):
    """y = x W^T + b with W stored as CSR ([out_features, in_features])."""

    def __init__(self, weight: CSR, bias: torch.Tensor | None = None):
        super().__init__(weight, bias)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> "SparseLinear":
        """`linear`'s weights where `mask` (bool [out, in]; None: the nonzeros) is True, and its bias (copies:
        `linear` is left as it is). Under torch.nn.utils.prune, orig * mask now, within prune's mask too."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight, mask, bias = _dense_args(linear, mask)
        return cls(CSR.from_dense(weight, mask), bias)

    def _dense_layer(self, **kw) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, **kw)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (nn.Linear's argument name: input=x works)
        return ops.sparse_linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._sparse_repr()}"


class SparseConv2d(_SparseLayer):
    """F.conv2d(x, W, b, stride, padding) with W stored as CSR ([out, in, kh, kw]; rows = output
    channels, columns = in * kh * kw). Direct sparse convolution on CPU (csrc/cpu/sparse_conv2d.cpp);
    zero padding, dilation 1, groups 1."""

    ndim = 4
    shape_doc = "[out, in, kh, kw]"
    # nn.Conv2d's attributes that tools (FLOPs counters, exporters) read: the only values supported
    dilation = fixed_attribute("SparseConv2d", "dilation", (1, 1), lambda v: tuple(ops.pair(v, "dilation")))
    groups = fixed_attribute("SparseConv2d", "groups", 1, lambda v: v if is_int(v) else None)
    padding_mode = fixed_attribute("SparseConv2d", "padding_mode", "zeros", lambda v: v)

    def __init__(self, weight: CSR, bias: torch.Tensor | None = None, stride=1, padding=0):
        super().__init__(weight, bias)
        self.out_channels, self.in_channels = weight.shape[:2]
        self.kernel_size = tuple(weight.shape[2:])
        self.stride = tuple(ops.pair(stride, "stride"))
        self.padding = tuple(ops.conv2d_padding(padding, self.kernel_size, self.stride))
        if min(self.stride) < 1 or min(self.padding) < 0:  # (as nn.Conv2d refuses them at construction)
            raise ValueError(f"stride must be >= 1 and padding >= 0, got {stride!r}, {padding!r}")

    @classmethod
    def check_convertible(cls, conv: nn.Conv2d) -> None:
        """ValueError unless from_dense can convert `conv` (zero padding, dilation 1, groups 1)."""
        keep = "; keep this layer dense (leave it out of the masks given to sparsify_)"
        if tuple(conv.dilation) != (1, 1):
            raise ValueError(f"SparseConv2d supports dilation 1 only, got {conv.dilation}{keep}")
        if conv.groups != 1:
            raise ValueError(f"SparseConv2d supports groups=1 only, got {conv.groups}{keep}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}{keep}")
        ops.conv2d_padding(conv.padding, tuple(conv.kernel_size), tuple(ops.pair(conv.stride, "stride")))

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None) -> "SparseConv2d":
        """`conv`'s weights where `mask` (bool [out, in, kh, kw]; None: the nonzeros) is True, its bias, stride
        and padding (copies); check_convertible's ValueError for what the kernels do not take. Under
        torch.nn.utils.prune, orig * mask now, within prune's mask too."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        cls.check_convertible(conv)
        weight, mask, bias = _dense_args(conv, mask)
        return cls(CSR.from_dense(weight, mask), bias, conv.stride, conv.padding)

    def _dense_layer(self, **kw) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, **kw)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (nn.Conv2d's argument name)
        return ops.sparse_conv2d(input, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {self._sparse_repr()}")


# dense type -> sparse type (sparsify_ and densify_ look layers up here; exact types only).
SPARSE_TYPES: dict[type, type] = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


def _owners(modules: dict) -> dict:
    """id(parameter) -> {id(module): a name of it}: which modules hold each parameter."""
    owners = {}
    for n, m in modules.items():
        for t in m._parameters.values():
            owners.setdefault(id(t), {}).setdefault(id(m), n)
    return owners


def _tied(owners: dict, mod: nn.Module) -> tuple[str, str] | None:
    """(weight or bias, the other module's name) if `mod` shares it (a CSR copy would untie them)."""
    for what in ("weight", "bias"):
        p = mod._parameters.get(what, mod._parameters.get(what + "_orig"))
        tied = [n for i, n in owners.get(id(p), {}).items() if i != id(mod)] if p is not None else []
        if tied:
            return what, tied[0]
    return None


# ============================================================================ prunable layers and masks
def is_sparse(m: nn.Module) -> bool:
    """m is one of the engine's sparse layers (SparseLinear, SparseConv2d or a subclass)."""
    return isinstance(m, tuple(SPARSE_TYPES.values()))  # (SparseConvBNReLU is a SparseConv2d)


def stored_weight(m: nn.Module) -> torch.Tensor:
    """The tensor holding a conv/linear layer's weights: a dense layer's weight, a sparse (CSR/BSR)
    layer's stored values."""
    return m.weight if isinstance(m.weight, torch.Tensor) else m.weight.values


def check_model(model) -> nn.Module:
    """TypeError unless `model` is an nn.Module (a tensor or a state_dict passed for it raised an
    AttributeError, "'Tensor' object has no attribute 'named_modules'", from deep inside)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every conv/linear layer, dense or sparse, in module order; a dense one whose
    bias alone a parametrization computes (a Parametrized<Linear/Conv2d>: its weight is its own) too."""
    check_model(model)
    return [(n, m) for n, m in model.named_modules() if type(m) in SPARSE_TYPES or is_sparse(m) or (
        parametrized_of(m, SPARSE_TYPES) and "weight" in m._parameters)]


def check_masks(model: nn.Module, masks: dict | None, what: str = "masks") -> dict:
    """`masks` ({qualified layer name: bool mask of its weight's shape}, or None: {}) checked against
    `model`'s prunable layers: a key that names no such layer (a typo, or "fc.weight" for "fc") or a
    mask of another dtype or shape would otherwise be ignored or broadcast silently. A layer still
    under torch.nn.utils.prune, or whose weight a legacy weight_norm/spectral_norm hook or a parametrization
    (a Parametrized<Linear/Conv2d>, which the exact-type match would skip) recomputes, is refused, whatever
    the masks (its weight is stale or recomputed: pruned weights would regrow)."""
    layers = dict(prunable_layers(model))
    hooked = [n for n, m in layers.items() if pruned_by_torch(m)]
    if hooked:  # (their .weight is orig * mask as of the last forward: stale after a step, and recomputed)
        raise TypeError(f"layer {hooked[0]!r} is pruned with torch.nn.utils.prune: sparsify_ the model first (it "
                        "takes prune's mask), or call torch.nn.utils.prune.remove on it")
    reparam = [n for n, m in layers.items() if not is_sparse(m) and "weight" not in m._parameters]
    reparam += [n for n, m in model.named_modules()  # (a Parametrized<Linear>: skipped silently before)
                if parametrized_of(m, SPARSE_TYPES, "weight")]
    if reparam:  # (weight_norm / spectral_norm: a pre-forward hook recomputes .weight, pruned weights regrow)
        raise TypeError(f"layer {reparam[0]!r}'s weight is computed by a reparametrization (weight_norm, "
                        "spectral_norm, torch.nn.utils.parametrize), not a Parameter of its own: remove it first "
                        "(torch.nn.utils.remove_weight_norm / remove_spectral_norm, or parametrize."
                        "remove_parametrizations(layer, 'weight'))")
    if masks is None:
        return {}
    if not isinstance(masks, dict):
        raise TypeError(f"{what} must be a dict {{layer name: bool tensor}}, got {type(masks).__name__}")
    for name, mk in masks.items():
        if name not in layers:
            hint = (f" (a layer's name, not its weight's: {name[:-7]!r})" if isinstance(name, str)
                    and name.endswith(".weight") and name[:-7] in layers else "")
            raise KeyError(f"{what} names {name!r}, which is not a prunable layer of the model{hint}; "
                           f"prunable layers: {list(layers)}")
        shape = tuple(layers[name].weight.shape)
        if not isinstance(mk, torch.Tensor) or mk.dtype != torch.bool or tuple(mk.shape) != shape:
            got = f"{mk.dtype} {tuple(mk.shape)}" if isinstance(mk, torch.Tensor) else type(mk).__name__
            wrong_type = not isinstance(mk, torch.Tensor) or mk.dtype != torch.bool  # (a float mask: TypeError)
            raise (TypeError if wrong_type else ValueError)(
                f"{what}[{name!r}] must be a bool tensor of shape {shape}, got {got}")
        if mk.is_meta:  # (no values: masked_fill with it was silently a no-op, counting it failed inside torch)
            raise ValueError(f"layer {name!r}: its mask is a meta tensor: pass a mask holding its values (in {what})")
    return masks


def check_untied(model: nn.Module) -> None:
    """Refuse prunable layers sharing one weight (tied weights): ranked and counted once per layer,
    the tensor was counted twice, so the number pruned and the sparsity were not exact."""
    check_model(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    owners = _owners(modules)
    for name, m in prunable_layers(model):
        tied = None if is_sparse(m) else _tied(owners, m)
        if tied and tied[0] == "weight":
            raise ValueError(f"{name!r} shares its weight with {tied[1]!r}: tied weights cannot be pruned (one "
                             "tensor ranked and counted twice, or pruned under the other module)")


def check_pattern(name: str, pattern: torch.Tensor, masks: dict) -> None:
    """A mask given for sparse layer `name` must be the pattern it stores (one that differs, stale or
    meant for another model, was silently replaced by the pattern)."""
    if name in masks and not torch.equal(masks[name].to(pattern.device), pattern):
        raise ValueError(f"masks[{name!r}] differs from the pattern sparse layer {name!r} stores (a sparse layer's "
                         "mask is its pattern: pass the masks global_prune returned, or leave it out)")


def masks_of(model: nn.Module, masks: dict | None = None) -> dict[str, torch.Tensor]:
    """Bool mask of every prunable layer: from the CSR for sparse layers, else from `masks`
    (all-True when a dense layer has none yet). A mask given for a sparse layer must be its stored
    pattern (one that differs, stale or meant for another model, was silently replaced by it)."""
    masks = check_masks(model, masks)
    out = {}
    for n, m in prunable_layers(model):
        if is_sparse(m):
            out[n] = m.weight.mask()
            check_pattern(n, out[n], masks)
        else:
            out[n] = masks.get(n, torch.ones_like(m.weight, dtype=torch.bool))
    return out


def valued_masks(model: nn.Module, masks: dict | None = None, advice: str = MATERIALIZE) -> dict[str, torch.Tensor]:
    """masks_of(model, masks), refusing a layer on the meta device by name, with `advice` (no values to
    count: torch's "Tensor.item() cannot be called on meta tensors" from inside, before)."""
    current = masks_of(model, masks)
    meta = [n for n, mk in current.items() if mk.is_meta]
    if meta:
        raise ValueError(f"layer {meta[0]!r}'s weight is a meta tensor (a shape without values): {advice}")
    return current


def weight_count(model: nn.Module) -> int:
    """Prunable (conv and linear) weights of the model as it is now, zeros included."""
    return sum(math.prod(m.weight.shape) for _, m in prunable_layers(model))  # a CSR has .shape too


def model_sparsity(model: nn.Module, masks: dict | None = None, original: int | None = None) -> float:
    """Fraction of pruned weights: 1 - surviving prunable weights / `original` (default: the
    model's current weight count; pass the unpruned model's when layers shrank physically)."""
    check_untied(model)  # (a shared tensor's weights counted twice)
    total = weight_count(model) if original is None else original
    kept = sum(int(mk.sum()) for mk in valued_masks(model, masks, "nothing to count").values())
    if original is not None and (isinstance(original, bool) or not isinstance(original, numbers.Integral)
                                 or original < kept):
        raise ValueError(f"original must be an int >= the {kept} surviving weights (the unpruned model's weight "
                         f"count), got {original!r}")
    return 1.0 - kept / total if total else 0.0


def _masked(model: nn.Module, masks: dict):
    """(layer, mask) per entry naming a dense layer, each mask checked against its layer's weight (per
    training step: cheap). A sparse layer's entry (global_prune returns one after a partial sparsify_)
    is skipped once its dtype and shape are checked: its CSR pattern is its mask, nothing to zero."""
    check_model(model)
    for name, mk in masks.items():
        try:
            m = model.get_submodule(name)
        except (AttributeError, TypeError):  # (a typo, "fc.weight": check_masks' KeyError says which)
            m = None
        sparse = is_sparse(m)
        if (not hasattr(m, "weight") or pruned_by_torch(m) or not sparse and "weight" not in m._parameters
                or not isinstance(mk, torch.Tensor) or mk.dtype != torch.bool or mk.shape != m.weight.shape
                or mk.is_meta):
            check_masks(model, {name: mk})  # (raises, naming the layer)
        if not sparse:
            yield m, mk


def mask_grads_(model: nn.Module, masks: dict) -> None:
    """Dense masked training: pruned weights get no gradient (so no momentum, no decay). Zeroed by
    masked_fill, not multiplied: a NaN or inf gradient at a pruned position becomes 0 too."""
    for m, mk in _masked(model, masks):
        if m.weight.grad is not None:
            m.weight.grad.masked_fill_(~mk, 0)


@torch.no_grad()
def enforce_masks_(model: nn.Module, masks: dict) -> None:
    """Zero the pruned weights of dense masked layers (masked_fill: an inf or NaN there becomes 0)."""
    for m, mk in _masked(model, masks):
        m.weight.masked_fill_(~mk, 0)
