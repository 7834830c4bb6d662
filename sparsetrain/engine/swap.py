"""Swapping modules inside a model in place (sparsify_, densify_, fuse_, unfuse_): the replacement takes
the replaced module's training mode and the hooks registered on it."""
from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn


# A module's forward and backward hook registries (torch.nn.Module's attributes).
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook")
# Its state_dict hooks: they read and write its entries by key, which fuse_/unfuse_'s replacements keep
# and sparsify_/densify_'s change (`weight` <-> `weight.values`, `.crow_indices`, `.col_indices`)
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")
_HOW = {"_state_dict_hooks": "register_state_dict_post_hook", "_state_dict_pre_hooks": "register_state_dict_pre_hook",
        "_load_state_dict_pre_hooks": "register_load_state_dict_pre_hook",
        "_load_state_dict_post_hooks": "register_load_state_dict_post_hook"}  # (or their _register_... forms)


def _torch_own(hook) -> bool:
    """A state_dict hook torch.nn.utils registers itself (a legacy spectral_norm's, the new weight_norm's checkpoint
    compat hook), not a user's: an active reparametrization's layer is refused by the reparametrization checks,
    which say how to remove it; remove_spectral_norm / remove_parametrizations leave such hooks behind."""
    h = getattr(hook, "hook", hook)  # (the _WrappedHook _register_load_state_dict_pre_hook keeps)
    where = h.__module__ if inspect.isfunction(h) else type(h).__module__
    return (where or "").startswith("torch.nn.utils.")


def _drop_stale_torch_hooks(mod: nn.Module) -> None:
    """torch.nn.utils' state_dict hooks left behind on `mod` (its reparametrization removed): remove_spectral_norm's
    makes every load ask for `<name>_orig`; dropped with the module they stayed on, as before 2026-12-06."""
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(mod) or any(k.endswith("_orig") for k in mod._parameters):
        return
    for attr in _STATE_DICT_HOOKS:
        hooks = getattr(mod, attr, None) or {}
        for k in [k for k, h in hooks.items() if _torch_own(h)]:
            del hooks[k]


def uncarried_hook(mod: nn.Module) -> str | None:
    """The first hook on `mod` that sparsify_/densify_ cannot carry over to its replacement, described with why;
    None when there is none. A state_dict hook reads its keys, which change; a gradient hook on one of its
    parameters (Tensor.register_hook, register_post_accumulate_grad_hook) sits on a tensor the replacement has
    not (new Parameters; a sparse weight's gradient is its values', nnz long)."""
    for attr in _STATE_DICT_HOOKS:
        if any(not _torch_own(h) for h in (getattr(mod, attr, None) or {}).values()):
            return f"a state_dict hook ({_HOW[attr]}), whose keys its replacement's state_dict has not"
    for pname, p in mod.named_parameters():  # (a sparse layer's: its CSR's values too)
        for attr, how in (("_backward_hooks", "register_hook"),
                          ("_post_accumulate_grad_hooks", "register_post_accumulate_grad_hook")):
            if any(not getattr(h, "sparsetrain_own", False) for h in (getattr(p, attr, None) or {}).values()):
                return f"a gradient hook on its {pname} ({how}), a tensor its replacement has not (new Parameters)"
    return None


def check_no_uncarried_hooks(mod: nn.Module, name: str, what: str) -> None:
    """TypeError naming layer `name` when `mod` has a hook that `what` (sparsify_, densify_) cannot carry over
    (uncarried_hook); before 2026-12-06 they were dropped silently, never firing again."""
    hook = uncarried_hook(mod)
    if hook is not None:
        raise TypeError(f"layer {name!r} has {hook}, which {what} cannot carry over: remove it (its handle's "
                        f".remove()) and register it on the new layer after {what}")


# torch.nn.utils.prune's reparametrization of a dense layer's weight: what sparsify_ converts, never carried
_CONVERTED = ("weight_orig", "weight_mask")


_STANDARD = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}  # (conv, linear, BN: their own)


def has_extras(mod: nn.Module) -> bool:
    """`mod` holds a parameter, buffer or submodule beyond a conv's, linear's or BN's own (a user's, prune's), or
    a plain attribute a user set (`layer.tag = 1`: not in own_keys): fuse_ leaves it as it is, as a module with a
    hook (its fused modules' own attributes could clash; a user's attribute was dropped before 2026-12-06)."""
    own = own_keys(mod)
    return any(k not in _STANDARD for registry in (mod._parameters, mod._buffers, mod._modules) for k in registry) \
        or own is not None and any(k not in own and k not in _CONVERTED for k in mod.__dict__)


_OWN: dict[type, frozenset] = {}  # module kind -> own_keys


def own_keys(mod: nn.Module) -> frozenset | None:
    """The keys a new module of `mod`'s kind has (its __dict__'s and registries'): its class's own attributes,
    which user_attributes leaves out; None for a kind sparsify_, densify_ and fuse_ do not swap. A subclass's
    are its kind's (one of its own counts as a user's)."""
    from .bsr import BSR, BSRLinear
    from .formats import CSR
    from .nn import SparseConv2d, SparseLinear
    kinds = {SparseConv2d: lambda: SparseConv2d(CSR.from_dense(torch.ones(1, 1, 1, 1))),  # (no RNG draws)
             SparseLinear: lambda: SparseLinear(CSR.from_dense(torch.ones(1, 1))),
             BSRLinear: lambda: BSRLinear(BSR.from_dense(torch.ones(16, 16), 16)),
             nn.Conv2d: lambda: nn.Conv2d(1, 1, 1, device="meta"), nn.Linear: lambda: nn.Linear(1, 1, device="meta"),
             nn.BatchNorm2d: lambda: nn.BatchNorm2d(1, device="meta"), nn.ReLU: nn.ReLU,
             nn.MaxPool2d: lambda: nn.MaxPool2d(2), nn.AdaptiveAvgPool2d: lambda: nn.AdaptiveAvgPool2d(1),
             nn.Flatten: nn.Flatten}
    return kind_keys(next((k for k in kinds if isinstance(mod, k)), None), kinds, _OWN)


