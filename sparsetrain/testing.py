"""What the tests and the benchmarks share: the dense references every sparse kernel is checked
against (plain PyTorch on the masked dense weight, with or without TF32), random masks, and writers of tiny dataset
files in the real formats (CIFAR pickles, IDX), for loader and pipeline tests without downloads,
and a tiny in-memory training split.
"""
from __future__ import annotations

import contextlib

import gzip
import numbers
import os
import pathlib
import pickle
import struct

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["tf32", "random_mask", "model_masks", "mask_weight_", "zero_pruned_", "dense_linear", "dense_linear_replicated",
           "dense_conv2d", "reference_grads", "assert_layer_matches", "tiny_split", "write_cifar", "write_idx", "write_mnist",
           "gloo_threads", "bn_stats"]


@contextlib.contextmanager
def tf32(on: bool):
    """PyTorch's fp32 CUDA matmuls and cuDNN convs with TF32 (on) or true fp32, restored after, through
    the fp32_precision API: once it is used, reading or writing the legacy allow_tf32 flags raises."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [f.fp32_precision for f in flags]
    for f in flags:
        f.fp32_precision = "tf32" if on else "ieee"
    try:
        yield
    finally:
        for f, v in zip(flags, saved):
            f.fp32_precision = v


def random_mask(shape, sparsity: float, generator=None, empty_rows: int = 0) -> torch.Tensor:
    """Bool mask with exactly round(sparsity * numel) False entries (random positions); the first
    `empty_rows` rows (dim 0) are fully pruned."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if isinstance(empty_rows, bool) or not isinstance(empty_rows, int) or not 0 <= empty_rows <= shape[0]:
        raise ValueError(f"empty_rows must be an int in [0, {shape[0]}], got {empty_rows!r}")
    n = 1
    for s in shape:
        n *= s
    k = int(round(sparsity * n))
    perm = torch.randperm(n, generator=generator)
    m = torch.ones(n, dtype=torch.bool)
    m[perm[:k]] = False
    m = m.reshape(shape)
    if empty_rows:
        m[:empty_rows] = False
    return m


class _Mask(torch.nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def mask_weight_(module: torch.nn.Module, mask: torch.Tensor) -> torch.nn.Module:
    """The dense masked baseline: `module.weight` becomes weight * mask in every forward (a
    parametrization), so the step pays the multiply and pruned weights get no gradient."""
    from torch.nn.utils import parametrize
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != module.weight.shape:
        raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(module.weight.shape)}")
    parametrize.register_parametrization(module, "weight", _Mask(mask.to(module.weight.device)))
    return module


@torch.no_grad()
def zero_pruned_(model: torch.nn.Module, masks: dict) -> torch.nn.Module:
    """The dense masked reference without a parametrization: each `masks[name]`'s layer's weight *= mask,
    in place (again after an optimizer step moved the pruned weights)."""
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        weight.mul_(mask.to(weight.device, weight.dtype))  # (a CUDA model's masks may come from the CPU)
    return model


def model_masks(model, sparsity: float, seed: int = 0) -> dict:
    """{name: random_mask} for every layer of sparsify_'s types (exactly nn.Conv2d or nn.Linear: a
    subclass, whose forward may compute something else, or MultiheadAttention's out_proj is not one;
    those sparsify_ then refuses, engine.convert.unconvertible, included), drawn in module order from
    one generator seeded `seed`."""
    if not isinstance(model, torch.nn.Module):  # (as engine.nn.check_model: an AttributeError from inside before)
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    g = torch.Generator().manual_seed(seed)
    return {n: random_mask(m.weight.shape, sparsity, generator=g) for n, m in model.named_modules()
            if type(m) in (torch.nn.Conv2d, torch.nn.Linear)}


def dense_linear(x, weight, mask, bias=None):
    """Reference for SparseLinear: F.linear with the mask applied."""
    return F.linear(x, weight * mask, bias)


def dense_linear_replicated(x, weight, mask, bias=None, repeat=1):
    """Reference for sparse_linear_replicated: F.linear on x with each feature repeated `repeat`
    times (what AdaptiveAvgPool2d -> Flatten hand a VGG head from a 1x1 map), mask applied."""
    return F.linear(x.repeat_interleave(repeat, dim=-1), weight * mask, bias)


