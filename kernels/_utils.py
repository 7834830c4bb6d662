"""Shared helpers for the Triton kernels: interpreter detection, autotune-or-fixed launches,
per-mask index caches and argument checks.

`INTERPRET` is read when this module is imported (Triton itself decides at `@triton.jit`
decoration time): set `TRITON_INTERPRET=1` before the first import of `sparsetrain.kernels.*`
to run the kernels on CPU tensors through Triton's interpreter.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import warnings

import numpy as np
import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float64)
HALF_DTYPES = (torch.bfloat16, torch.float16)  # activations under mixed precision (values stay fp32)


def autotune(configs, key, **kw):
    """`triton.autotune` on a GPU; under the interpreter the kernel stays un-tuned (autotuning
    times CUDA launches) and `launch` passes the meta-parameters of the config with the largest
    blocks explicitly: the interpreter runs programs one after another, each block as numpy
    arrays, so the fewest programs is the fastest (masking is exercised all the more)."""
    def wrap(fn):
        if INTERPRET:
            fn._st_default = max(configs, key=lambda c: math.prod(v for v in c.kwargs.values() if isinstance(v, int)))
            return fn
        return triton.autotune(configs=configs, key=key, **kw)(fn)
    return wrap


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta), adding the default config when the kernel is not autotuned.
    `grid` is a callable of the meta-parameters (as triton.autotune requires). On the device of its
    first CUDA tensor: Triton launches on the current device and its current stream, which for
    tensors on cuda:1 would otherwise be cuda:0's (as torch's own ops, which follow their inputs)."""
    cfg = getattr(kernel, "_st_default", None)
    if cfg is not None:
        meta = {**cfg.kwargs, "num_warps": cfg.num_warps, **meta}
    dev = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
    if dev is None:
        return kernel[grid](*args, **meta)
    if torch.are_deterministic_algorithms_enabled():
        _alert_not_deterministic(kernel)
    with torch.cuda.device(dev):
        return kernel[grid](*args, **meta)


def _alert_not_deterministic(kernel) -> None:
    """As PyTorch's own nondeterministic CUDA ops under torch.use_deterministic_algorithms(True): an
    error, or a warning with warn_only=True. On a GPU the autotuner picks each kernel's tiles by timing,
    per process (another tiling sums in another order), and split reductions add with float atomics."""
    name = getattr(getattr(kernel, "fn", kernel), "__name__", "a kernel")
    msg = (f"sparsetrain's Triton {name} does not have a deterministic implementation (autotuned tiles, atomic "
           "sums), but you set 'torch.use_deterministic_algorithms(True)'; use the CPU engine for bitwise "
           "reproducible runs, or 'warn_only=True' to allow it")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


