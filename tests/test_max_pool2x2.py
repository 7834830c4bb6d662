"""max_pool2x2 (csrc/cpu/max_pool2x2.cpp) and MaxPool2x2 against F.max_pool2d(x, 2): outputs and
input gradients, odd sizes, ties, NaN, empty maps; opcheck and gradcheck."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain
from sparsetrain.engine.fuse import fuse_, unfuse_
from sparsetrain.engine.fused import MaxPool2x2, SparseConvBNReLU
from sparsetrain.experiment.models import vgg_like
from sparsetrain.testing import model_masks, random_mask, zero_pruned_


def _both(x):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = MaxPool2x2(2)(xa), F.max_pool2d(xb, 2)
    g = torch.randn_like(ref)
    ours.backward(g)
    ref.backward(g)
    return ours, ref, xa.grad, xb.grad


# even maps of 1, 2, 4, 8, 16 output columns (the fixed-width row pairs), wider, odd and ragged ones
# (planes of 8-column blocks and a tail), empty
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 1, 5, 7), (3, 2, 2, 2), (1, 1, 3, 2), (0, 3, 4, 4), (2, 3, 4, 4),
                                   (2, 3, 16, 16), (2, 2, 32, 32), (1, 2, 48, 48), (1, 2, 40, 38), (1, 1, 6, 20),
                                   (1, 1, 5, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_max_pool2d(shape, dtype):
    ours, ref, ga, gb = _both(torch.randn(shape, dtype=dtype))
    assert torch.equal(ours, ref) and torch.equal(ga, gb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_channels_last_input_gives_a_channels_last_output(dtype):
    """F.max_pool2d keeps a channels_last input's layout; the kernel writes NCHW: before 2026-12-06 the same
    values came out NCHW-contiguous (a layout change for the channels_last layers after it). The input
    gradient matches in values (a leaf's .grad follows its layout)."""
    x = torch.randn(2, 3, 8, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
    ours, ref, ga, gb = _both(x)
    assert torch.equal(ours, ref) and torch.equal(ga, gb)
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()
    assert ref.stride() == ours.stride()
    plain, _, _, _ = _both(torch.randn(2, 3, 8, 6, dtype=dtype))  # (NCHW stays NCHW)
    assert plain.is_contiguous()


@pytest.mark.parametrize("side", [6, 4, 32, 20])  # every kernel path: plane rows, fixed-width pairs, 8-blocks
def test_ties_and_nan_as_pytorch(side):
    x = torch.zeros(2, 3, side, side)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = 1.0  # a tie between two positions of one window
    x[1, 1, 2, 2] = float("nan")
    x[1, 1, 3, 3] = float("nan")  # two NaN in one window: the last one wins
    x[1, 2, 2, 3] = float("-inf")
    ours, ref, ga, gb = _both(x)
    assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.nan_to_num(), ref.nan_to_num())
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("shape", [(3, 5, 32, 32), (2, 3, 7, 9), (4, 6, 2, 2), (2, 3, 4, 4), (3, 4, 6, 10),
                                   (5, 2, 3, 3), (2, 3, 16, 16), (0, 3, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pools_a_normalised_input_as_bn_act_then_pool(shape, dtype):
    """in_mean/in_scale/in_shift (a fused layer's BatchNorm): the pool of bn_act's output, bit for bit, with its
    window positions; every kernel path (fixed-width pairs, plane rows; bn_act's planes and rows)."""
    g = torch.Generator().manual_seed(shape[2] * 13 + shape[3])
    y = torch.randn(shape, generator=g, dtype=dtype)
    c = shape[1]
    sc, sh = torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.randn(c, generator=g, dtype=dtype)
    mu = torch.randn(c, generator=g, dtype=torch.float64)
    for relu in (False, True):
        ref, ref_idx = torch.ops.sparsetrain.max_pool2x2(torch.ops.sparsetrain.bn_act(y, mu, sc, sh, None, relu))
        out, idx = torch.ops.sparsetrain.max_pool2x2(y, mu, sc, sh, relu)
        assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
        act = (y - mu.to(dtype)[:, None, None]) * sc[:, None, None] + sh[:, None, None]
        torch.testing.assert_close(out, F.max_pool2d(F.relu(act) if relu else act, 2))  # (to rounding)


def test_normalised_pooling_checks_and_refuses_autograd():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    sc, sh, mu = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sparsetrain.max_pool2x2.default, (x, mu, sc, sh, True))
    for args in ((mu, sc, None), (None, sc, sh)):
        with pytest.raises(ValueError, match="in_mean, in_scale and in_shift must be given together"):
            torch.ops.sparsetrain.max_pool2x2(x, *args)
    with pytest.raises(ValueError, match="in_scale must have shape \\[3\\]"):
        torch.ops.sparsetrain.max_pool2x2(x, mu, sc[:2], sh)
    with pytest.raises(TypeError, match="in_shift must have dtype Float, got Double"):
        torch.ops.sparsetrain.max_pool2x2(x.float(), mu, sc.float(), sh.double())
    with pytest.raises(TypeError, match="in_mean must have dtype Double"):
        torch.ops.sparsetrain.max_pool2x2(x, mu.float(), sc, sh)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.ops.sparsetrain.max_pool2x2(x.requires_grad_(), mu, sc, sh)


def test_opcheck_gradcheck_and_errors():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsetrain.max_pool2x2.default, (x.detach(),))
    out, idx = torch.ops.sparsetrain.max_pool2x2(x.detach())
    torch.library.opcheck(torch.ops.sparsetrain.max_pool2x2_backward.default, (torch.randn_like(out), idx, [5, 4]))
    assert torch.autograd.gradcheck(lambda t: torch.ops.sparsetrain.max_pool2x2(t)[0], (x,))
    with pytest.raises(ValueError, match="at least 2x2"):  # (nn.MaxPool2d(2) refuses it too)
        MaxPool2x2(2)(torch.randn(2, 4, 1, 6))
    with pytest.raises(ValueError, match="x must be 4-D"):
        torch.ops.sparsetrain.max_pool2x2(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="does not pool 2x2"):
        torch.ops.sparsetrain.max_pool2x2_backward(torch.randn_like(out), idx, [9, 4])
    bad = idx.clone()
    bad[1, 2, 1, 0] = 4  # not a position in a 2x2 window: an error, not a silently zero gradient
    with pytest.raises(ValueError, match=r"window positions \(0 to 3\)"):
        torch.ops.sparsetrain.max_pool2x2_backward(torch.randn_like(out), bad, [5, 4])


def test_fuse_swaps_the_pools_of_a_fused_model():
    model = vgg_like(2, 2, 10, 3)
    ref = vgg_like(2, 2, 10, 3)
    ref.load_state_dict(model.state_dict())
    masks = {n: random_mask(m.weight.shape, 0.5, generator=torch.Generator().manual_seed(0))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    sparsetrain.sparsify_(model, masks, fuse=True)
    assert isinstance(model.pool1, MaxPool2x2) and isinstance(model.pool2, MaxPool2x2)
    zero_pruned_(ref, masks)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    unfuse_(model)
    assert type(model.pool1) is nn.MaxPool2d
    plain = nn.Sequential(nn.MaxPool2d(3), nn.MaxPool2d(2, padding=1))
    fuse_(plain)  # nothing fused: the pools stay
    assert [type(m) for m in plain] == [nn.MaxPool2d, nn.MaxPool2d]


def _steps(model, x, t, n=3):
    """n SGD steps: the losses and the final parameters."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(n):
        loss = F.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("order", ["relu_bn", "bn_relu"])  # VGG-like's conv -> ReLU -> BN, and conv -> BN -> ReLU
def test_fused_layer_pools_in_its_batchnorm_pass(order):
    """fuse_ links a fused layer to the 2x2 pool that alone reads its activation (layer.pools): the
    BN's pass writes only the pooled output (max_pool2x2 with in_mean/in_scale/in_shift), bit for bit the
    steps of the same model pooling separately, and close to the dense masked model."""
    def make():
        torch.manual_seed(0)
        if order == "relu_bn":
            return vgg_like(2, 2, 10, 3, image_size=16)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(5 * 4 * 4, 10))
    model, ref = make(), make()
    masks = model_masks(model, 0.6, seed=1)
    with torch.no_grad():
        for n, mk in masks.items():
            ref.get_submodule(n).weight.mul_(mk)
            ref.get_submodule(n).weight.register_hook(lambda g, mk=mk: g * mk)  # (pruned weights stay 0)
    sparsetrain.sparsify_(model, masks, fuse=True)
    pooling = [m for m in model.modules() if isinstance(m, SparseConvBNReLU) and m.pools is not None]
    assert len(pooling) == 2 and all(isinstance(m.pools, MaxPool2x2) for m in pooling)
    separate = copy.deepcopy(model)
    for m in separate.modules():
        if isinstance(m, SparseConvBNReLU):
            object.__setattr__(m, "pools", None)
    x, t = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    got, sep, dense = _steps(model, x, t), _steps(separate, x, t), _steps(ref, x, t)
    assert got[0] == sep[0] and all(torch.equal(a, b) for a, b in zip(got[1], sep[1]))
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(dense[0]), rtol=1e-4, atol=1e-4)
    model.eval(), separate.eval()
    with torch.no_grad():
        assert torch.equal(model(x), separate(x))
    # a hook on the pool sees the real activation: the layer does not pool then
    seen = []
    pooling[0].pools.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    model.train()
    out = model(x)
    assert seen and seen[0].shape[-1] == 16 and (seen[0] >= 0).all() == (order == "bn_relu")
    separate.train()
    torch.testing.assert_close(out, separate(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="MaxPool2x2 was called on a tensor its fused layer did not hand it"):
        pooling[1].pools._pending = (torch.zeros(1), torch.zeros(1))
        pooling[1].pools(torch.zeros(1, 1, 2, 2))
    unfuse_(model)
    assert not any(isinstance(m, (SparseConvBNReLU, MaxPool2x2)) for m in model.modules())
