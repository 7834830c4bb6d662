"""Model conversion in place: dense conv/linear layers to sparse ones and back, by qualified name,
optionally fusing sparse conv -> BatchNorm -> ReLU (engine/fused.py)."""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from .args import check_flag
from .bsr import BSRLinear
from .fuse import check_unfusable, fuse_, fused_own, trace, unfuse_
from .formats import own_mode
from .index import check_index
from .optim_state import retire_replaced
from .torch_prune import check_own_bias, parametrized_of, pruned_by_torch
from .nn import SPARSE_TYPES, SparseConv2d, _owners, _tied, check_model, is_sparse
from .swap import _replace_modules, carry_parameter_attributes, check_no_uncarried_hooks, extras, own_keys, \
    uncarried_hook, user_attributes

__all__ = ["sparsify_", "densify_", "dense_state_dict", "unconvertible"]


# ---------------------------------------------------------------------------- what cannot convert
def _transformer_blocks(modules: dict) -> list[str]:
    """Names of the nn.Transformer*Layer modules, whose fast path reads their linears' weights as dense."""
    return [n for n, m in modules.items() if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))]


def _block_of(blocks: list[str], name: str) -> str | None:
    """The Transformer layer (of `blocks`) holding module `name`, or None."""
    return next((b for b in blocks if not b or name.startswith(b + ".")), None)


@functools.lru_cache(maxsize=None)
def _fresh_sparse(kind: type) -> nn.Module:
    """A sparse layer replacing a dense `kind`, built once per kind: its own names, whatever its geometry (_clashes)."""
    with (torch.inference_mode(False), torch.no_grad(), torch.device("cpu"),
          torch.random.fork_rng(devices=[])):  # (the model's random stream untouched by its initialisation)
        dense = kind(1, 1, 1) if issubclass(kind, nn.Conv2d) else kind(1, 1)
        return SPARSE_TYPES[kind].from_dense(dense, torch.ones_like(dense.weight, dtype=torch.bool))


def _clashes(m: nn.Module, name: str) -> bool:
    """Whether `m` holds something a user added (an attribute, parameter, buffer or submodule) under a name its
    sparse replacement has as its own (`layer.sparsity = 0.9`): sparsify_ refuses it (swap.extras, user_attributes)."""
    new = _fresh_sparse(type(m))
    try:
        extras(m, new, name)
        user_attributes(m, own_keys(m), new, name)
    except ValueError:
        return True
    return False


