"""The Python side of every `sparsetrain::*` op: one table row per op, registered once.

A row (`Op`) holds what PyTorch needs beyond the C++ schema (csrc/sparsetrain.cpp) and the CPU
kernel (csrc/cpu/<op>.cpp, `TORCH_LIBRARY_IMPL`):

* `fake`     the meta impl (output shapes only; tensors on several devices refused), so torch.compile
             and FakeTensor trace the op (None for a query that returns no tensor);
* `setup` + `backward`   the autograd formula (forward ops only), registered with
             `torch.library.register_autograd`;
* `triton`   "module.function" in `sparsetrain.kernels` (kernels/<module>.py), registered as the
             op's CUDA kernel and used for CPU tensors under `use_backend("triton")`.
Adding an op: README's "Where to add things".

Every call inside the autograd formulas goes through `_call(name, ...)`: the registered op
(C++ on CPU tensors, Triton on CUDA tensors), or under the "triton" backend the Triton function on
CPU tensors too (Triton's interpreter, TRITON_INTERPRET=1; eager under torch.compile: dynamo cannot
trace the interpreter). A forward op forced onto Triton runs as a `torch.autograd.Function` built
from the same row's setup/backward, so there is one formula per op whichever kernels run.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from .extension import _C  # (the C++ extension: registers the schemas and CPU kernels)
from . import backend
from .autograd import eager, first_order, record_inputs, refuse_func_transforms
from .args import conv2d_padding, is_int, pair, refuse_fx_proxy
from .prune_ops import csr_prune, magnitude_threshold, relu_count_  # (the CPU-only ops' wrappers: prune_ops.py)

__all__ = ["OPS", "Op", "AMP_OPS", "amp_args", "simd_bytes", "pool_bytes", "empty_pool", "sparse_linear", "sparse_conv2d",
           "magnitude_threshold", "csr_prune", "relu_count_", "conv2d_padding", "pair"]


@dataclass(frozen=True)
class Op:
    name: str
    fake: Callable | None
    triton: str | None = None
    setup: Callable | None = None
    backward: Callable | None = None

    @property
    def qualname(self) -> str:
        return f"sparsetrain::{self.name}"

    def triton_fn(self) -> Callable:
        """The Triton implementation (imports sparsetrain.kernels.<module> on first use)."""
        if self.triton is None:
            raise RuntimeError(f"{self.qualname} has no Triton kernel (CPU only)")
        module, fn = self.triton.split(".")
        try:
            mod = importlib.import_module(f"sparsetrain.kernels.{module}")
        except ImportError as e:
            raise RuntimeError(f"the Triton backend for {self.qualname} needs triton ({e})") from e
        return getattr(mod, fn)


OPS: dict[str, Op] = {}


def _call(name: str, *args):
    """Run op `name` on the kernels the backend mode selects (module docstring)."""
    op = OPS[name]
    if backend.current_backend() == "triton" and op.triton is not None \
            and not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        if op.backward is not None:
            if name in AMP_OPS and torch.is_autocast_enabled("cpu"):  # the interpreter stands in for CUDA
                args = amp_args(args, torch.get_autocast_dtype("cpu"))
            return _triton_autograd(name)(*args)
        return eager(op.triton_fn())(*args)
    return getattr(torch.ops.sparsetrain, name)(*args)


@functools.lru_cache(maxsize=None)
def _triton_autograd(name: str):
    """The (eager) apply of a torch.autograd.Function: the Triton forward of `name` with the row's
    autograd formula; its backward re-enters "triton", so gradients run Triton after the `with` too."""
    op = OPS[name]

    @first_order
    def backward(ctx, *grads):
        with backend.use_backend("triton"):
            return op.backward(ctx, *grads)

    fn = type(f"Triton_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: op.triton_fn()(*args)),
        "setup_context": staticmethod(record_inputs(op.setup)), "backward": staticmethod(backward)})
    return eager(lambda *args: fn.apply(*args))


def _cuda_kernel(op: Op):
    def run(*args):
        if backend.current_backend() == "cpu":
            raise ValueError(f"{op.qualname}: backend 'cpu' (the C++ engine) cannot take CUDA tensors; "
                             "use_backend('auto') or 'triton' runs the Triton kernels")
        return op.triton_fn()(*args)
    run.__name__ = f"cuda_{op.name}"
    return run


# ============================================================================ mixed precision
# Under torch.autocast a sparse product's *activation* takes the autocast dtype, never its weight:
# on CUDA the Triton kernels load bf16/fp16 activations, accumulate in fp32 against the fp32 values
# and write the activation dtype; the weight gradient comes back in fp32 for the fp32 (master)
# values, which are never copied to low precision. On the CPU the C++ kernels compute in the values'
# dtype (fp32/fp64): an activation arriving in bf16 (from an autocast dense layer) is cast up to it.
AMP_OPS = ("sparse_linear", "sparse_conv2d")  # x first, values fourth; their backward ops follow the forward's dtypes
_LIB = torch.library.Library("sparsetrain", "IMPL")


def amp_args(args: tuple, dtype: torch.dtype) -> tuple:
    """A forward op's arguments under autocast: x cast to `dtype` (fp32 values only: fp64 stays)."""
    x, values = args[0], args[3]
    target = dtype if values.dtype == torch.float32 else values.dtype
    return args if not x.is_floating_point() or x.dtype == target else (x.to(target), *args[1:])


