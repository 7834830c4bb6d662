"""A dense layer as torch.nn.utils.prune leaves it: its `<name>_orig` Parameter and `<name>_mask`
buffer, the weight (or bias) their product, which the conversions take as it is now."""
from __future__ import annotations

from torch import nn

__all__ = ["pruned_by_torch", "current_param", "check_own_bias", "parametrized_of", "bias_writer"]


def pruned_by_torch(mod: nn.Module, name: str = "weight") -> bool:
    """Whether torch.nn.utils.prune reparametrized `mod.<name>` (a `<name>_orig` Parameter and a
    `<name>_mask` buffer, `mod.<name>` their product as of the last forward)."""
    return f"{name}_orig" in mod._parameters and f"{name}_mask" in mod._buffers


def parametrized_of(mod: nn.Module, types, tensor: str | None = None) -> bool:
    """Whether `mod` is torch.nn.utils.parametrize's Parametrized<T> of one of `types` (a class made at the
    first parametrization, subclassing T: an exact-type match skips it), with `tensor` parametrized if given."""
    from torch.nn.utils import parametrize
    return parametrize.is_parametrized(mod, tensor) and type(mod).__bases__[0] in types


def current_param(mod: nn.Module, name: str):
    """`mod.<name>` as a dense layer's conversion takes it: under torch.nn.utils.prune, orig * mask
    computed now (the attribute is recomputed only by the next forward: stale after an optimizer step). One a
    parametrization or a legacy weight_norm hook computes is refused (check_own_bias): the copy dropped it silently."""
    if not pruned_by_torch(mod, name):
        check_own_bias(mod, type(mod).__name__, name)
        return getattr(mod, name)
    if name == "bias":  # (the sparse layers' bias is dense: nothing would keep its pruned entries zero)
        raise ValueError("the layer's bias is pruned with torch.nn.utils.prune, and a sparse layer's bias is dense, so "
                         "the pruned entries would train again: torch.nn.utils.prune.remove(layer, 'bias') "
                         "first accepts that")
    orig = mod._parameters[f"{name}_orig"]
    return nn.Parameter((orig * getattr(mod, f"{name}_mask")).detach(), requires_grad=orig.requires_grad)


def check_own_bias(mod: nn.Module, name: str, tensor: str = "bias", needs: str = "which the layer replacing it needs"
                   ) -> None:
    """TypeError unless sparse layer `mod`'s bias (or its `tensor`: a fused BatchNorm's weight) is a Parameter
    of its own (or None). A bias under torch.nn.utils.parametrize, prune or a legacy weight_norm hook is
    computed: its dense layer got the value of the last forward (stale after a step) and silently lost the
    reparametrization; unfuse_'s plain conv could not take it (torch's TypeError, some layers already swapped)."""
    if tensor in mod._parameters or getattr(mod, tensor, None) is None:  # (BSRLinear's None: a plain attribute)
        return
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(mod, tensor):
        what, fix = "a parametrization", f"parametrize.remove_parametrizations(layer, {tensor!r})"
    elif pruned_by_torch(mod, tensor):
        what, fix = "torch.nn.utils.prune", f"torch.nn.utils.prune.remove(layer, {tensor!r})"
    else:  # (the legacy hooks: spectral_norm's was told to use remove_weight_norm, which cannot remove it)
        from torch.nn.utils.spectral_norm import SpectralNorm
        spectral = any(isinstance(h, SpectralNorm) and h.name == tensor for h in mod._forward_pre_hooks.values())
        what = f"a {'spectral_norm' if spectral else 'weight_norm'} hook"
        fix = f"torch.nn.utils.remove_{'spectral' if spectral else 'weight'}_norm(layer, {tensor!r})"
    raise TypeError(f"{name}'s {tensor} is computed by {what}, not a Parameter of its own, {needs}: remove it "
                    f"first ({fix})")


def bias_writer(mod: nn.Module, name: str):
    """How a sparse layer's reset_parameters writes the bias it drew: into the Parameter, or, for a bias a
    parametrization computes, through its right_inverse (`mod.bias = value`), so the bias it computes is the
    value drawn. Checked before anything is drawn: a TypeError naming `name` for a parametrization without
    a right_inverse, prune or a legacy weight_norm hook (the draw went into the computed tensor, lost at the
    next forward, the reparametrized bias left as it was, silently)."""
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(mod, "bias"):
        missing = [type(p).__name__ for p in mod.parametrizations.bias if not hasattr(p, "right_inverse")]
        if missing:
            raise TypeError(f"{name}.reset_parameters: its bias is computed by a parametrization ({missing[0]}) "
                            "without a right_inverse, so the bias drawn cannot be set: give it a right_inverse, or "
                            "remove it first (parametrize.remove_parametrizations(layer, 'bias')) and register it "
                            "after the reset")
        return lambda value: setattr(mod, "bias", value.detach())
    check_own_bias(mod, f"{name}.reset_parameters: the layer", needs="so the bias drawn would go into the computed "
                   "tensor (lost at the next forward)")
    return lambda value: mod.bias.copy_(value)
