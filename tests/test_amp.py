"""Mixed precision (--amp): the autocast rule of the sparse ops, the training step under autocast
with a GradScaler, and the flag's resolution. The Triton kernels in bf16/fp16 are checked under
the interpreter in test_triton_kernels.py (mixed_precision_bf16_fp16_through_the_layers) and the
kernels compile for every activation/value dtype pair in test_triton_compile.py."""
import contextlib
import copy
import dataclasses

import pytest
import torch
from torch import nn

from sparsetrain.engine import ops
from sparsetrain.experiment.config import Config, Hyper
from sparsetrain.experiment.devices import resolve_amp
from sparsetrain.experiment.study import result_settings, run_dir_of
from sparsetrain.experiment.train import make_optimizer, train_epoch
from sparsetrain.nn import SparseConv2d, SparseLinear
from sparsetrain.testing import dense_conv2d, dense_linear, random_mask, tiny_split


def _sparse_linear(fin, fout, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(fin, fout)
    return SparseLinear.from_dense(lin, random_mask((fout, fin), sparsity, generator=g))


def test_cpu_autocast_casts_activations_up_to_the_cpu_kernels():
    """Under CPU autocast a dense layer hands a bf16 activation to the sparse layer: the C++ kernels
    compute in the values' dtype (fp32), so the activation is cast up, never the weights down; the
    result equals the sparse layer on the upcast activation, the values' gradient is fp32."""
    torch.manual_seed(0)
    dense, sparse = nn.Linear(13, 17), _sparse_linear(17, 5, 0.8)
    conv = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, padding=1), random_mask((4, 3, 3, 3), 0.5))
    x, xc = torch.randn(6, 13), torch.randn(2, 3, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = dense(x)
        y = sparse(torch.relu(h))
        z = conv(xc)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32 and z.dtype == torch.float32
    torch.testing.assert_close(y, sparse(torch.relu(h).float()))
    # (and the dense PyTorch layers with the masked weights, in fp32 on the upcast activations)
    with torch.no_grad():
        torch.testing.assert_close(y, nn.functional.linear(torch.relu(h).float(), sparse.weight.to_dense(), sparse.bias))
        torch.testing.assert_close(z, nn.functional.conv2d(xc.float(), conv.weight.to_dense(), conv.bias, padding=1))
    y.sum().backward()
    assert sparse.weight.values.grad.dtype == torch.float32 and dense.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype,name", [(torch.float16, "Half"), (torch.bfloat16, "BFloat16")])
def test_a_half_model_on_cpu_says_to_use_autocast(dtype, name):
    """model.half() casts the sparse values down too: the CPU kernels refuse them with a message that
    names the argument, the dtype and the way out (fp32 model under autocast), as does a half input
    outside autocast; that way out gives the autocast result above."""
    torch.manual_seed(0)
    conv = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3), random_mask((4, 3, 3, 3), 0.5))
    model = nn.Sequential(conv, nn.Flatten(), _sparse_linear(4 * 3 * 3, 5, 0.8))
    x = torch.randn(2, 3, 5, 5)
    half = copy.deepcopy(model).to(dtype)
    for fn, arg in ((lambda: half(x.to(dtype)), "values"), (lambda: model(x.to(dtype)), "x")):
        with pytest.raises(TypeError, match=rf"{arg} must be float32 or float64, got {name}.*autocast"):
            fn()
    with torch.autocast("cpu", dtype=dtype):
        y = model(x.to(dtype))
    torch.testing.assert_close(y, model(x.to(dtype).float()))
    # a SparseLinear alone says the same (before 2026-12-06: "x must have the dtype of values", no way out)
    lin = _sparse_linear(7, 3, 0.5)
    with pytest.raises(TypeError, match=rf"x must be float32 or float64, got {name}.*autocast"):
        lin(torch.randn(2, 7).to(dtype))
    xl = torch.randn(2, 7).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        yl = lin(xl)
    torch.testing.assert_close(yl, xl.float() @ lin.weight.to_dense().t() + lin.bias)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_a_pattern_changed_between_forward_and_backward_is_refused(amp):
    """BSRLinear's backward read the layer's current index (2026-12-06): under autocast another pattern
    loaded in between paired the forward's values with it. The CSR layers (and the fused conv -> BN)
    save the values Parameter itself, not a cast copy, in and out of autocast: a pattern loaded or
    pruned in between bumps its version, and the backward is refused instead of computing a gradient
    for another pattern; untouched, the gradient is the dense masked reference's."""
    import torch.nn.functional as F
    from sparsetrain.engine.fused import sparse_conv_bn_relu
    g = torch.Generator().manual_seed(4)
    amp_ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp else contextlib.nullcontext
    for kind in ("linear", "conv", "fused"):
        shape = (6, 8) if kind == "linear" else (4, 3, 3, 3)
        w, m = torch.randn(shape, generator=g), random_mask(shape, 0.5, generator=g)
        x = torch.randn((2, 8) if kind == "linear" else (2, 3, 5, 5), generator=g)
        make = (lambda mk: SparseLinear.from_dense(nn.Linear(8, 6, bias=False), mk)) if kind == "linear" else (
            lambda mk: SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, padding=1, bias=False), mk))
        layer, bn = make(m), nn.BatchNorm2d(4)
        with torch.no_grad():
            layer.weight.values.copy_(w[m])
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        others = (make(m.flip(0)).state_dict(), make(random_mask(shape, 0.8, generator=g)).state_dict())
        for change in (None, *others, "shrink"):
            layer.load_state_dict(state)
            layer.weight.values.grad, xi, bn.weight.grad = None, x.clone().requires_grad_(True), None
            with amp_ctx():
                out = sparse_conv_bn_relu(xi, layer, bn)[0] if kind == "fused" else layer(xi)
            if change == "shrink":
                layer.weight.shrink_(torch.arange(layer.weight.nnz) % 2 == 0)
            elif change is not None:
                layer.load_state_dict(change)
            if change is not None:
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    out.float().sum().backward()
                continue
            wr, xr = w.clone().requires_grad_(True), x.clone().requires_grad_(True)
            ref = dense_linear(xr, wr, m) if kind == "linear" else dense_conv2d(xr, wr, m, padding=1)
            ref = F.batch_norm(ref, None, None, bn.weight, bn.bias, training=True) if kind == "fused" else ref
            (out.float() * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
            (ref * torch.arange(ref.numel()).reshape(ref.shape)).sum().backward()
            torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(layer.weight.values.grad, wr.grad[m], rtol=1e-4, atol=1e-3)


def test_amp_args_casts_only_the_activation_of_fp32_layers():
    x, vals = torch.randn(2, 3), torch.randn(4)
    args = (x, torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int32), vals)
    out = ops.amp_args(args, torch.bfloat16)
    assert out[0].dtype == torch.bfloat16 and out[3] is vals and out[1] is args[1]
    f64 = (x.double(), *args[1:3], vals.double())
    assert ops.amp_args(f64, torch.bfloat16)[0].dtype == torch.float64  # fp64 layers stay fp64