def _autocast_kernel(op: Op, device_type: str):
    def run(_keyset, *args):
        with torch.autocast(device_type, enabled=False):  # (redispatch below the Autocast key)
            dtype = args[3].dtype if device_type == "cpu" else torch.get_autocast_dtype(device_type)
            return getattr(torch.ops.sparsetrain, op.name)(*amp_args(args, dtype))
    return run


def _one_device(op: Op, *args):
    """op's fake, refusing tensors on several devices (a meta tensor among CPU ones lands here, past the C++ checks)."""
    devs = {t.device for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)}
    if len(devs) > 1:
        raise ValueError(f"{op.qualname}: the tensor arguments must be on one device, got {sorted(map(str, devs))}")
    return op.fake(*args)


def _register(op: Op) -> Op:
    OPS[op.name] = op
    if op.fake is not None:
        torch.library.register_fake(op.qualname, functools.partial(_one_device, op))
    if op.backward is not None:
        # first_order: the grad ops have no formulas of their own, so create_graph=True raises
        torch.library.register_autograd(op.qualname, first_order(op.backward), setup_context=record_inputs(op.setup))
    if op.triton is not None:
        torch.library.register_kernel(op.qualname, "cuda", _cuda_kernel(op))
    if op.name in AMP_OPS:
        for device_type in ("cpu", "cuda"):
            key = "Autocast" + torch._C._dispatch_key_for_device(device_type)  # as torch.library.register_autocast
            _LIB.impl(op.name, _autocast_kernel(op, device_type), key, with_keyset=True)
    return op


def _grad_dtype(x):
    """The weight gradient's dtype: fp32 for bf16/fp16 activations (mixed precision), else x's."""
    return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype


# ============================================================================ linear
# W [out, in] as CSR. y = x W^T + b ;  dx = dy W ;  dW = dy^T x sampled at the nonzeros ;  db = sum dy.
# Inputs: x, crow, col, values, ccol, row_t, perm, bias (ccol has in_features + 1 entries).
def _linear_fake(x, crow, col, values, ccol, row_t, perm, bias):
    torch._check(x.shape[-1] == ccol.shape[0] - 1,
                 lambda: f"x must have last dimension in_features = {ccol.shape[0] - 1}, got {x.shape[-1]}")
    return x.new_empty((*x.shape[:-1], crow.shape[0] - 1))


def _linear_setup(ctx, inputs, output):
    x, crow, col, values, ccol, row_t, perm, bias = inputs
    ctx.save_for_backward(x, crow, col, values, ccol, row_t, perm)
    ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype


def _linear_backward(ctx, grad_out):
    x, crow, col, values, ccol, row_t, perm = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = _call("sparse_linear_grad_input", grad_out, crow, col, values, ccol, row_t, perm)
    if ctx.needs_input_grad[3]:
        dvalues = _call("sparse_linear_grad_weight", grad_out, x, crow, col)
    if ctx.has_bias and ctx.needs_input_grad[7]:
        g = grad_out.unsqueeze(0) if grad_out.dim() == 1 else grad_out  # (a 1-D x: one sample)
        dbias = g.sum(tuple(range(g.dim() - 1)), dtype=ctx.bias_dtype)  # (fp32 under amp)
    return dx, None, None, dvalues, None, None, None, dbias


