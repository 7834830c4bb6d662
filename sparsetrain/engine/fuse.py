"""fuse_ / unfuse_: find sparse conv -> [ReLU] -> BatchNorm -> [+ shortcut] -> [ReLU] and adaptive
pool -> flatten -> sparse linear in a model's torch.fx graph and swap in the fused layers of
engine/fused.py and engine/replicated.py (and back)."""
from __future__ import annotations

import inspect
import operator

import torch
from torch import fx, nn

from .args import check_flag
from .fused import FusedBatchNorm2d, FusedReLU, MaxPool2x2, SparseConvBNReLU
from .nn import SparseConv2d, SparseLinear, check_model
from .replicated import BroadcastAvgPool2d, FusedAdaptiveAvgPool2d, FusedFlatten, FusedSparseLinear
from .placeholders import _PerThread, _backward_hooked, _rebuild_bn, _watched
from .swap import _replace_modules, _set_module, has_extras, kind_keys, user_attributes
from .torch_prune import check_own_bias

__all__ = ["fuse_", "unfuse_", "fused_own", "check_unfusable"]


def _is_pool2x2(m: nn.Module) -> bool:
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (type(m) is nn.MaxPool2d and pair(m.kernel_size) == (2, 2) and pair(m.stride) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


# ============================================================================ fuse_ / unfuse_
class _Tracer(fx.Tracer):
    """torch.nn's modules, the engine's layers and every module without submodules (which holds no
    pattern, and may branch on shapes) are leaves: the graph shows their call sites."""

    def is_leaf_module(self, m, qualname):
        return (type(m).__module__.startswith("sparsetrain.engine.") or next(m.children(), None) is None
                or super().is_leaf_module(m, qualname))


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _module_call(node: fx.Node | None, modules: dict, calls: dict, *kinds: type) -> fx.Node | None:
    """`node` when it calls a module of exactly one of `kinds` (a subclass's forward may compute
    something else: a ReLU subclass is not a ReLU) that the graph calls only there."""
    if node is None or node.op != "call_module" or calls.get(node.target, 0) != 1:
        return None
    return node if type(modules[node.target]) in kinds else None


def _residual_relu(bn: fx.Node, model: nn.Module, conv_name: str, modules: dict, calls: dict) -> fx.Node | None:
    """The ReLU call after `bn + shortcut` when the conv's parent block declares that it passes the
    shortcut to a fused conv: `fused_residual = {conv: (bn, relu)}` (child names), as
    sparsetrain.experiment's ResNet blocks do."""
    parent_name, _, child = conv_name.rpartition(".")
    declared = getattr(model.get_submodule(parent_name) if parent_name else model, "fused_residual", {})
    add = _only_user(bn)
    if child not in declared or add is None or add.op != "call_function" or add.target not in (operator.add, torch.add):
        return None
    relu = _module_call(_only_user(add), modules, calls, nn.ReLU)
    prefix = parent_name + "." if parent_name else ""
    if relu is None or (prefix + declared[child][0], prefix + declared[child][1]) != (bn.target, relu.target):
        return None
    return relu


def _shared_relu(conv: fx.Node, bn: fx.Node, model: nn.Module, modules: dict, calls: dict,
                 aliased: set) -> fx.Node | None:
    """The call of an nn.ReLU module called at several sites (torchvision's residual blocks) that alone
    reads `bn`, when it can be fused there: not under two names, and no other call of that ReLU nor of
    a sparse conv between `conv` and it (the conv's hand-over goes to the next call of the ReLU: the
    FusedReLU passes it through there and applies a real ReLU at the sites no fused layer handed a
    tensor)."""
    relu = _only_user(bn)
    if relu is None or relu.op != "call_module" or relu.target in aliased or calls.get(relu.target, 0) < 2:
        return None
    current = model.get_submodule(relu.target)  # (a FusedReLU: fused at another site, by this call or an earlier one)
    if type(current) not in (nn.ReLU, FusedReLU) or type(modules[relu.target]) not in (nn.ReLU, FusedReLU):
        return None
    n = conv.next
    while n is not relu:  # (graph order: call order)
        if n.op == "call_module" and (n.target == relu.target or isinstance(modules.get(n.target), SparseConv2d)):
            return None
        n = n.next
    return relu


def _has_extras(m: nn.Module) -> bool:
    """has_extras; for a FusedReLU (a shared ReLU an earlier fuse_ call fused at another site), beyond
    fused_own's keys."""
    if type(m) is not FusedReLU:
        return has_extras(m)
    own = fused_own(m)
    return any((m._parameters, m._buffers, m._modules)) or any(k not in own for k in m.__dict__)


def _calls(graph: fx.Graph) -> list:
    # (without fx's checks of the concrete args, `arg == default` read only by torch._assert: a default
    # of 1.0 or (2, 2) made every such forward "take another path")
    checks = {n for n in graph.nodes if n.users and all(u.target is torch._assert for u in n.users)}
    return [(n.op, str(n.target)) for n in graph.nodes if n.op in ("call_module", "call_function", "call_method")
            and n.target is not torch._assert and n not in checks]


def trace(model: nn.Module, strict: bool = True) -> fx.Graph | None:
    """The torch.fx graph fuse_ reads (engine layers and childless modules as leaves); when fx cannot
    trace the model: ValueError, or None when not `strict`. A `forward` whose path depends on an
    argument that has a default is refused the same way: fx hands every argument in as a Proxy, for
    which `opt is None` is False, so `if opt is None:` traced the other branch, whose links gave the
    default call a wrong output; traced at the defaults, a call with another value would take an
    untraced branch. So the graph is traced both ways, and must be the same."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model).__module__.startswith("sparsetrain.engine."):  # (a lone engine layer: fx traced its own forward,
        if not strict:  # whose checks then failed on proxies: "weight must be a sparsetrain.CSR, got CSR")
            return None
        raise ValueError(f"fuse_ fuses layers inside a model; a lone {type(model).__name__} has nothing to fuse with "
                         "(pass the model holding it and its BatchNorm)")
    try:
        graph = _Tracer().trace(model)
        params = inspect.signature(model.forward).parameters.values()
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if defaults and _calls(_Tracer().trace(model, concrete_args=defaults)) != _calls(graph):
            raise ValueError(f"its forward takes another path when {', '.join(defaults)} keep their defaults")
        return graph
    except Exception as e:  # noqa: BLE001 (fx raises many kinds)
        if not strict:
            return None
        raise ValueError(f"fuse_ needs a model torch.fx can trace ({type(e).__name__}: {e}){_unrecordable(model, e)}; "
                         "build SparseConvBNReLU layers by hand for this model") from e


def _unrecordable(model: nn.Module, e: Exception) -> str:
    """What fx's "argument of type: <class ...>" is about when a `forward` argument's default is of that type (a
    module, a function): fx keeps every default in the graph's placeholders, and can keep no such object."""
    params = inspect.signature(model.forward).parameters.values()
    odd = [p for p in params if p.default is not inspect.Parameter.empty and isinstance(e, NotImplementedError)
           and str(e) == f"argument of type: {type(p.default)}"]
    return (f": its forward's argument {odd[0].name!r} defaults to a {type(odd[0].default).__name__}, which torch.fx "
            f"cannot keep as a default; make it an attribute of the model (self.{odd[0].name} = ...) that forward "
            "reads, not an argument" if odd else "")


def fuse_(model: nn.Module, strict: bool = True) -> list[str]:
    """Fuse, in place, every SparseConv2d -> [ReLU] -> BatchNorm2d -> [ReLU] of `model` (module
    docstring; BatchNorm2d with affine or not, running statistics or not). A ReLU module called at
    more than one site (torchvision's residual blocks) is fused at each site where it alone reads a
    fused BN (_shared_relu) and applies a real ReLU at the others (FusedReLU.shared); where it cannot
    be (a pre-hook, a call between the conv and that site), conv -> BN is fused alone.
    conv -> BN -> + shortcut -> ReLU is fused where the block declares it passes the shortcut
    (`fused_residual`, see _residual_relu); a block that passes its input on through
    `routed_input(self.<conv>, x)` declares `fused_route_input = "<conv>"` (child name) and that
    fused layer routes it. In a model with fused layers, every nn.MaxPool2d(2) becomes a
    MaxPool2x2 (the same pooling on a one-pass kernel). Links between fused layers and the modules
    that alone read their activations: _link. A sparse classifier head reading a replicated 1x1
    map (AdaptiveAvgPool2d -> nn.Flatten(1) -> SparseLinear) runs without the replicas: _fuse_heads.
    Returns the qualified names of the fused convs, then of the fused heads' linears. The model
    must be traceable by torch.fx: ValueError otherwise, or nothing fused when not `strict`."""
    check_flag(strict, "strict")
    graph = trace(model, strict)
    if graph is None:
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    # a module registered under two names (self.alias = self.conv) is counted as called twice: fx
    # names its calls by the first name, a swap there would leave the other name's module as it was
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    aliased = {name for same in names.values() if len(same) > 1 for name in same}
    for name in aliased:
        calls[name] = max(calls.get(name, 0), 2)
    fused, last = [], _fused_before(graph, modules, calls)  # last: fused conv -> its activation's node
    for node in list(graph.nodes):
        if (node.op != "call_module" or type(modules.get(node.target)) is not SparseConv2d or calls[node.target] != 1
                or _watched(modules[node.target], global_hooks=False)  # (a hook on the conv would see the activation)
                or has_extras(modules[node.target])):
            continue
        relu_before = _module_call(_only_user(node), modules, calls, nn.ReLU)
        bn = _module_call(_only_user(relu_before or node), modules, calls, nn.BatchNorm2d)
        if bn is None or modules[bn.target].num_features != modules[node.target].out_channels:
            continue  # (a BN of another width: left as built, its forward raises PyTorch's error)
        relu_after = residual = None
        if relu_before is None:
            relu_after = residual = _residual_relu(bn, model, node.target, modules, calls)
            if residual is None:
                relu_after = (_module_call(_only_user(bn), modules, calls, nn.ReLU)
                              or _shared_relu(node, bn, model, modules, calls, aliased))
            if relu_after is not None and modules[relu_after.target]._forward_pre_hooks:
                relu_after = residual = None  # (a pre-hook may change the ReLU's input: conv -> BN fused alone)
        if _watched(modules[bn.target], global_hooks=False) or any(_has_extras(modules[n.target]) for n in (
                bn, relu_before, relu_after) if n is not None) or any(
                _backward_hooked(modules[r.target], global_hooks=False) for r in (relu_before, relu_after) if r is not None
        ) or relu_before is not None and _watched(modules[relu_before.target], global_hooks=False):
            continue  # (the placeholders pass the fused layer's tensors on: hooks on the BN would see other
            # inputs, and its output after the ReLU or shortcut; full backward hooks need the real modules;
            # a forward hook on a ReLU before the BN may return another tensor, which the BN must normalise)
        fbn = _rebuild_bn(modules[bn.target], FusedBatchNorm2d)
        _set_module(model, bn.target, fbn)
        for r in (relu_before, relu_after):
            if r is not None and type(model.get_submodule(r.target)) is not FusedReLU:  # (a shared one: made once)
                _set_module(model, r.target, FusedReLU(inplace=getattr(modules[r.target], "inplace", False)))
            if r is not None and calls[r.target] > 1:  # (its other sites apply the ReLU: FusedReLU.forward)
                model.get_submodule(r.target).shared = True
        layer = SparseConvBNReLU(modules[node.target], fbn, relu_before is not None, relu_after is not None,
                                 residual is not None, owns_bn=False)  # (the model calls fbn: keys unchanged)
        parent_name, _, child = node.target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer.route_input = getattr(parent, "fused_route_input", None) == child
        # (placeholders first: _set_module's train() then leaves the BN's mode, a lone layer's passes it on)
        object.__setattr__(layer, "_placeholders", tuple(model.get_submodule(n.target)
                                                          for n in (relu_before, bn, relu_after) if n is not None))
        _set_module(model, node.target, layer)
        last[node.target] = relu_after or bn
        fused.append(node.target)
    if fused:
        _replace_modules(model, lambda m: MaxPool2x2(2) if _is_pool2x2(m) and not has_extras(m) else None)
    _link(model, last, calls)
    return fused + _fuse_heads(model, graph, modules, calls)


def _fused_before(graph: fx.Graph, modules: dict, calls: dict) -> dict:
    """The layers an earlier fuse_ call fused, each -> the graph node of its activation (the call of
    its last placeholder; a residual layer's own call, which _link does not link from): linked with
    the layers fused now as they would be had all been fused at once (a model that goes sparse layer
    by layer over pruning rounds gets the links a checkpoint's model rebuilt in one call gets). A layer
    built directly, owning its BN, is left out: it neither defers nor pools, nor is deferred into."""
    last = {}
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if type(layer) is not SparseConvBNReLU or calls[node.target] != 1 or layer.owns_bn:
            continue
        act = node
        for placeholder in () if layer.residual else layer._placeholders:
            act = _only_user(act)
            if act is None or act.op != "call_module" or modules.get(act.target) is not placeholder:
                break
        else:
            last[node.target] = act
    return last


def _flattened(node: fx.Node) -> bool:
    """`node`'s only reader is torch.flatten(node, ...) or node.flatten(...) (torchvision's VGG)."""
    user = _only_user(node)
    return (user is not None and user.args[:1] == (node,) and node not in user.args[1:]
            and ((user.op == "call_function" and user.target is torch.flatten)
                 or (user.op == "call_method" and user.target == "flatten")))


def _fuse_heads(model: nn.Module, graph: fx.Graph, modules: dict, calls: dict) -> list[str]:
    """Swap each AdaptiveAvgPool2d -> nn.Flatten(1) -> SparseLinear chain (each module called once,
    each output read only by the next) for engine/replicated.py's modules, which skip the replicas
    of a 1x1 map; a pool read only by torch.flatten becomes a FusedAdaptiveAvgPool2d alone (the
    broadcast instead of PyTorch's kernel). Returns the linears' names."""
    fused = []
    for node in list(graph.nodes):
        pool = _module_call(node, modules, calls, nn.AdaptiveAvgPool2d, BroadcastAvgPool2d)
        if pool is None or has_extras(modules[pool.target]):
            continue
        if _flattened(pool):
            _set_module(model, pool.target, FusedAdaptiveAvgPool2d(modules[pool.target]).train(
                modules[pool.target].training))
            continue
        flat = _module_call(_only_user(pool), modules, calls, nn.Flatten)
        lin = _module_call(_only_user(flat) if flat is not None else None, modules, calls, SparseLinear)
        if (lin is None or (modules[flat.target].start_dim, modules[flat.target].end_dim) != (1, -1)
                or flat.args != (pool,) or lin.args != (flat,) or flat.kwargs or lin.kwargs
                or "bias" not in modules[lin.target]._parameters  # (a bias torch's prune or weight_norm computes)
                or has_extras(modules[flat.target]) or has_extras(modules[lin.target])):
            continue
        new_pool, new_flat, new_lin = (FusedAdaptiveAvgPool2d(modules[pool.target]), FusedFlatten(),
                                       FusedSparseLinear(modules[lin.target]))
        object.__setattr__(new_pool, "flatten", new_flat)  # references, not submodules
        object.__setattr__(new_flat, "linear", new_lin)
        for n, m in ((pool, new_pool), (flat, new_flat), (lin, new_lin)):
            _set_module(model, n.target, m.train(modules[n.target].training))
        fused.append(lin.target)
    return fused


def _link(model: nn.Module, last: dict, calls: dict) -> None:
    """Each fused layer whose activation has one reader, a module call taking it as its input:
    layer.feeds = that reader when it is a fused layer (the BN deferred into its conv's packing),
    layer.pools = that reader when it is a MaxPool2x2 called only there (pooled in the BN's pass).
    Either way the activation is never written. A layer with a residual keeps writing it."""
    for name, act in last.items():
        nxt = _only_user(act)
        layer = model.get_submodule(name)
        if (nxt is None or nxt.op != "call_module" or nxt.args[:1] != (act,) or act in nxt.args[1:] or nxt.kwargs
                or layer.residual):
            continue
        reader = model.get_submodule(nxt.target)
        if nxt.target in last:
            object.__setattr__(layer, "feeds", reader)  # a reference, not a submodule
        elif isinstance(reader, MaxPool2x2) and calls.get(nxt.target) == 1 and nxt.args == (act,):
            object.__setattr__(layer, "pools", reader)
            reader.fed = True


def unfuse_(model: nn.Module) -> nn.Module:
    """Undo fuse_(): plain SparseConv2d, BatchNorm2d, ReLU, pooling, Flatten and SparseLinear modules,
    same parameters (one module per fused one, at each of its names). The model itself cannot be
    replaced in place: a fused layer passed as `model` is refused (use its to_conv()), and so is a model
    holding a layer whose BN it would drop (check_unfusable)."""
    check_model(model)
    if isinstance(model, SparseConvBNReLU):
        raise ValueError("unfuse_ replaces layers inside a model; for one SparseConvBNReLU use .to_conv()")
    check_unfusable(model, "unfuse_")
    for n, m in model.named_modules():  # (before any layer is swapped)
        if isinstance(m, (SparseConvBNReLU, FusedSparseLinear)):
            check_own_bias(m, f"layer {n!r}")
        elif isinstance(m, FusedBatchNorm2d):  # (its plain BatchNorm2d takes its Parameters: torch's TypeError)
            for tensor in ("weight", "bias"):
                check_own_bias(m, f"BatchNorm {n!r}", tensor)
    made = {}  # id(fused module) -> (its plain module, the attributes a user set on it: carried over)
    for n, m in model.named_modules():  # (all built first: a clash is refused before any swap)
        plain = _unfused(m)
        if plain is not None:
            made[id(m)] = plain, user_attributes(m, fused_own(m), plain, n)
    for plain, attrs in made.values():  # (dropped silently before 2026-12-06)
        plain.__dict__.update(attrs)
    _replace_modules(model, lambda m: made.get(id(m), (None,))[0])
    return model


def check_unfusable(model: nn.Module, what: str) -> None:
    """ValueError naming a SparseConvBNReLU of `model` whose BN no other module of the model is: one built directly
    owns its BN (or references one held elsewhere), and `what` (unfuse_, densify_), putting back its conv alone,
    would drop that BN from the forward (silently, before 2026-12-07)."""
    held = {id(m) for m in model.modules()}
    for n, m in model.named_modules():
        if isinstance(m, SparseConvBNReLU) and (m.owns_bn or id(m.bn) not in held):
            raise ValueError(f"layer {n!r} is a SparseConvBNReLU built directly, whose BatchNorm the model does not "
                             f"call ({'it owns its bn' if m.owns_bn else 'its bn is no module of the model'}): {what} "
                             "would put back its conv alone and drop that BN; replace the layer by hand (its "
                             "to_conv(), then a BatchNorm2d with its bn's parameters and buffers, and its ReLUs)")


# What fuse_ sets on the modules it makes (references to the others, flags, the per-thread hand-off slot): theirs,
# as a fresh fused module's keys are, not a user's attribute (one set after fuse_, which unfuse_ carries over).
_FUSE_SETS = frozenset({"route_input", "_placeholders", "feeds", "pools", "fed", "shared", "flatten", "linear",
                        _PerThread.SLOT})
_FUSED_OWN: dict[type, frozenset] = {}  # fused kind -> fused_own


def fused_own(m: nn.Module) -> frozenset | None:
    """The keys of `m`, a module fuse_ made, that are its own (its kind's and fuse_'s): user_attributes' `own`;
    None for a module of another kind."""
    from .formats import CSR
    conv = lambda: SparseConv2d(CSR.from_dense(torch.ones(1, 1, 1, 1)))  # noqa: E731 (no RNG draws)
    kinds = {SparseConvBNReLU: lambda: SparseConvBNReLU(conv(), FusedBatchNorm2d(1)),
             FusedBatchNorm2d: lambda: FusedBatchNorm2d(1), FusedReLU: FusedReLU, MaxPool2x2: lambda: MaxPool2x2(2),
             FusedAdaptiveAvgPool2d: lambda: FusedAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d(1)),
             FusedFlatten: FusedFlatten, FusedSparseLinear: lambda: FusedSparseLinear(
                 SparseLinear(CSR.from_dense(torch.ones(1, 1))))}
    own = kind_keys(type(m), kinds, _FUSED_OWN)  # (the exact kind: a subclass of one is not fuse_'s)
    return None if own is None else own | _FUSE_SETS


def _unfused(m: nn.Module) -> nn.Module | None:
    if isinstance(m, SparseConvBNReLU):
        return m.to_conv()
    if isinstance(m, FusedBatchNorm2d):
        return _rebuild_bn(m, nn.BatchNorm2d)
    if isinstance(m, FusedReLU):
        return nn.ReLU(inplace=m.inplace)
    if isinstance(m, MaxPool2x2):
        return nn.MaxPool2d(2)
    if isinstance(m, FusedAdaptiveAvgPool2d):
        return m.original.train(m.training)
    if isinstance(m, FusedFlatten):
        return nn.Flatten(m.start_dim, m.end_dim).train(m.training)
    if isinstance(m, FusedSparseLinear):
        return m.to_linear().train(m.training)
    return None