def check_device(*tensors, name: str):
    """Triton needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    dev = tensors[0].device
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"{name}: all tensors must be on one device, got {dev} and {t.device}")
    if dev.type == "cpu" and not INTERPRET:
        raise ValueError(f"{name}: the Triton kernels need CUDA tensors, or CPU tensors with "
                         "TRITON_INTERPRET=1 set before sparsetrain.kernels is first imported")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: unsupported device {dev}")


def _arg_checks(names: str, check):
    """The decorator of tensor_args and flag_args: check(fn, name, value, optional) on each parameter of `names`
    (space-separated; "bias?": optional) the call gives (one left out: its default, or fn's own TypeError), its
    position found once, when fn is decorated (not a signature bind per call: these run on every launch)."""
    def wrap(fn):
        params = list(inspect.signature(fn).parameters)
        spec = [(n.rstrip("?"), params.index(n.rstrip("?")), n.endswith("?")) for n in names.split()]

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            for name, i, optional in spec:
                if i < len(args) or name in kwargs:
                    check(fn, name, args[i] if i < len(args) else kwargs[name], optional)
            return fn(*args, **kwargs)
        return checked
    return wrap


def _check_tensor(fn, name: str, v, optional: bool) -> None:
    if not isinstance(v, torch.Tensor) and not (optional and v is None):
        raise TypeError(f"{fn.__name__}: {name} must be a torch.Tensor{' or None' if optional else ''}, "
                        f"got {type(v).__name__}")


def tensor_args(names: str):
    """Decorates an op's Triton function: its tensor parameters `names` (space-separated; "bias?": None
    taken) must be tensors, a TypeError naming the parameter otherwise, as the op's schema refuses them
    (None or a list raised an AttributeError, "'NoneType' object has no attribute 'dtype'", from inside)."""
    return _arg_checks(names, _check_tensor)


def check_flag(v, name: str) -> None:
    """A bool argument: True or False (numpy's bool too), engine.args.check_flag's rule and wording, kept here for
    the kernels (as is_int). The C++ schema's bool takes an int or a tensor as given; here 2, "no" or a tensor
    was silently truthy (a ReLU applied, a gradient computed), where the ops' Python callers refuse it."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {v!r}")


def flag_args(names: str):
    """Decorates an op's Triton function: its bool parameters `names` (space-separated), where given (else
    their defaults), must be True or False (check_flag: a TypeError naming the parameter)."""
    return _arg_checks(names, lambda fn, name, v, optional: check_flag(v, name))


def check_float(t: torch.Tensor, arg: str, dtypes=FLOAT_DTYPES, like: torch.Tensor | None = None,
                like_name: str = "values"):
    if t.dtype not in dtypes:
        raise TypeError(f"{arg} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(f"{arg} must have the dtype of {like_name} ({like.dtype}), got {t.dtype}")


def check_activation(t: torch.Tensor, arg: str, values: torch.Tensor, values_arg: str = "values"):
    """An activation (x, grad_out) has the dtype of the weight's values (the argument `values_arg`), or, under
    mixed precision, bf16/fp16 with fp32 values: the kernels then accumulate in fp32 and write the activation dtype."""
    if t.dtype == values.dtype or (values.dtype == torch.float32 and t.dtype in HALF_DTYPES):
        return
    raise TypeError(f"{arg} must have the dtype of {values_arg} ({values.dtype})"
                    f"{' or bfloat16/float16 (mixed precision)' if values.dtype == torch.float32 else ''}, "
                    f"got {t.dtype}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and weight-gradient) dtype for activations of `dtype`: fp32 for bf16/fp16."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


# torch dtypes by the C++ ops' names for them (c10's ScalarType), so both engines word a refusal alike
_C10_NAME = {torch.int32: "Int", torch.int64: "Long", torch.float32: "Float", torch.float64: "Double",
             torch.bool: "Bool", torch.uint8: "Byte", torch.float16: "Half", torch.bfloat16: "BFloat16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _C10_NAME.get(dtype, str(dtype))


def check_index(t: torch.Tensor, arg: str, dtype: torch.dtype):
    """The kernels read index tensors at ptr + i: of `dtype` (TypeError), 1-D and contiguous
    (ValueError), as the C++ ops check and word it."""
    if t.dtype != dtype:
        raise TypeError(f"{arg} must have dtype {dtype_name(dtype)}, got {dtype_name(t.dtype)}")
    if t.dim() != 1:
        raise ValueError(f"{arg} must be 1-D, got {t.dim()}-D")
    if not t.is_contiguous():
        raise ValueError(f"{arg} must be contiguous")


# ------------------------------------------------------------------ argument checks (the C++ ops' wording)
def check_conv_args(kernel_size, stride, padding) -> None:
    """Two entries each, kernel and stride >= 1, padding >= 0, each < 2^31, at most 2^24 taps (the C++ op's
    checks and wording), before anything indexes them or divides by them."""
    if not all(hasattr(a, "__len__") and len(a) == 2 for a in (kernel_size, stride, padding)):
        raise ValueError(f"kernel_size, stride and padding must each have 2 entries, got {kernel_size}, {stride}, "
                         f"{padding}")
    for arg, v, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        check_ints(v, arg)
        if min(int(e) for e in v) < low:
            raise ValueError(f"{arg} must be >= {low}, got {[int(e) for e in v]}")
    k, s, p = ([int(e) for e in a] for a in (kernel_size, stride, padding))
    if max(k + s + p) >= 2**31:  # (as the C++ op: 2^31 and more ran, or failed allocating, or as another error)
        raise ValueError(f"kernel_size, stride and padding must be < 2^31, got {k}, {s}, {p}")
    if k[0] * k[1] > 2**24:
        raise ValueError(f"kernel_size must have at most 2^24 taps, got {k}")


def conv_geometry(x_shape, O, kernel_size, stride, padding):
    """The conv kernels' sizes (a dict; conv_args: in their argument order) for x [B, C, H, W] and O outputs."""
    check_conv_args(kernel_size, stride, padding)
    B, C, H, W = x_shape
    (KH, KW), (SH, SW), (PH, PW) = (tuple(int(v) for v in a) for a in (kernel_size, stride, padding))
    if not (0 <= H < 2**31 and 0 <= W < 2**31):  # (the C++ op's make_plan: an empty batch of 2^31 rows was taken)
        raise ValueError(f"input spatial size must be {'>= 0' if min(H, W) < 0 else '< 2^31'}, got ({H}, {W})")
    if H + 2 * PH < KH or W + 2 * PW < KW:
        raise ValueError(f"input spatial size ({H}, {W}) plus padding ({PH}, {PW}) is smaller than the "
                         f"kernel ({KH}, {KW})")
    OH, OW = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    return dict(C=C, H=H, W=W, O=O, OH=OH, OW=OW, KH=KH, KW=KW, SH=SH, SW=SW, PH=PH, PW=PW)


def conv_args(g):
    """conv_geometry's sizes as the conv kernels take them, in order."""
    return [g[k] for k in ("C", "H", "W", "O", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW")]


def is_int(v) -> bool:
    """An int, numpy's included, but not a bool (True ran as 1): engine.args.is_int's rule, kept here once
    for the kernels (kernels/ imports nothing from sparsetrain)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_ints(v, arg: str) -> None:
    """Every entry of `v` an integer (TypeError naming `arg`): int() truncated a stride of 1.5 to 1, a
    silently other conv, where the C++ schema (int[]) refuses it; a bool too (is_int)."""
    if not all(is_int(e) for e in v):
        raise TypeError(f"{arg} must hold ints, got {list(v)}")


def check_split(split) -> int | None:
    """A weight gradient's `split` (slices of the batch or pixels, summed atomically): None (chosen) or an int
    in [1, 65535], returned as an int; 0 or a negative launched no program (uninitialised memory or zeros, silently)."""
    if split is not None and not is_int(split):
        raise TypeError(f"split must be an int >= 1 or None, got {split!r}")
    if split is not None and split < 1:
        raise ValueError(f"split must be an int >= 1 or None, got {split!r}")
    if split is not None and split > 65_535:  # (the slices are CUDA grid axis 1: more failed at launch)
        raise ValueError(f"split must be at most 65535 (CUDA's second grid axis), got {split!r}")
    return None if split is None else int(split)


def check_values(values, nnz: int) -> None:
    """values [nnz] float, as the C++ ops' check_values_conv (the kernels read values[p] for p < nnz)."""
    check_float(values, "values")
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D, got {values.dim()}-D")
    check_nnz(values, "values", nnz)


def check_counts(counts: torch.Tensor, n: int, what: str = "neuron") -> None:
    """relu_counts: int64 (TypeError) [n] (ValueError), the C++ ops' check_counts and wording."""
    if counts.dtype != torch.int64:
        raise TypeError(f"relu_counts must have dtype int64, got {dtype_name(counts.dtype)}")
    if counts.shape != (n,):
        raise ValueError(f"relu_counts must be int64 [{n}] (one per {what}), got {tuple(counts.shape)}")


def channel_vector(t, name: str, n: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One entry per channel, of `like`'s dtype (or `dtype`): the C++ ops' check_channels and wording."""
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name} must have shape [{n}] (one per channel), got {list(t.shape)}")
    dtype = like.dtype if dtype is None else dtype
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    check_device(like, t, name=name)
    return t.contiguous()


# ------------------------------------------------------------------ per-mask index work, cached
# Keyed on the identity of the index tensor (a module buffer lives as long as its mask) and
# validated by its version counter and data pointer, so an in-place edit or a new mask recomputes.
_CACHE: dict[str, WeakIdKeyDictionary] = {}


def cached(kind: str, key_tensor: torch.Tensor, make, *also: torch.Tensor):
    """make() once per (kind, key_tensor); `also` are tensors the value depends on too."""
    if any(t.is_inference() for t in (key_tensor, *also)):  # (no version counter to see an in-place edit by:
        return make()  # computed per call; reading _version raised for a model built under torch.inference_mode)
    table = _CACHE.setdefault(kind, WeakIdKeyDictionary())
    stamp = tuple((t._version, t.data_ptr(), t.numel()) for t in (key_tensor, *also))
    hit = table.get(key_tensor)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = make()
    table[key_tensor] = (stamp, value)
    return value


def max_index(idx: torch.Tensor, arg: str = "index") -> int:
    """The largest entry of an index tensor (-1 when empty), once per mask: the bound a direct op call
    is checked against without a device sync per call; a negative entry (read before the tensor a
    kernel indexes with it) is refused here, naming `arg`, as the C++ ops refuse it."""
    def make():
        return tuple(torch.stack([idx.min(), idx.max()]).tolist()) if idx.numel() else (0, -1)
    low, high = cached("index_bounds", idx, make)
    if low < 0:
        raise ValueError(f"{arg} has negative entries (the smallest is {low})")
    return int(high)


def check_compressed(ptr: torch.Tensor, idx: torch.Tensor, ptr_name: str, idx_name: str) -> None:
    """A compressed index (ptr over rows, idx) the kernels can walk: ptr[0] == 0, non-decreasing, and
    ptr[-1] == idx.numel() (the C++ ops' check_compressed, same wording): the kernels read idx, and the
    values or perm, at every position in [ptr[r], ptr[r + 1]), and write the weight gradient there.
    (ptr, idx: already checked 1-D int64 / int32.) ptr's entries are read once per mask (cached, as
    max_index): on a GPU that is one device sync when a new or edited index is first used, none per call."""
    if ptr.numel() < 1:
        raise ValueError(f"{ptr_name} must have rows + 1 >= 1 entries")

    def make():
        down = ptr.diff() < 0  # (first decreasing row, -1 if none): one read of three numbers
        bad = torch.where(down.any(), down.to(torch.int64).argmax(), -1) if down.numel() else ptr.new_tensor(-1)
        return tuple(int(v) for v in torch.stack([ptr[0], ptr[-1], bad]).tolist())
    first, last, bad = cached("ptr_bounds", ptr, make)
    if first != 0:
        raise ValueError(f"{ptr_name}[0] must be 0, got {first}")
    if bad >= 0:
        raise ValueError(f"{ptr_name} must be non-decreasing (row {bad})")
    if last != idx.numel():
        raise ValueError(f"{ptr_name}[-1] ({last}) must equal {idx_name}.numel() ({idx.numel()})")


def check_nnz(t: torch.Tensor, arg: str, nnz: int, what: str = "entries") -> None:
    """`t` holds one entry (or block: its first dimension) per nonzero, as the C++ ops' check."""
    n = t.shape[0] if t.dim() else 1
    if n != nnz:
        raise ValueError(f"{arg} must have nnz = {nnz} {what}, got {n}")


def check_perm(perm: torch.Tensor, nnz: int) -> None:
    """perm (the transposed index's positions in the values) must address [0, nnz) only (largest entry
    read once per mask, as max_index)."""
    check_nnz(perm, "perm", nnz)
    if max_index(perm, "perm") >= nnz:
        raise ValueError(f"perm has entries outside [0, {nnz})")


def check_transposed(ccol, row_t, perm, crow=None, col=None, name: str = "check_transposed") -> None:
    """The transposed index (ccol, row_t, perm: checked, perm within [0, nnz)) is the CSR's (crow, col) own:
    perm a permutation, entry k of column c the CSR entry perm[k], of row row_t[k] and column c (the C++ conv
    ops' check_transposed, same wording); without the CSR, perm a permutation. A duplicate read one weight twice
    and another never, silently. Once per mask (cached, as max_index). `name`: the caller's, in a device error."""
    if crow is not None:
        check_device(perm, crow, col, name=name)  # (read together below)
        check_index(crow, "crow_indices", torch.int64)
        check_index(col, "col_indices", torch.int32)
        check_compressed(crow, col, "crow_indices", "col_indices")

    def make():
        nnz = perm.numel()
        if crow is not None and (col.numel() != nnz or max_index(row_t, "row_indices_t") >= crow.numel() - 1):
            return False
        if nnz == 0:
            return True
        ok = (torch.bincount(perm, minlength=nnz) == 1).all()
        if crow is not None:  # (the column of each CSC entry, from ccol; its row's CSR range, from crow)
            c = torch.repeat_interleave(torch.arange(ccol.numel() - 1, device=ccol.device), ccol.diff(),
                                        output_size=nnz)
            r = row_t.long()
            ok &= ((col[perm].long() == c) & (crow[r] <= perm) & (perm < crow[r + 1])).all()
        return bool(ok)
    also = (ccol, row_t) + ((crow, col) if crow is not None else ())
    if not cached("transposed" if crow is not None else "permutation", perm, make, *also):
        raise ValueError("ccol_indices, row_indices_t and perm must be the transposed index of crow_indices and "
                         "col_indices (CSR.index() builds them)" if crow is not None else
                         "perm must be a permutation of [0, nnz)")


def row_order(ptr: torch.Tensor) -> torch.Tensor:
    """Rows of a compressed index sorted by length, longest first (int32): one launch serves all
    rows, similar lengths share a program, and the heaviest rows start first (LPT schedule)."""
    def make():
        lengths = ptr.diff()
        return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)
    return cached("row_order", ptr, make)


def density_key(nnz: int, rows: int) -> int:
    """Autotune bucket of the mean row length (a power of two): the density part of the key."""
    mean = max(1, -(-nnz // max(rows, 1)))
    return 1 << (mean - 1).bit_length()


def pow2_bucket(n: int) -> int:
    """Autotune bucket of a size: next power of two (so every batch size does not re-tune)."""
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def centre_stats(y: torch.Tensor, crow_indices: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """stats[1], sum y^2, as sum (y - mean)^2 = sum y^2 - (sum y)^2 / n (>= 0; 0 for an empty row), as the C++
    centre_stats: an fp64 channel where that cancels past 1e2 is summed again about its mean from y (float32 never)."""
    if (n := y.numel() // max(y.shape[1], 1)) == 0:
        return stats
    empty = crow_indices[1:] == crow_indices[:-1]
    centred = (stats[1] - stats[0] * (stats[0] / n)).clamp_min(0.0).masked_fill(empty, 0.0)
    again = (stats[1] > 1e2 * centred) & ~empty if y.dtype == torch.float64 else None  # (NaN: never; 0 of sq > 0: yes)
    stats[1] = centred
    if again is not None and bool(again.any()):  # (one sync, fp64 only)
        idx = again.nonzero().squeeze(1)
        stats[1][idx] = ((y.index_select(1, idx) - (stats[0][idx] / n).view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    return stats