_register(Op("sparse_linear", _linear_fake, "sparse_linear.sparse_linear", _linear_setup, _linear_backward))
_register(Op("sparse_linear_grad_input", lambda dy, crow, col, values, ccol, row_t, perm: (torch._check(
    dy.shape[-1] == crow.shape[0] - 1, lambda: f"grad_out's last dimension must be {crow.shape[0] - 1}, got {dy.shape[-1]}"),
    dy.new_empty((*dy.shape[:-1], ccol.shape[0] - 1)))[1], "sparse_linear.sparse_linear_grad_input"))
_register(Op("sparse_linear_grad_weight", lambda dy, x, crow, col: x.new_empty(col.shape, dtype=_grad_dtype(x)),
             "sparse_linear.sparse_linear_grad_weight"))


# ============================================================================ conv2d
# W [O, C, kh, kw] as CSR [O, C*kh*kw]. Direct convolution (csrc/cpu/sparse_conv2d*.cpp, no im2col):
#   y = conv(x, W) + b ;  dx = conv_transpose(dy, W) ;  dW[o,c,i,j] = <dy[:, o], shift_ij(x[:, c])>
#   at the nonzeros only ;  db = sum of dy over (batch, height, width).
def _conv_out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def _conv_fake(x, crow, col, values, ccol, row_t, perm, kernel_size, stride, padding, bias):
    torch._check(x.dim() == 4, lambda: "x must be 4-D [batch, channels, height, width]")
    kh, kw = kernel_size
    oh, ow = _conv_out(x.shape[2], kh, stride[0], padding[0]), _conv_out(x.shape[3], kw, stride[1], padding[1])
    torch._check(x.shape[1] * kh * kw == ccol.shape[0] - 1 and oh >= 1 and ow >= 1, lambda: f"x {tuple(x.shape)} does "
                 f"not fit a {kh}x{kw} kernel over {ccol.shape[0] - 1} columns (channels, or a map under the kernel)")
    return x.new_empty((x.shape[0], crow.shape[0] - 1, oh, ow))


def _conv_grad_input_fake(grad_out, ccol, row_t, perm, values, input_size, kernel_size, stride, padding,
                          grad_input_add=None):
    c = (ccol.shape[0] - 1) // (kernel_size[0] * kernel_size[1])
    return grad_out.new_empty((grad_out.shape[0], c, input_size[0], input_size[1]))


def _conv_setup(ctx, inputs, output):
    x, crow, col, values, ccol, row_t, perm, kernel_size, stride, padding, bias = inputs
    ctx.save_for_backward(x, crow, col, values, ccol, row_t, perm)
    ctx.conv = (list(kernel_size), list(stride), list(padding))
    ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype


def _conv_backward(ctx, grad_out):
    x, crow, col, values, ccol, row_t, perm = ctx.saved_tensors
    k, s, p = ctx.conv
    grad_out = grad_out.contiguous()
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    dx = dvalues = dbias = None
    if need_x and need_w:  # one pass: dy is packed once for both products
        dx, dvalues = _call("sparse_conv2d_backward", grad_out, x, crow, col, values, ccol, row_t, perm, k, s, p)
    elif need_x:
        dx = _call("sparse_conv2d_grad_input", grad_out, ccol, row_t, perm, values, list(x.shape[2:]), k, s, p)
    elif need_w:
        dvalues = _call("sparse_conv2d_grad_weight", grad_out, x, crow, col, k, s, p)
    if ctx.has_bias and ctx.needs_input_grad[10]:
        dbias = grad_out.sum((0, 2, 3), dtype=ctx.bias_dtype)
    return dx, None, None, dvalues, None, None, None, None, None, None, dbias


_register(Op("sparse_conv2d", _conv_fake, "sparse_conv2d.sparse_conv2d", _conv_setup, _conv_backward))
_register(Op("sparse_conv2d_grad_input", _conv_grad_input_fake, "sparse_conv2d.sparse_conv2d_grad_input"))
_register(Op("sparse_conv2d_grad_weight", lambda dy, x, crow, col, k, s, p: x.new_empty(col.shape, dtype=_grad_dtype(x)),
             "sparse_conv2d.sparse_conv2d_grad_weight"))
