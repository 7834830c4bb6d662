"""Exact forward FLOPs of a (sparse) model at its current sparsity, per sample.

Counted from one forward pass of a dummy input of batch size 1 with hooks, so every output size
is the real one. Conventions (one multiply-add = 2 FLOPs):

* weighted layers (nn.Conv*, nn.Linear, and any module with `.nnz` (on itself or its weight) and conv
  or linear attributes, e.g. SparseLinear / SparseConv2d / BSRLinear): 2 * nnz * P + (bias ? out_units * P : 0), where nnz is the
  number of nonzero weights (the mask's True count when a mask is given, `.nnz` for sparse layers,
  the weight's nonzeros for dense ones) and P the output positions per output unit (H_out * W_out
  for a conv, 1 for a linear on [B, in], also where the model squeezed the sample's batch dim away; a
  transposed conv's multiply-adds are per input position). Zero-padding taps of a conv count as in a dense conv.
* nn.MultiheadAttention: its four projections as linear layers (q over the query's L positions, k and v
  over the key's S, out over L; out_proj's mask or nonzeros, in_proj's nonzeros), counted on the attention
  module: it reads their weights in F.multi_head_attention_forward, so no linear hook sees them. Its
  weight-free products (scores, the weighted sum of values: 4 * L * S * embed_dim) are not counted.
* elementwise layers (counted separately in "elementwise"): BatchNorm (eval; also Group-, Layer- and
  InstanceNorm) 2 per output element
  (folded scale and shift), activations (_ACTS: ReLU, GELU, PReLU, Hardswish, ...) 1, MaxPool k-1 comparisons and AvgPool k adds
  (k = kernel window) per output element, adaptive average pooling the exact summed window sizes.
* not counted: residual additions written as `a + b` in forward (no module to hook; at most
  one add per element of a block output, < 0.1 % of a ResNet's FLOPs), flatten/dropout/identity,
  softmax and the loss.

Training FLOPs per sample ≈ 3 x forward: the input gradient and the weight gradient each cost
about one forward's multiply-adds at the same sparsity (the sparse engine computes the weight
gradient only at the nonzeros).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..engine.args import check_bool_mask, check_flag, is_int
from ..engine.hooks import hooked_eval

__all__ = ["forward_flops", "training_flops", "layer_nnz", "dense_macs", "paper_macs", "paper_round_flops"]

_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU,  # (ReLU6: a Hardtanh)
         nn.Hardtanh, nn.PReLU, nn.RReLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.SELU, nn.CELU, nn.Softplus)
_BN = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _sparse(m: nn.Module) -> bool:
    """A sparse layer: `.nnz` on the layer (SparseLinear, SparseConv2d) or on its weight (BSRLinear's BSR)."""
    return hasattr(m, "nnz") or hasattr(getattr(m, "weight", None), "nnz")


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) or (_sparse(m) and hasattr(m, "kernel_size"))


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (_sparse(m) and hasattr(m, "out_features"))


