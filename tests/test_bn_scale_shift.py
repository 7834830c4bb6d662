"""bn_scale_shift (csrc/cpu/bn_scale_shift.cpp): a fused BatchNorm's constants from the per-channel
sums of its input, against nn.BatchNorm2d on that input (batch statistics, running statistics and
their update, momentum or the cumulative average, affine or not, eval mode)."""
import pytest
import torch
from torch import nn

from sparsetrain.testing import bn_stats

OP = torch.ops.sparsetrain.bn_scale_shift


def _sums(y):
    return bn_stats(y)


def _call(bn, y, batch_stats=True, running=True):
    buffers = (bn.running_mean, bn.running_var, bn.num_batches_tracked) if running else (None,) * 3
    return OP(_sums(y), y.numel() // y.shape[1], bn.weight, bn.bias, *buffers, bn.momentum, bn.eps, batch_stats,
              y.dtype)


def _bn(c, dtype, affine=True, momentum=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, affine=affine, momentum=momentum).to(dtype)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=dtype))
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
    return bn


def _centred(y, mean, scale, shift):
    """The map the kernels apply with the op's constants: (y - mean) scale + shift (csrc/cpu/bn_act.h's bn_pre)."""
    return (y - mean.to(y.dtype)[:, None, None]) * scale[:, None, None] + shift[:, None, None]