@pytest.mark.parametrize("amp,scaled", [(torch.bfloat16, False), (torch.bfloat16, True)])
def test_train_epoch_under_autocast_follows_fp32(amp, scaled):
    """An epoch of a dense -> sparse model under bf16 autocast (with a GradScaler as fp16 uses)
    keeps fp32 parameters and lands close to the fp32 epoch."""
    def run(amp, scaler):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), _sparse_linear(32, 3, 0.7))
        hp = Hyper(epochs=1, batch_size=16, lr=0.05, milestones=(), weight_decay=0.0, rewind_iter=0, momentum=0.9,
                   drop=0.1)
        opt, _ = make_optimizer(model, hp)
        out = train_epoch(model, tiny_split(), opt, 16, epoch=0, seed=0, masks={}, amp=amp, scaler=scaler)
        return out, model
    ref, m_ref = run(None, None)
    got, m = run(amp, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if scaled else None)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert got["loss"] == pytest.approx(ref["loss"], rel=0.02)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0.05, atol=0.02)


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    for spec in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"--amp {spec} needs a CUDA device"):
            resolve_amp(spec, cpu)


def test_amp_auto_leaves_the_run_name_alone():
    """--amp auto follows the device (as --device, not in the run's identity: older runs keep their
    directories); an explicit --amp names another run."""
    cfg = Config(dataset="mnist")
    assert "amp" not in result_settings(cfg)
    assert run_dir_of(dataclasses.replace(cfg, amp="off")) != run_dir_of(cfg)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the interpreter runs cover the kernels")
def test_cuda_autocast_bf16_sparse_layer():
    layer = _sparse_linear(64, 32, 0.9).cuda()
    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = nn.functional.linear(x.detach().bfloat16().float(), layer.weight.to_dense(), layer.bias.detach())
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
