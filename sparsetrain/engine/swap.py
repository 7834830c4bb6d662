"""Swapping modules inside a model in place (sparsify_, densify_, fuse_, unfuse_): the replacement takes
the replaced module's training mode and the hooks registered on it."""
from __future__ import annotations

from torch import nn


# A module's forward and backward hook registries (torch.nn.Module's attributes).
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook")


def _set_module(model: nn.Module, name: str, new: nn.Module, move_hooks: bool = True) -> None:
    """Put `new` at `name` in the training mode of the module it replaces, moving to it that module's
    forward and backward hooks (the registries themselves, so their handles still remove them; the
    old module keeps none): sparsify_, fuse_ and their inverses keep a user's hooks firing where
    they were registered. Not `move_hooks`: `new` took them at another name of the same module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    if isinstance(old, nn.Module) and old is not new and move_hooks:
        new.train(old.training)
        for attr in _HOOKS:
            if attr in old.__dict__:
                v = old.__dict__[attr]
                object.__setattr__(new, attr, v)
                object.__setattr__(old, attr, type(v)() if isinstance(v, dict) else None)
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