def unconvertible(model: nn.Module) -> set[str]:
    """Names of the nn.Conv2d / nn.Linear layers sparsify_ refuses whatever their mask: a weight
    computed by a reparametrization, a bias pruned by torch.nn.utils.prune or parametrized (pruned dense masked),
    inside a Transformer*Layer, tied to another module's, with a hook sparsify_ cannot carry over, or a conv the
    sparse kernels do not take (dilated, grouped, ...).
    apply_engine's "auto" keeps them dense."""
    check_model(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    owners, blocks, out = _owners(modules), _transformer_blocks(modules), set()
    for n, m in modules.items():
        if parametrized_of(m, SPARSE_TYPES):
            out.add(n)  # (a Parametrized<Linear/Conv2d>: sparsify_ refuses it, naming the parametrization)
        if type(m) not in SPARSE_TYPES:
            continue
        if ("weight" not in m._parameters and not pruned_by_torch(m)) or pruned_by_torch(m, "bias") \
                or _block_of(blocks, n) is not None or _tied(owners, m) is not None or uncarried_hook(m) \
                or _clashes(m, n):
            out.add(n)
        elif isinstance(m, nn.Conv2d):
            try:
                SparseConv2d.check_convertible(m)
            except ValueError:
                out.add(n)
    return out


def sparsify_(model: nn.Module, masks: dict[str, torch.Tensor] | None = None, fuse: bool = False) -> nn.Module:
    """Replace, in place, each dense layer named in `masks` ({qualified_name: bool mask of the
    weight's shape}) by its sparse counterpart holding only the unmasked weights. A layer pruned with
    torch.nn.utils.prune keeps only what both its prune mask and `masks` keep; `masks=None` converts
    every layer pruned that way, with its own mask. With `fuse`, then fuse every sparse conv -> [ReLU]
    -> BatchNorm2d -> [ReLU] into a SparseConvBNReLU (engine/fuse.py fuse_; the model must be
    torch.fx-traceable)."""
    check_model(model)
    check_flag(fuse, "fuse")
    modules = dict(model.named_modules(remove_duplicate=False))  # (a layer under two names: both)
    if masks is None:  # (the masks torch.nn.utils.prune keeps beside the weights)
        masks = {n: None for n, m in modules.items() if type(m) in SPARSE_TYPES and pruned_by_torch(m)}
        if not masks:
            bias_only = [n for n, m in modules.items() if type(m) in SPARSE_TYPES and pruned_by_torch(m, "bias")]
            raise ValueError("masks=None converts the layers whose weight was pruned with torch.nn.utils.prune, and "
                             "this model has none" + (f" (only the bias of {bias_only}: a sparse layer's bias is "
                                                       "dense)" if bias_only else "") +
                             ": pass masks {qualified_name: bool tensor of the weight's shape}")
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{qualified_name: bool tensor}}, got {type(masks).__name__}")
    blocks = _transformer_blocks(modules)
    masks = {n: mask for n, mask in masks.items() if not _sparse_already(modules.get(n), n, mask)}
    for name, mask in masks.items():
        if name == "":
            raise ValueError("masks cannot name the model itself (''): sparsify_ replaces layers inside it; for "
                             "one layer use SparseLinear.from_dense / SparseConv2d.from_dense")
        if name not in modules:
            known = [n for n, m in modules.items() if type(m) in SPARSE_TYPES]
            raise KeyError(f"masks names unknown module {name!r}; sparsifiable modules: {known}")
        mod = modules[name]
        if type(mod) not in SPARSE_TYPES:
            names = list(mod.parametrizations) if parametrize.is_parametrized(mod) else []  # (its bias alone, too)
            hint = (f": its {' and '.join(names)} {'is' if len(names) == 1 else 'are'} computed by a parametrization "
                    "(torch.nn.utils.parametrize); remove it first (" + ", ".join(
                        f"parametrize.remove_parametrizations(module, {n!r})" for n in names) + ")" if names else "")
            raise TypeError(f"module {name!r} is a {type(mod).__name__}; only "
                            f"{[t.__name__ for t in SPARSE_TYPES]} can be sparsified{hint}")
        if "weight" not in mod._parameters and not pruned_by_torch(mod):  # (weight_norm / spectral_norm)
            raise TypeError(f"module {name!r}'s weight is computed by a reparametrization (weight_norm, "
                            "spectral_norm), not a Parameter of its own: remove it first (torch.nn.utils."
                            "remove_weight_norm / remove_spectral_norm)")
        block = _block_of(blocks, name)
        if block is not None:
            raise TypeError(f"module {name!r} is inside a {type(modules[block]).__name__}, whose fast path (eval "
                            "mode) reads its linears' weights as dense tensors: build the block from "
                            "nn.Linear layers of your own to sparsify it")
        if (mask is not None or not pruned_by_torch(mod)) and (
                not isinstance(mask, torch.Tensor) or mask.shape != mod.weight.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise (ValueError if isinstance(mask, torch.Tensor) else TypeError)(  # (a numpy array, a list: its type)
                f"masks[{name!r}] must be a bool tensor of shape {tuple(mod.weight.shape)}, got {got}")
        check_no_uncarried_hooks(mod, name, "sparsify_")
        _check_dtype(mask, name)  # (every name: a layer's second name's float mask was only compared as .bool())
    # build every replacement first: a layer that cannot convert (dilation, groups...), or a model
    # fuse_ cannot trace, raises before the model is touched, never leaving it half converted
    if fuse:
        trace(model)
    owners = _owners(modules)
    new, named, attrs = {}, {}, {}  # id(dense layer) -> its replacement, the name its mask came under, user_attributes
    for name, mask in masks.items():
        mod = modules[name]
        tied = _tied(owners, mod)  # (a CSR copy, or the layer's copy of the bias, would untie them silently)
        if tied:
            what, other = tied
            raise ValueError(f"{name!r} shares its {what} with {other!r}: tied "
                             f"{'weights' if what == 'weight' else 'biases'} cannot be sparsified")
        if id(mod) in new:  # one layer under two names: one replacement, if both names agree
            other = masks[named[id(mod)]]
            if (mask is None) != (other is None) or mask is not None and not torch.equal(mask.bool(), other.bool()):
                raise ValueError(f"masks[{name!r}] and masks[{named[id(mod)]!r}] name the same layer with different masks")
            continue
        try:  # (in the dense weight's inference mode: under inference_mode its values became inference
            # tensors, which the next backward refused)
            with own_mode(mod._parameters.get("weight", mod._parameters.get("weight_orig"))):
                new[id(mod)], named[id(mod)] = SPARSE_TYPES[type(mod)].from_dense(mod, mask), name
            extras(mod, new[id(mod)], name)  # (one the sparse layer cannot take: refused before any swap)
        except (TypeError, ValueError) as e:  # (named: which layer)
            raise type(e)(f"{name}: {e}") from e
        attrs[id(mod)] = user_attributes(mod, own_keys(mod), new[id(mod)], name)  # (a clash: before any swap)
    for i, layer in new.items():  # (a user's attributes on the layer and on its weight and bias Parameters)
        mod = modules[named[i]]
        layer.__dict__.update(attrs[i])
        carry_parameter_attributes(((mod._parameters.get("weight", mod._parameters.get("weight_orig")),
                                     layer.weight.values), (mod._parameters.get("bias"), layer.bias)))
    for name in named.values():  # (torch.nn.utils.prune's hooks would recompute weight = orig * mask
        hooks = modules[name]._forward_pre_hooks  # on the sparse layer: each converted layer once)
        for k in [k for k, h in hooks.items() if isinstance(h, torch_prune.BasePruningMethod)]:
            del hooks[k]
    _replace_modules(model, lambda mod: new.get(id(mod)))  # (every name the layer has, masked or not)
    retire_replaced(model, {named[i]: dict(modules[named[i]].named_parameters()) for i in new}, "sparsify_")
    if fuse:
        fuse_(model)
    return model


def _sparse_already(mod, name: str, mask) -> bool:
    """A layer that is sparse already, named with its own pattern (what global_prune returns after a
    first sparsify_): nothing to convert. With another mask: ValueError (its CSR is its mask)."""
    if mod is None or not is_sparse(mod):
        return False
    _check_dtype(mask, name)  # (a float mask was compared as .bool(): 0.5 or 2 passed as its pattern)
    pattern = mod.weight.mask()
    same_shape = isinstance(mask, torch.Tensor) and mask.shape == pattern.shape
    if not (same_shape and torch.equal(mask.bool().cpu(), pattern.cpu())):
        got = "other entries" if same_shape else (
            f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__)
        raise ValueError(f"masks[{name!r}] names a layer that is sparse already ({type(mod).__name__}) with another "
                         f"mask than its stored pattern (got {got}): sparsify_ converts dense layers; prune a "
                         "sparse one with global_prune (its CSR shrinks in place)")
    return True


def _check_dtype(mask, name: str) -> None:
    """A tensor mask must be bool, as from_dense requires of a layer's first name: TypeError naming masks[name]."""
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        raise TypeError(f"masks[{name!r}] must be a bool tensor, got dtype {mask.dtype} (for a 0/1-valued "
                        "mask: mask != 0)")


def densify_(model: nn.Module) -> nn.Module:
    """Replace, in place, every sparse layer (CSR or BSRLinear) by the equivalent dense layer (zeros where pruned);
    fused conv -> BN -> ReLU layers (engine/fused.py) are unfused first (one built directly, owning its BN, is
    refused: fuse.check_unfusable). The model itself cannot be replaced in place: a sparse layer passed as
    `model` is refused (use its to_dense())."""
    check_model(model)
    if _densifiable(model):
        raise ValueError(f"densify_ replaces layers inside a model; for one {type(model).__name__} use .to_dense()")
    check_unfusable(model, "densify_")  # (before its other checks, which would name the owned BN's tensors)
    for n, m in model.named_modules():  # (before any layer is swapped)
        if _densifiable(m):
            check_own_bias(m, f"layer {n!r}")
            for sub, at in ((m, n), (m.weight, f"{n}.weight")):  # (the layer, and its CSR/BSR submodule)
                check_no_uncarried_hooks(sub, at, "densify_")
            dense = m._dense_layer(bias=False, device="meta") if is_sparse(m) else nn.Linear(
                m.in_features, m.out_features, bias=False, device="meta")
            if is_sparse(m):  # (an extra the dense layer has as an attribute: refused before any swap)
                extras(m, dense, n)
            # (a user's attribute the dense layer has: refused, as an extra; a fused layer's goes on through unfuse_)
            user_attributes(m, fused_own(m) or own_keys(m), dense, n)
            try:  # (its to_dense's check, named, before any swap: an index rewritten in place, as by an EMA)
                check_index(m.weight)
            except ValueError as e:
                raise ValueError(f"layer {n!r}: {e}") from None
    unfuse_(model)
    sparse = {n: dict(m.named_parameters()) for n, m in model.named_modules() if _densifiable(m)}
    _replace_modules(model, lambda mod: _dense_of(mod) if _densifiable(mod) else None)
    retire_replaced(model, sparse, "densify_")
    return model


def _densifiable(mod: nn.Module) -> bool:
    """A layer densify_ replaces: a CSR layer (SparseLinear, SparseConv2d) or a BSRLinear."""
    return is_sparse(mod) or isinstance(mod, BSRLinear)


def _dense_of(mod: nn.Module) -> nn.Module:
    """mod.to_dense() in its values' inference mode (under inference_mode the dense layer's parameters
    became inference tensors, which backward left without a gradient, silently)."""
    with own_mode(mod.weight.values):
        dense = mod.to_dense()
    dense.__dict__.update(user_attributes(mod, own_keys(mod), dense, ""))  # (a clash: refused before any swap)
    carry_parameter_attributes(((mod.weight.values, dense.weight), (mod.bias, dense.bias)))
    return dense


# ---------------------------------------------------------------------------- a sparse checkpoint, dense
def dense_state_dict(state_dict) -> dict:
    """`state_dict` (a sparse model's: `sparsify_`'d, fused or not, as saved and `torch.load`ed) with
    every CSR or BSR weight (`<name>.values`, `.crow_indices`, `.col_indices`) replaced by the dense
    tensor it stands for (`<name>`, zeros where pruned): what the plain dense model's `load_state_dict`
    takes. Other entries are the same tensors. The weights' logical shapes come from the state_dict's
    metadata (`torch.save` keeps it; a state_dict saved before 2026-12-04 or rebuilt as a plain dict has
    none: load it into a `sparsify_`'d model and `densify_` that instead)."""
    from collections import OrderedDict
    from collections.abc import Mapping

    from .bsr import BSR
    from .formats import CSR

    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors (a model's state_dict()), "
                        f"got {type(state_dict).__name__}")
    parts = (".values", ".crow_indices", ".col_indices")
    names = [k[:-len(".values")] for k in state_dict if isinstance(k, str) and k.endswith(".values")
             and all(k[:-len(".values")] + p in state_dict for p in parts[1:])]
    meta = OrderedDict(getattr(state_dict, "_metadata", None) or {})
    out = OrderedDict()
    for k, v in state_dict.items():
        name = next((n for n in names if k in (n + p for p in parts)), None)
        if name is None:
            out[k] = v
        elif k == name + ".values":
            shape = (meta.get(name) or {}).get("shape")
            if shape is None:
                raise ValueError(f"state_dict[{name + '.values'!r}]: no logical shape in the state_dict's metadata "
                                 "(saved before 2026-12-04, or rebuilt as a plain dict): load it into a model "
                                 "sparsify_'d with the same layers and call densify_ on that instead")
            crow, col = state_dict[name + ".crow_indices"], state_dict[name + ".col_indices"]
            if not all(isinstance(t, torch.Tensor) for t in (crow, col, v)):  # (a list: AttributeError 'dim' before)
                raise TypeError(f"state_dict[{name + '.values'!r}], [.crow_indices] and [.col_indices] must be tensors, "
                                f"got {', '.join(type(t).__name__ for t in (v, crow, col))}")
            try:  # (a corrupt entry: the CSR/BSR check's message, naming the layer)
                with torch.no_grad():  # (the dense tensor is data, like any state_dict entry)
                    w = (BSR(crow, col, v, shape, v.shape[-1]) if v.dim() == 3 else CSR(crow, col, v, shape)).to_dense()
            except (TypeError, ValueError) as e:
                raise type(e)(f"state_dict's sparse weight {name!r} (shape {tuple(shape)}): {e}") from e
            out[name] = w.detach()
            meta.pop(name, None)  # (the weight's own module entry: a dense model has no such module)
    out._metadata = meta
    return out