_register(Op("sparse_conv2d_backward",
             lambda dy, x, crow, col, values, ccol, row_t, perm, k, s, p, add=None: (x.new_empty(x.shape),
                                                                          x.new_empty(col.shape, dtype=values.dtype)),
             "sparse_conv2d.sparse_conv2d_backward"))


# ============================================================================ BatchNorm behind a sparse conv
# engine/fused.py's layer: the conv with its statistics epilogue, the BN's elementwise pass; backward the BN's
# sums, then the conv backward computing the BN's input gradient as it packs it (bn_act_backward: the same,
# written out), bn_scale_shift its constants. Fakes only: the autograd formula is engine/fused.py's Function.
def _conv_stats_fake(x, crow, col, values, ccol, row_t, perm, kernel_size, stride, padding, bias, relu,
                     in_mean=None, in_scale=None, in_shift=None, in_relu=False, relu_counts=None):
    y = _conv_fake(x, crow, col, values, ccol, row_t, perm, kernel_size, stride, padding, bias)
    return y, x.new_empty((2, crow.shape[0] - 1), dtype=torch.float64)


def _bn_act_backward_fake(grad_out, y, residual, scale, shift, weight, mean, invstd, batch_stats, relu_after, relu_before,
                          grad_residual):
    return y.new_empty(y.shape), mean.new_empty(mean.shape), mean.new_empty(mean.shape), y.new_empty(y.shape if grad_residual else (0,)), mean.new_empty(mean.shape)


def _conv_bn_backward_fake(grad_out, x, crow, col, values, ccol, row_t, perm, k, s, p, grad_input_add, y, residual,
                           scale, shift, weight, mean, invstd, batch_stats, relu_after, relu_before, grad_residual,
                           grad_input, grad_values, in_mean=None, in_scale=None, in_shift=None, in_relu=False,
                           grad_bias=True, in_sums=False, sums=None, pool_indices=None):  # (dx, dvalues, BN dw, db, d res, sum dy, in sums)
    c, e, ci = mean.shape, (0,), (x.shape[1], 2) if in_sums and grad_input else (0,)  # e: empty
    return (x.new_empty(x.shape if grad_input else e), values.new_empty(values.shape if grad_values else e),
            mean.new_empty(c), mean.new_empty(c), y.new_empty(y.shape if grad_residual else e),
            mean.new_empty(c if grad_bias else e), mean.new_empty(ci))


_register(Op("sparse_conv2d_stats", _conv_stats_fake, "sparse_conv2d.sparse_conv2d_stats"))
_register(Op("sparse_conv2d_bn_backward", _conv_bn_backward_fake, "bn_act.sparse_conv2d_bn_backward"))
_register(Op("bn_act", lambda y, mean, scale, shift, residual, relu, relu_counts=None: y.new_empty(y.shape),
             "bn_act.bn_act"))
_register(Op("bn_act_backward", _bn_act_backward_fake, "bn_act.bn_act_backward"))
_register(Op("bn_scale_shift", lambda stats, count, w, b, rm, rv, nbt, momentum, eps, batch_stats, dtype: tuple(
    stats.new_empty(stats.shape[1:], dtype=torch.float64 if i < 3 else dtype) for i in range(5)), "bn_act.bn_scale_shift"))