@pytest.mark.parametrize("shape", [(2, 1, 3, 3), (5, 7, 4, 3), (1, 3, 2, 1), (3, 4, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine, momentum", [(True, 0.1), (False, 0.3), (True, None)])
def test_matches_batchnorm_in_training(shape, dtype, affine, momentum):
    g = torch.Generator().manual_seed(1)
    ref = _bn(shape[1], dtype, affine, momentum)
    bn = _bn(shape[1], dtype, affine, momentum)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    for _ in range(3):  # the cumulative average (momentum None) counts the batches
        y = torch.randn(shape, generator=g, dtype=dtype) * 2 + 1
        mean, invstd, w, scale, shift = _call(bn, y)
        with torch.no_grad():
            out = ref.train()(y)
        assert (scale.dtype, shift.dtype, mean.dtype, w.dtype) == (dtype, dtype, torch.float64, torch.float64)
        torch.testing.assert_close(_centred(y, mean, scale, shift), out, **tol)
        torch.testing.assert_close(mean, y.double().mean((0, 2, 3)), **tol)
        var = y.double().var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(invstd, torch.rsqrt(var + bn.eps), **tol)
        torch.testing.assert_close(w, ref.weight.double() if affine else torch.ones(shape[1], dtype=torch.float64))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(bn, name), getattr(ref, name), **tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_statistics_in_eval_and_batch_statistics_without_update(dtype):
    bn, ref = _bn(5, dtype), _bn(5, dtype)
    y = torch.randn(3, 5, 4, 4, dtype=dtype)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    mean, invstd, _, scale, shift = _call(bn, y, batch_stats=False)
    with torch.no_grad():
        out = ref.eval()(y)
    torch.testing.assert_close(_centred(y, mean, scale, shift), out)
    torch.testing.assert_close(mean, bn.running_mean.double())
    mean, _, _, scale, shift = _call(bn, y, running=False)  # batch statistics, buffers left alone
    ref.track_running_stats = False
    with torch.no_grad():
        out = nn.functional.batch_norm(y, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
    torch.testing.assert_close(_centred(y, mean, scale, shift), out)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())


def test_a_constant_channel_has_zero_variance_not_negative():
    y = torch.full((4, 2, 3, 3), 1e4)
    bn = _bn(2, torch.float32)
    _, invstd, _, _, _ = _call(bn, y)
    torch.testing.assert_close(invstd, torch.full((2,), bn.eps ** -0.5, dtype=torch.float64))
    # (a centred sum taken as sum y^2 - (sum y)^2 / N, as the Triton op takes it, may round below zero)
    stats = torch.tensor([[3.6e5, 3.6e5], [-1e-6, 0.0]], dtype=torch.float64)
    _, invstd, _, _, _ = OP(stats, 36, None, None, None, None, None, 0.1, bn.eps, True, torch.float32)
    torch.testing.assert_close(invstd, torch.full((2,), bn.eps ** -0.5, dtype=torch.float64))


def bad_calls():
    """(good arguments, [(argument changes, message pattern, class)]): what bn_scale_shift refuses,
    each with the message and class both engines give (the C++ op's says "CPU tensor")."""
    bn = _bn(3, torch.float32)
    y = torch.randn(2, 3, 4, 4)
    args = (_sums(y), 32, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var,
            bn.num_batches_tracked, 0.1, 1e-5, True, torch.float32)
    V, T = ValueError, TypeError
    shared = torch.ones(5)
    return args, [
        ({0: _sums(y).float()}, "stats must be a float64 (CPU )?tensor \\[2, C\\]", T),
        ({0: _sums(y)[:1]}, "stats must be a float64 (CPU )?tensor \\[2, C\\]", V),
        ({2: torch.ones(4)}, "weight must be a 1-D floating (CPU )?tensor of 3 channels", V),
        ({2: torch.ones(3, dtype=torch.long)}, "weight must be a 1-D floating (CPU )?tensor of 3 channels", T),
        ({5: None}, "running_mean and running_var must be given together", V),
        ({1: 1}, "count must be >= 2 values per channel with batch statistics and a running update", V),
        ({7: None, 6: None}, "num_batches_tracked is needed when momentum is None", V),
        ({4: None, 5: None, 9: False}, "running_mean and running_var are needed without batch_stats", V),
        ({10: torch.float16}, "dtype must be float32 or float64", T),
        ({8: -1.0}, "eps must be >= 0", V),
        ({4: bn.running_mean.half(), 5: bn.running_var.half()}, "both be float32 or both float64, got Half", T),
        ({4: bn.running_mean.double()}, "both be float32 or both float64, got Double and Float", T),
        ({6: torch.zeros(3, dtype=torch.long)}, "num_batches_tracked must be a one-element int64 (CPU )?tensor", V),
        # (a float counter was accepted, a uint8 one wrapped at 255; one buffer twice corrupted both)
        ({6: torch.zeros(1)}, "num_batches_tracked must be a one-element int64 (CPU )?tensor .* Float", T),
        ({6: torch.zeros(1, dtype=torch.uint8)}, "num_batches_tracked must be .* Byte", T),
        ({5: bn.running_mean}, "running_mean and running_var must be two tensors", V),
        # (two views of one buffer: the variance update overwrote the new mean, silently)
        ({4: shared[:3], 5: shared[2:]}, "running_mean and running_var must not share memory", V),
        # (checked before the first write: the mean and the counter were updated before this failed)
        ({5: torch.ones(4)}, "running_var must be a 1-D floating (CPU )?tensor of 3 channels", V)]


def refuses_untouched(op, args, cases):
    """op refuses each case with its class and message and leaves the running buffers as they were."""
    for change, msg, cls in cases:
        a = list(args)
        for i, v in change.items():
            a[i] = v
        kept = [t.clone() for t in a[4:7] if t is not None]
        with pytest.raises(cls, match=msg):
            op(*a)
        assert all(torch.equal(t, k) for t, k in zip([t for t in a[4:7] if t is not None], kept)), msg  # untouched


def test_opcheck_and_errors():
    args, cases = bad_calls()
    torch.library.opcheck(OP.default, args)
    w64 = args[2].double()  # (float64 weights: returned as a copy, never the input, as the schema says)
    torch.library.opcheck(OP.default, (*args[:2], w64, *args[3:]))
    assert OP(*args[:2], w64, *args[3:])[2].data_ptr() != w64.data_ptr()
    refuses_untouched(OP, args, cases)