def layer_nnz(module: nn.Module, mask: torch.Tensor | None = None) -> int:
    """Nonzero weights of a weighted layer: the mask's True count, else `.nnz` (sparse layers; BSRLinear:
    its weight's), else the count of nonzero entries of `.weight`."""
    if not isinstance(module, nn.Module) or not (_is_conv(module) or _is_linear(module)):
        raise TypeError(f"module must be a conv or linear layer (nn.Conv*, nn.Linear, a sparse layer), got "
                        f"{type(module).__name__}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        w = module.weight  # (a sparse layer's is its CSR, which has a shape too)
        if tuple(w.shape) != tuple(mask.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the weight shape {tuple(w.shape)}")
        return int(mask.sum())
    if hasattr(module, "nnz"):
        return int(module.nnz)
    if hasattr(module.weight, "nnz"):  # (BSRLinear: its BSR's entries inside the stored blocks)
        return int(module.weight.nnz)
    return int(torch.count_nonzero(module.weight.detach()))


def _pool_window(m: nn.Module, dims: int) -> int:
    k = m.kernel_size
    return math.prod(k) if isinstance(k, (tuple, list)) else int(k) ** dims


def _adaptive_window_sum(in_sizes, out_sizes) -> int:
    """Sum over output cells of their input window sizes (separable over dims): window i of a dim
    spans [floor(i*In/Out), ceil((i+1)*In/Out))."""
    total = 1
    for n_in, n_out in zip(in_sizes, out_sizes):
        total *= sum(-(-(i + 1) * n_in // n_out) - (i * n_in) // n_out for i in range(n_out))
    return total


def _find_masks(masks: dict | None, name: str):
    if not masks:
        return None
    return masks.get(name, masks.get(f"{name}.weight"))


def _check_args(model, input_shape) -> tuple:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if (not isinstance(input_shape, (tuple, list)) or not input_shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_shape)):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints (one sample, no "
                         f"batch dim), got {input_shape!r}")
    return tuple(input_shape)


def _run(model: nn.Module, input_shape: tuple, handles) -> None:
    """One forward of a zero batch [1, *input_shape] in eval mode with the hooks `handles`; a shape
    the model cannot take is a ValueError naming input_shape (not torch's shape mismatch alone)."""
    p = next(model.parameters(), None)
    x = torch.zeros((1, *input_shape), dtype=p.dtype if p is not None else torch.float32,
                    device=p.device if p is not None else "cpu")
    with hooked_eval(model, handles):
        try:
            model(x)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise ValueError(f"input_shape {input_shape} does not fit the model (one sample without its batch "
                             f"dim, e.g. (3, 32, 32)): its forward raised {type(e).__name__}: {e}") from e


@torch.no_grad()
def forward_flops(model: nn.Module, input_shape, masks: dict[str, torch.Tensor] | None = None,
                  *, elementwise: bool = True, dense: bool = False) -> dict:
    """FLOPs of one forward pass for ONE sample of shape `input_shape` (no batch dim, e.g. (3, 32, 32)).

    masks: optional {module name (or "name.weight"): bool mask of the weight} for dense masked
    layers. Returns {"total": int, "weights": int, "elementwise": int,
    "per_layer": {module name: int}} (total = weights + elementwise; elementwise = 0 when
    `elementwise` is False). The model runs in eval mode, its mode is restored after.
    """
    input_shape = _check_args(model, input_shape)
    for arg, v in (("elementwise", elementwise), ("dense", dense)):  # ("no" was true: counted as yes)
        check_flag(v, arg)
    if masks is not None and not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{name: bool tensor}} or None, got {type(masks).__name__}")
    modules = dict(model.named_modules())
    for key, mk in (masks or {}).items():  # (each named: a mask the counter would not read is refused)
        stem = key.removesuffix(".weight")  # ("fc.weight": the layer fc, also where fc.weight is a CSR module)
        name = stem if stem in modules and (_is_conv(modules[stem]) or _is_linear(modules[stem])) else key
        if name not in modules:
            raise KeyError(f"masks[{key!r}] names no module of the model")
        mod = modules[name]
        if not (_is_conv(mod) or _is_linear(mod)):
            raise KeyError(f"masks[{key!r}]: {name!r} is a {type(mod).__name__}, not a conv or linear layer "
                           "whose weights are counted")
        shape = tuple(mod.weight.shape)
        check_bool_mask(mk, shape, f"masks[{key!r}] must be a bool tensor of shape {shape}")

    per_layer: dict[str, int] = {}
    totals = {"weights": 0, "elementwise": 0}
    handles, inside_weighted = [], set()

    def add(name, kind, flops):
        per_layer[name] = per_layer.get(name, 0) + int(flops)
        totals[kind] += int(flops)

    def weighted_hook(name, mod):
        def hook(_m, inp, out):
            if _is_conv(mod):
                units, positions = out.shape[1], out[0, 0].numel()
                # (a transposed conv meets every weight once per *input* position)
                taps = inp[0][0, 0].numel() if isinstance(mod, nn.modules.conv._ConvTransposeNd) else positions
            else:  # (out.numel(): the run's batch is 1, and a model may squeeze it away: out[0] was a scalar)
                units = out.shape[-1]
                positions = taps = out.numel() // units
            if dense:  # every weight of the architecture, one multiply-add each, no bias adds
                w = getattr(mod, "weight", None)
                add(name, "weights", 2 * math.prod(w.shape) * taps)
                return
            nnz = layer_nnz(mod, _find_masks(masks, name))
            bias = getattr(mod, "bias", None) is not None
            add(name, "weights", 2 * nnz * taps + (units * positions if bias else 0))
        return hook

    def elementwise_hook(name, mod):
        def hook(_m, inp, out):
            if isinstance(out, tuple):  # (a pool with return_indices=True: (values, indices))
                out = out[0]
            n_out = out.numel()  # (batch 1; out[0] missed a batch dim squeezed away)
            if isinstance(mod, _BN):
                f = 2 * n_out
            elif isinstance(mod, _ACTS):
                f = n_out
            elif isinstance(mod, _MAXPOOL):
                f = (_pool_window(mod, out.dim() - 2) - 1) * n_out
            elif isinstance(mod, _AVGPOOL):
                f = _pool_window(mod, out.dim() - 2) * n_out
            else:  # adaptive pooling: exact window sizes, per channel
                x = inp[0]
                nd = out.dim() - 2
                windows = _adaptive_window_sum(x.shape[-nd:], out.shape[-nd:])
                f = windows * (n_out // math.prod(out.shape[-nd:]))  # (x channels)
                if isinstance(mod, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
                    f -= n_out  # k - 1 comparisons per window
            add(name, "elementwise", f)
        return hook

    def attention_hook(name, mod):
        def hook(_m, args, kwargs, _out):
            q, k = (args[i] if len(args) > i else kwargs[a] for i, a in enumerate(("query", "key")))
            E, L, S = mod.embed_dim, q.numel() // mod.embed_dim, k.numel() // mod.kdim  # (one sample's positions)
            ws = ((mod.in_proj_weight[:E], mod.in_proj_weight[E:2 * E], mod.in_proj_weight[2 * E:])
                  if mod._qkv_same_embed_dim else (mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight))
            nnz = [int(torch.count_nonzero(w)) for w in ws] + [
                layer_nnz(mod.out_proj, _find_masks(masks, f"{name}.out_proj"))]
            biased = [mod.in_proj_bias is not None] * 3 + [mod.out_proj.bias is not None]
            for w, n, p, b in zip(ws + (mod.out_proj.weight,), nnz, (L, S, S, L), biased):
                add(name, "weights", 2 * math.prod(w.shape) * p if dense else 2 * n * p + (E * p if b else 0))
        return hook

    for name, mod in modules.items():
        if any(p == "" or name.startswith(p + ".") for p in inside_weighted):  # ("": the model is the layer)
            continue  # e.g. the CSR container inside a sparse layer
        if isinstance(mod, nn.MultiheadAttention):  # (out_proj inside: counted by this hook, never called itself)
            inside_weighted.add(name)
            handles.append(mod.register_forward_hook(attention_hook(name, mod), with_kwargs=True))
        elif _is_conv(mod) or _is_linear(mod):
            inside_weighted.add(name)
            handles.append(mod.register_forward_hook(weighted_hook(name, mod)))
        elif elementwise and isinstance(mod, _BN + _ACTS + _MAXPOOL + _AVGPOOL + _ADAPTIVE):
            handles.append(mod.register_forward_hook(elementwise_hook(name, mod)))

    _run(model, input_shape, handles)
    return {"total": totals["weights"] + totals["elementwise"], **totals, "per_layer": per_layer}


def training_flops(fwd_flops: int | dict, n_samples: int, epochs: int | float = 1,
                   factor: float = 3.0) -> int:
    """Training FLOPs ≈ factor (3: forward + input grad + weight grad) x forward FLOPs per sample
    x samples x epochs. `fwd_flops` is an int or forward_flops()'s dict (its "total")."""
    if isinstance(fwd_flops, dict) and "total" not in fwd_flops:
        raise ValueError(f"fwd_flops must be an int or forward_flops()'s dict (with 'total'), got keys "
                         f"{list(fwd_flops)}")
    f = fwd_flops["total"] if isinstance(fwd_flops, dict) else fwd_flops
    # (numbers.*: a numpy int or float is a number too; samples are whole: 2.5 images was counted as such)
    if not is_int(n_samples) or n_samples < 0:
        raise ValueError(f"n_samples must be a non-negative int, got {n_samples!r}")
    for arg, v in (("fwd_flops", f), ("epochs", epochs), ("factor", factor)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf:
            raise ValueError(f"{arg} must be a finite non-negative number, got {v!r}")
    return int(round(factor * f * n_samples * epochs))


# ============================================================================ the paper's convention
def _check_weighted(model, input_shape) -> tuple:
    input_shape = _check_args(model, input_shape)
    if not any(_is_conv(m) or _is_linear(m) for m in model.modules()):
        raise ValueError(f"model ({type(model).__name__}) has no conv or linear layer (nn.Conv*, nn.Linear, a "
                         "sparse layer): its dense multiply-adds, all this convention counts, would be 0")
    return input_shape


def dense_macs(model: nn.Module, input_shape) -> int:
    """Multiply-adds of one forward pass of the model's dense architecture for one sample: every
    conv and linear weight, pruned or not (biases, BatchNorm, activations and pooling not counted).
    ValueError for a model without a conv or linear layer (0 would read as a free model)."""
    _check_weighted(model, input_shape)
    return forward_flops(model, input_shape, elementwise=False, dense=True)["weights"] // 2


@torch.no_grad()
def paper_macs(model: nn.Module, input_shape) -> int:
    """The paper's per-image forward cost: dense_macs plus, per output element, 1 for a conv's bias
    and 4 for an affine BatchNorm (2 without affine); ReLU, pooling and linear biases count 0. VGG-like
    (5, 5) at 32 x 32: 67,195,904 + 5 x 126,976 conv outputs = 67,830,784, which reproduces every
    PFLOPs entry of the paper's Tables 1 and 6-11 as whole rounds (3 x 67.83 M x 50,000 x 160 = 1.628
    PFLOPs). thop itself gives neither: 0.1.1 counts no conv bias and (1 + window) per adaptive-pool
    output (67,729,408: 30 rounds 48.77 PF, not 48.84), 0.0.31 BatchNorm 2 and ReLU 1 (67,601,920)."""
    input_shape = _check_weighted(model, input_shape)
    extra, handles = [0], []

    def hook(m, _inp, out):
        n = out.numel()  # (batch 1)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            extra[0] += (4 if m.affine else 2) * n
        elif getattr(m, "bias", None) is not None:
            extra[0] += n

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (_is_conv(m) and not _is_linear(m)):
            handles.append(m.register_forward_hook(hook))
    _run(model, input_shape, handles)
    return dense_macs(model, input_shape) + extra[0]


def paper_round_flops(model: nn.Module, input_shape, n_images: int, epochs: int) -> int:
    """One pruning round in the paper's convention (its Tables 1 and 6-11): 3 x paper_macs (the
    dense forward, one FLOP per multiply-add, whatever the sparsity) x training images x epochs.
    VGG-like(5, 5) on CIFAR-10: 3 x 67.83 M x 50,000 x 160 = 1.628 PFLOPs per round, so the paper's
    48.84 PFLOPs is 30 rounds. `n_images`: the whole training file (train + validation: the paper's
    code trains on all 50,000 CIFAR images; Flowers-102's official train split alone, 1,020 images)."""
    return training_flops(paper_macs(model, input_shape), n_images, epochs)