# ============================================================================ 2x2 max-pooling (CPU only)
# out = max over each 2x2 window (stride 2), idx its position (uint8 0..3); dx = dout at idx, else 0;
# with in_mean/in_scale/in_shift the window of act((x - in_mean) * in_scale + in_shift) (a fused layer's BN output).
def _pool_fake(x, in_mean=None, in_scale=None, in_shift=None, in_relu=False):
    torch._check(x.dim() == 4 and x.shape[2] >= 2 <= x.shape[3], lambda: f"x must be 4-D, >= 2x2, got {tuple(x.shape)}")
    shape = (x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


def _pool_setup(ctx, inputs, output):
    if any(t is not None for t in inputs[1:4]):  # (engine/fused.py differentiates that form itself)
        raise RuntimeError("max_pool2x2 with in_mean/in_scale/in_shift has no autograd formula: call it under "
                           "torch.no_grad()")
    ctx.save_for_backward(output[1])
    ctx.input_size = list(inputs[0].shape[2:])


def _pool_backward(ctx, grad_out, _grad_idx):
    return (torch.ops.sparsetrain.max_pool2x2_backward(grad_out.contiguous(), *ctx.saved_tensors, ctx.input_size),
            None, None, None, None)


_register(Op("max_pool2x2", _pool_fake, setup=_pool_setup, backward=_pool_backward))
_register(Op("max_pool2x2_backward", lambda g, idx, size: g.new_empty((g.shape[0], g.shape[1], size[0], size[1]))))


# ============================================================================ pruning and entropy (CPU only)
def _csr_prune_fake(crow, col, values, threshold, max_ties):
    nnz = torch.library.get_ctx().new_dynamic_size()
    return crow.new_empty(crow.shape), col.new_empty(nnz), values.new_empty(nnz), crow.new_empty(nnz)


_register(Op("magnitude_threshold", lambda t, m, f: tuple(t[0].new_empty((), dtype=d) for d in (torch.float64, torch.int64))))
_register(Op("csr_prune", _csr_prune_fake))
_register(Op("relu_count_", lambda counts, pre: None))
_register(Op("sparse_conv2d_small_tile", None))  # (which CPU conv kernel serves a geometry: an int, nothing to trace)


# csrc/sparsetrain.cpp's: the kernels' register width (64/32/16 B), the output pool's bytes, freeing its unused ones
simd_bytes, pool_bytes, empty_pool = _C.simd_bytes, _C.pool_bytes, _C.empty_pool


# ============================================================================ typed wrappers
def _check_input(x, weight, bias) -> None:
    refuse_fx_proxy(x, "a sparse layer")
    if not hasattr(weight, "index") or not isinstance(getattr(weight, "values", None), torch.Tensor):
        raise TypeError(f"weight must be a sparsetrain.CSR (CSR.from_dense(w, mask)), got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):  # (a list: the dispatcher's schema RuntimeError)
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.device != weight.values.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.values.device}")
    refuse_func_transforms((x, weight.values, bias))  # (torch.func.jvp/grad/vjp/jacrev, forward_ad tangents)


def sparse_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a CSR weight `weight` (sparsetrain.CSR) of shape [out, in]."""
    _check_input(x, weight, bias)
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be a 2-D CSR [out, in], got shape {weight.shape}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have last dimension in_features = {weight.shape[1]}, got shape {tuple(x.shape)}")
    # (the C++ op said only "x must have the dtype of values": the conv's message, with the way out)
    if (x.device.type == "cpu" and x.dtype in _HALF_NAMES and not torch.is_autocast_enabled("cpu")
            and backend.current_backend() != "triton"):
        raise TypeError(f"x must be float32 or float64, got {_HALF_NAMES[x.dtype]} (the CPU kernels compute in "
                        "fp32/fp64: for half-precision activations keep the model in float32 and run it under "
                        "torch.autocast)")
    return _call("sparse_linear", x, *weight.index(), bias)


_HALF_NAMES = {torch.bfloat16: "BFloat16", torch.float16: "Half"}  # (c10's names, as the C++ ops word them)


def sparse_conv2d(x: torch.Tensor, weight, bias: torch.Tensor | None = None, stride=1, padding=0,
                  dilation=1, groups: int = 1) -> torch.Tensor:
    """F.conv2d(x, W, bias, stride, padding) for a CSR weight of shape [out, in, kh, kw]: NCHW (or an
    unbatched CHW) float32/float64; zero padding; dilation 1 and groups 1 only (ValueError otherwise)."""
    _check_input(x, weight, bias)
    if len(weight.shape) != 4:
        raise ValueError(f"weight must be a 4-D CSR [out, in, kh, kw], got shape {weight.shape}")
    if pair(dilation, "dilation") != [1, 1]:
        raise ValueError(f"sparse_conv2d supports dilation 1 only, got {dilation!r}")
    if not is_int(groups):  # (1.0 and True compare equal to 1: F.conv2d refuses them, as here)
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups != 1:
        raise ValueError(f"sparse_conv2d supports groups=1 only, got {groups!r}")
    if x.dim() == 3:  # unbatched [channels, height, width], as F.conv2d and nn.Conv2d take it
        return sparse_conv2d(x.unsqueeze(0), weight, bias, stride, padding).squeeze(0)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [batch, channels, height, width] or 3-D unbatched, got shape {tuple(x.shape)}")
    k, s = list(weight.shape[2:]), pair(stride, "stride")
    return _call("sparse_conv2d", x, *weight.index(), k, s, conv2d_padding(padding, k, s), bias)