def kind_keys(kind: type | None, kinds: dict, cache: dict) -> frozenset | None:
    """The keys (__dict__'s and registries') of a fresh module of `kind`, built once by `kinds[kind]` and kept in
    `cache`; None for a kind not in `kinds` (own_keys; fuse.fused_own for the modules fuse_ makes)."""
    if kind not in kinds:
        return None
    if kind not in cache:
        with torch.inference_mode(False), torch.no_grad():
            fresh = kinds[kind]()
        cache[kind] = frozenset(fresh.__dict__) | set(fresh._parameters) | set(fresh._buffers) | set(fresh._modules)
    return cache[kind]


def extras(old: nn.Module, new: nn.Module, name: str) -> list[tuple[str, str, object]]:
    """(registry, name, object) of each parameter, buffer and submodule a user added to `old` (`register_buffer`,
    `register_parameter`, `add_module`) that `new`, replacing it at `name`, has not: carried over by _set_module,
    the same objects under the same names. One that `new` has as a plain attribute is a ValueError naming it."""
    own = set(new._parameters) | set(new._buffers) | set(new._modules)  # (its weight, bias, a BN's statistics)
    out = []
    for registry in ("_parameters", "_buffers", "_modules"):
        for key, obj in getattr(old, registry).items():
            if key in own or key in _CONVERTED:
                continue
            if hasattr(new, key):
                raise ValueError(f"layer {name!r} holds {key!r} ({registry[1:-1]}), which its replacement, a "
                                 f"{type(new).__name__}, has as an attribute of its own: rename it first")
            out.append((registry, key, obj))
    return out


def user_attributes(old: nn.Module, own: set, new: nn.Module, name: str) -> dict[str, object]:
    """The plain attributes a user set on `old` (`layer.tag = 1`): those in its __dict__ that are not `own`, the
    keys a new layer of its kind has (its __dict__ and registries: torch.nn.utils.prune's recomputed `weight` is
    one), carried over by sparsify_/densify_ as the same objects (dropped silently before 2026-12-06). One that
    `new`, replacing it at `name`, has as an attribute of its own is a ValueError naming it."""
    out = {k: v for k, v in old.__dict__.items() if k not in own and k not in _CONVERTED}
    for key in out:
        if hasattr(new, key):
            raise ValueError(f"layer {name!r} has an attribute {key!r}, which its replacement, a "
                             f"{type(new).__name__}, has as an attribute of its own: rename it first")
    return out


def carry_parameter_attributes(pairs) -> None:
    """Each (old, new) Parameter pair: the Python attributes set on the old one (`p._no_weight_decay = True`, as
    optimizers' param-group builders read) set on the new one too (dropped silently before 2026-12-06)."""
    for old, new in pairs:
        if old is not None and new is not None and old is not new:
            for key, v in vars(old).items():
                setattr(new, key, v)


def _set_module(model: nn.Module, name: str, new: nn.Module, move_hooks: bool = True) -> None:
    """Put `new` at `name` in the training mode of the module it replaces, moving to it that module's
    forward, backward and state_dict hooks (the registries themselves, so their handles still remove them;
    the old module keeps none) and the parameters, buffers and submodules a user added to it (extras):
    sparsify_, fuse_ and their inverses keep a user's hooks firing where they were registered. Not
    `move_hooks`: `new` took them at another name of the same module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    if isinstance(old, nn.Module) and old is not new and move_hooks:
        new.train(old.training)
        _drop_stale_torch_hooks(old)
        for attr in _HOOKS + _STATE_DICT_HOOKS:  # (a state_dict hook: only fuse_/unfuse_, whose keys are the same)
            if attr in old.__dict__:
                v = old.__dict__[attr]
                object.__setattr__(new, attr, v)
                object.__setattr__(old, attr, type(v)() if isinstance(v, dict) else None)
        for registry, key, obj in extras(old, new, name):  # (a user's: dropped silently before 2026-12-06)
            if registry == "_buffers":
                new.register_buffer(key, obj, persistent=key not in old._non_persistent_buffers_set)
            else:
                (new.register_parameter if registry == "_parameters" else new.add_module)(key, obj)
            delattr(old, key)  # (as its hooks: the old module keeps none)
        for h in new._load_state_dict_pre_hooks.values():  # (register_load_state_dict_pre_hook's wrapper holds
            if getattr(h, "with_module", False):  # the module it was registered on, by weakref: the new one now)
                h.module = weakref.ref(new)
    setattr(parent, child, new)


def _replace_modules(model: nn.Module, replacement) -> None:
    """Each module inside `model` for which `replacement(module)` is a module, by that one module
    (made once) at every name it is registered under (self.alias = self.conv: both)."""
    made: dict[int, nn.Module | None] = {}
    placed = set()  # (the hooks move once: at a second name they would be replaced by the emptied registries)
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if name and id(m) not in made:
            made[id(m)] = replacement(m)
        if name and made[id(m)] is not None:
            _set_module(model, name, made[id(m)], id(m) not in placed)
            placed.add(id(m))
