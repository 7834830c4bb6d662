"""Dense references, shared by the tests and the benchmarks (bench/ imports this module).

Every sparse kernel is checked against plain PyTorch on the masked dense weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_mask(shape, sparsity: float, generator=None, empty_rows: int = 0) -> torch.Tensor:
    """Bool mask with exactly round(sparsity * numel) False entries (random positions); the first
    `empty_rows` rows (dim 0) are fully pruned."""
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


def dense_linear(x, weight, mask, bias=None):
    """Reference for SparseLinear: F.linear with the mask applied."""
    return F.linear(x, weight * mask, bias)


def dense_conv2d(x, weight, mask, bias=None, stride=1, padding=0):
    """Reference for SparseConv2d: F.conv2d with the mask applied."""
    return F.conv2d(x, weight * mask, bias, stride=stride, padding=padding)


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