def dense_conv2d(x, weight, mask, bias=None, stride=1, padding=0):
    """Reference for SparseConv2d: F.conv2d with the mask applied."""
    return F.conv2d(x, weight * mask, bias, stride=stride, padding=padding)


def bn_stats(y):
    """sparse_conv2d_stats' statistics of y [N, C, H, W], in float64 about the exact mean: [2, C] = per channel
    sum y and the centred sum (y - mean)^2 (what bn_scale_shift reads)."""
    y64 = y.double()
    mean = y64.mean((0, 2, 3), keepdim=True)
    return torch.stack([y64.sum((0, 2, 3)), ((y64 - mean) ** 2).sum((0, 2, 3))])


def reference_grads(fn, x, weight, mask, bias, grad_out, **kw):
    """Output and gradients (dx, dW at all positions, db) of the dense masked reference."""
    x = x.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    y = fn(x, w, mask, b, **kw)
    y.backward(grad_out)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def assert_layer_matches(layer, dense, mask, ref_fn, x, generator, tol, **kw):
    """Run `layer` (a sparse layer built from the dense layer `dense` under `mask`) forward and
    backward on x with a random output gradient, and compare the output, dx, dW at the nonzeros
    (in CSR row-major order: pruned positions have no gradient) and db with the dense masked
    reference `ref_fn` (dense_linear / dense_conv2d, extra arguments in kw)."""
    y = layer(x)
    gy = torch.randn(y.shape, generator=generator, dtype=y.dtype)
    y.backward(gy)
    ry, rdx, rdw, rdb = reference_grads(ref_fn, x, dense.weight, mask, dense.bias, gy, **kw)
    torch.testing.assert_close(y, ry, **tol)
    torch.testing.assert_close(x.grad, rdx, **tol)
    torch.testing.assert_close(layer.weight.values.grad, rdw[mask], **tol)
    if dense.bias is not None:
        torch.testing.assert_close(layer.bias.grad, rdb, **tol)


# ============================================================================ tiny datasets
def tiny_split(n: int = 64, seed: int = 0):
    """A random training Split of n 1x4x4 uint8 images in 3 classes (no noise, no augmentation):
    what a train_epoch test runs on in milliseconds."""
    from sparsetrain.experiment.data import Split
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (n,), generator=g)
    return Split(x, y, y.clone(), torch.arange(n), torch.zeros(n, dtype=torch.bool), torch.tensor([0.5]),
                 torch.tensor([0.25]))


def write_cifar(root, c10=True, n_per_batch=40, n_test=30, seed=0):
    """CIFAR-10 (c10) or CIFAR-100 python-format pickles with random images under `root`; returns
    the training (x [N, 3072] uint8, y) in file order."""
    rng = np.random.default_rng(seed)
    folder = pathlib.Path(root) / ("cifar-10-batches-py" if c10 else "cifar-100-python")  # (str or Path)
    folder.mkdir(parents=True)
    nc, key = (10, "labels") if c10 else (100, "fine_labels")
    names = [f"data_batch_{i}" for i in range(1, 6)] if c10 else ["train"]
    n_train = n_per_batch * (5 if c10 else 1)
    xs, ys = [], []
    for name, n in [*[(f, n_train // len(names)) for f in names], ("test_batch" if c10 else "test", n_test)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, nc, n)]
        d = {"data": x, key: y, "batch_label": name}
        if not c10:
            d["coarse_labels"] = [v // 5 for v in y]
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        xs.append(x)
        ys += y
    meta = {"label_names": [str(i) for i in range(10)]} if c10 else {"fine_label_names": [str(i) for i in range(100)]}
    with open(folder / ("batches.meta" if c10 else "meta"), "wb") as f:
        pickle.dump(meta, f)
    return np.concatenate(xs)[:n_train], np.array(ys[:n_train])


def write_idx(path, arr, gz):
    """`arr` as a uint8 IDX file (MNIST format) at `path` (+ ".gz" when gz)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def write_mnist(folder, gz, n_train=60, n_test=20, seed=0):
    """The four MNIST IDX files with random images and labels in `folder`; returns the arrays."""
    rng, folder = np.random.default_rng(seed), pathlib.Path(folder)  # (str or Path)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, a in arrays.items():
        write_idx(folder / name, a, gz)
    return arrays


def gloo_threads() -> int:
    """This process's threads that a gloo process group runs (by the names gloo gives them, Linux /proc)."""
    return sum("gloo" in open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task"))
