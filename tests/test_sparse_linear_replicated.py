"""sparse_linear_replicated and the fused classifier head (engine/replicated.py) against the dense
masked reference on the repeated input, and the fused VGG head against the unfused one."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain
import sparsetrain.engine.replicated as rep
from sparsetrain.engine.fuse import fuse_, unfuse_
from sparsetrain.engine.replicated import (FusedAdaptiveAvgPool2d, FusedFlatten, FusedSparseLinear,
                                           sparse_linear_replicated)
from sparsetrain.experiment.models import vgg_like
from sparsetrain.nn import SparseLinear
from sparsetrain.testing import assert_layer_matches, dense_linear_replicated, model_masks, random_mask, zero_pruned_


class _Replicated(nn.Module):
    """sparse_linear_replicated as a layer, for assert_layer_matches."""

    def __init__(self, layer: SparseLinear, repeat: int):
        super().__init__()
        self.weight, self.bias, self.repeat = layer.weight, layer.bias, repeat

    def forward(self, x):
        return sparse_linear_replicated(x, self.weight, self.bias, self.repeat)


# (batch shape, channels, repeat, out): 1 channel, primes, batch 1, no replication, 3-D input, VGG's 49
SHAPES = [((1,), 1, 1, 1), ((5,), 7, 3, 11), ((1,), 13, 49, 2), ((2, 3), 5, 4, 3), ((9,), 17, 49, 10),
          ((4,), 3, 1, 5)]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("batch, c, r, fout", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_dense_masked_on_the_repeated_input(batch, c, r, fout, sparsity, dtype):
    g = torch.Generator().manual_seed(c * 100 + r)
    lin = nn.Linear(c * r, fout).to(dtype)
    mask = random_mask((fout, c * r), sparsity, generator=g, empty_rows=1 if fout > 2 else 0)
    x = torch.randn(*batch, c, generator=g, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert_layer_matches(_Replicated(SparseLinear.from_dense(lin, mask), r), lin, mask, dense_linear_replicated, x,
                         g, tol, repeat=r)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    layer = _Replicated(SparseLinear.from_dense(nn.Linear(5 * 3, 4).double(), random_mask((4, 15), 0.5, generator=g)), 3)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    values, bias = layer.weight.values.detach().clone(), layer.bias.detach().clone()
    fn = lambda x, v, b: torch.func.functional_call(layer, {"weight.values": v, "bias": b}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values.requires_grad_(), bias.requires_grad_()))


def test_errors_name_the_argument():
    layer = SparseLinear.from_dense(nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"x must have last dimension in_features / repeat = 12 / 4.*\(3, 5\)"):
        sparse_linear_replicated(torch.randn(3, 5), layer.weight, None, 4)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="repeat must be an int >= 1"):
            sparse_linear_replicated(torch.randn(3, 6), layer.weight, None, bad)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sparse_linear_replicated([[1.0] * 6], layer.weight, None, 2)
    with pytest.raises(TypeError, match="weight must be a 2-D sparsetrain.CSR"):
        sparse_linear_replicated(torch.randn(3, 6), torch.randn(2, 12), None, 2)
    for bad in (torch.randn(1), torch.randn(2, 1)):  # (a [1] bias would broadcast silently)
        with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
            sparse_linear_replicated(torch.randn(3, 6), layer.weight, bad, 2)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None, got float"):
        sparse_linear_replicated(torch.randn(3, 6), layer.weight, 1.0, 2)
    # (torch's "expected m1 and m2 to have the same dtype" from inside F.linear before)
    for x in (torch.randn(3, 6, dtype=torch.float64), torch.ones(3, 6, dtype=torch.long)):
        with pytest.raises(TypeError, match=rf"^x must have the weight's dtype and device \(torch.float32, cpu\), got "
                                            rf"{x.dtype}, cpu$"):
            sparse_linear_replicated(x, layer.weight, None, 2)
    with pytest.raises(TypeError, match=r"^bias must have the weight's dtype and device \(torch.float32, cpu\), got "
                                        r"torch.float64, cpu$"):
        sparse_linear_replicated(torch.randn(3, 6), layer.weight, torch.zeros(2, dtype=torch.float64), 2)


# ============================================================================ the fused VGG head
def _vgg_pair(image_size=32, sparsity=0.9, dtype=torch.float64):
    torch.manual_seed(0)
    m = vgg_like(5, 1, 10, 3, image_size=image_size).to(dtype)
    masks = model_masks(m, sparsity)
    plain, fused = copy.deepcopy(m), copy.deepcopy(m)
    sparsetrain.sparsify_(plain, masks)
    sparsetrain.sparsify_(fused, masks, fuse=True)
    return plain, fused


def _step(model, x, t):
    for p in model.parameters():
        p.grad = None
    out = model(x)
    F.cross_entropy(out, t).backward()
    return out.detach()


@pytest.mark.parametrize("hw, replicated", [(32, True), (64, False)])  # a 1x1 map at 32x32; 2x2 at 64x64
@pytest.mark.parametrize("training", [True, False])
def test_fused_vgg_head_matches_the_unfused_one(hw, replicated, training, monkeypatch):
    plain, fused = _vgg_pair(hw)
    assert "classifier" in fuse_(copy.deepcopy(plain))  # fuse_ names the fused head's linear
    assert (type(fused.avgpool), type(fused.flatten), type(fused.classifier)) == \
        (FusedAdaptiveAvgPool2d, FusedFlatten, FusedSparseLinear)
    assert fused.classifier.weight is not plain.classifier.weight and \
        fused.state_dict().keys() == plain.state_dict().keys()
    plain.train(training), fused.train(training)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 3, hw, hw, generator=g, dtype=torch.float64), torch.randint(0, 10, (3,), generator=g)
    calls = []
    real = rep.sparse_linear_replicated
    monkeypatch.setattr(rep, "sparse_linear_replicated", lambda *a: calls.append(a[3]) or real(*a))
    out_f = _step(fused, x, t)
    assert calls == ([49] if replicated else [])
    torch.testing.assert_close(out_f, _step(plain, x, t), rtol=1e-10, atol=1e-10)
    for (n, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize("training", [True, False])
def test_a_fused_head_runs_on_meta_tensors_and_fake_tensors(training):
    """Shapes without data: the fused head on the meta device (its autocast check refused the meta
    device type) and under FakeTensorMode without a ShapeEnv (the CSR's row index had a
    data-dependent size): the unfused model's output shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    plain, fused = _vgg_pair(32)
    assert type(fused.classifier) is FusedSparseLinear
    meta = copy.deepcopy(fused).to("meta").train(training)
    assert meta(torch.randn(2, 3, 32, 32, device="meta", dtype=torch.float64)).shape == (2, 10)
    fused.train(training)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert fused(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 10)


def test_hooks_see_the_real_tensors_and_unfuse_restores_the_modules():
    plain, fused = _vgg_pair()
    pool, bias, values = fused.avgpool, fused.classifier.bias, fused.classifier.weight.values
    assert pool.original is not None and type(plain.avgpool) is type(pool.original)
    x, t = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7])
    seen = []
    h = fused.flatten.register_forward_hook(lambda m, inp, out: seen.append(out.shape))
    torch.testing.assert_close(_step(fused, x, t), _step(plain, x, t), rtol=1e-10, atol=1e-10)
    assert seen == [(2, 32 * 49)]  # the flattened [N, C * 49] tensor, as unfused
    h.remove()
    _step(fused, x, t)
    assert fused.classifier._pending is None and fused.flatten._pending is None  # handed over once
    fused.eval()
    unfuse_(fused)
    assert fused.avgpool is pool.original and type(fused.flatten) is nn.Flatten
    assert not any(m.training for m in fused.modules())  # (the restored pool too)
    fused.train()
    assert type(fused.classifier) is SparseLinear and fused.classifier.bias is bias
    assert fused.classifier.weight.values is values
    torch.testing.assert_close(_step(fused, x, t), _step(plain, x, t), rtol=1e-10, atol=1e-10)


def test_other_heads_are_left_alone():
    class TwoReaders(nn.Module):  # the flattened map also goes elsewhere
        def __init__(self):
            super().__init__()
            self.pool, self.flat, self.fc = nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)

        def forward(self, x):
            f = self.flat(self.pool(x))
            return self.fc(f) + f.sum()

    class FlattenAll(nn.Module):  # nn.Flatten(0): not the batch-preserving flatten
        def __init__(self):
            super().__init__()
            self.pool, self.flat, self.fc = nn.AdaptiveAvgPool2d(2), nn.Flatten(0), nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(self.flat(self.pool(x)))

    for cls in (TwoReaders, FlattenAll):
        m = cls()
        sparsetrain.sparsify_(m, model_masks(m, 0.5))
        assert fuse_(m) == [] and type(m.fc) is SparseLinear and type(m.flat) is nn.Flatten, cls.__name__
    plain_pool = nn.Sequential(nn.AdaptiveAvgPool2d((2, None)), nn.Flatten(), nn.Linear(3 * 2 * 1, 4))
    sparsetrain.sparsify_(plain_pool, model_masks(plain_pool, 0.5))
    ref = copy.deepcopy(plain_pool)
    assert fuse_(plain_pool) == ["2"]  # a torch.nn pool is matched too; (2, None) keeps the width
    x = torch.randn(2, 3, 1, 1, requires_grad=True)
    torch.testing.assert_close(plain_pool(x), ref(x))


class _FlattenHead(nn.Module):
    """AdaptiveAvgPool2d(size) -> a flatten of `how` -> Linear, as torchvision's VGG ("function")."""

    def __init__(self, how: str, size=7, c=3):
        super().__init__()
        out = size * size if isinstance(size, int) else size[0] * size[1]
        self.how, self.pool, self.fc = how, nn.AdaptiveAvgPool2d(size), nn.Linear(c * out, 4)

    def forward(self, x):
        p = self.pool(x)
        f = {"function": lambda: torch.flatten(p, 1), "method": lambda: p.flatten(1),
             "view": lambda: p.reshape(p.shape[0], -1).contiguous()}[self.how]()
        return self.fc(f)


@pytest.mark.parametrize("how, swapped", [("function", True), ("method", True), ("view", False)])
def test_a_pool_read_by_torch_flatten_is_swapped_alone(how, swapped):
    """torchvision's VGG head (pool -> torch.flatten -> linear): fuse_ swaps the pool alone (its 1x1
    case becomes the broadcast, which the flatten copies); other readers keep PyTorch's pool."""
    torch.manual_seed(0)
    m = _FlattenHead(how).double()
    sparsetrain.sparsify_(m, model_masks(m, 0.5))
    ref = copy.deepcopy(m)
    assert fuse_(m) == [] and type(m.fc) is SparseLinear
    assert isinstance(m.pool, FusedAdaptiveAvgPool2d) == swapped
    for hw in (1, 5):  # the broadcast, and PyTorch's pool on a larger map
        x = torch.randn(2, 3, hw, hw, dtype=torch.float64)
        xs = [x.clone().requires_grad_(True) for _ in "ab"]
        outs = [mod(v) for mod, v in zip((m, ref), xs)]
        for o in outs:
            o.sum().backward()
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-12, atol=1e-12)
    unfuse_(m)
    assert type(m.pool) is nn.AdaptiveAvgPool2d


def test_a_one_by_one_output_is_never_the_input_itself():
    """AdaptiveAvgPool2d(1) on a 1x1 map: the fused pool returns PyTorch's fresh tensor, not x (an
    in-place op downstream would write into the conv's output)."""
    m = _FlattenHead("function", size=1)
    sparsetrain.sparsify_(m, model_masks(m, 0.5))
    fuse_(m)
    x = torch.randn(2, 3, 1, 1)
    assert isinstance(m.pool, FusedAdaptiveAvgPool2d) and m.pool(x).data_ptr() != x.data_ptr()


# ============================================================================ the head's modules used otherwise
def test_the_head_modules_return_the_real_tensors_to_any_reader():
    """Feature extraction (the model's modules up to its classifier, then the classifier or a probe on
    a modified copy): the pool returns a fresh contiguous tensor and the flatten its [N, C * 49]
    view, as unfused; only the linear called on that very view takes the [N, C] map."""
    plain, fused = _vgg_pair()
    plain.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    feats = [nn.Sequential(*list(m.children())[:-1])(x) for m in (plain, fused)]
    assert feats[1].shape == (2, 32 * 49) and feats[1].is_contiguous()
    torch.testing.assert_close(feats[1], feats[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.classifier(feats[1] * 2), plain.classifier(feats[0] * 2), rtol=1e-10, atol=1e-10)
    pooled = [m.avgpool(m[:-3](x)) for m in (plain, fused)]  # written in place by its reader
    assert pooled[1].is_contiguous()
    torch.testing.assert_close(pooled[1].mul_(3), pooled[0].mul_(3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ["avgpool", "flatten", "classifier"])
def test_a_full_backward_hook_on_the_head(where):
    """A full backward hook wraps the module's input in a new tensor: the head runs unfused there,
    with the same outputs, gradients and hook arguments."""
    plain, fused = _vgg_pair()
    seen = {}
    for name, m in (("plain", plain), ("fused", fused)):
        getattr(m, where).register_full_backward_hook(lambda mod, gi, go, name=name: seen.update({name: go[0]}))
    x, t = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7])
    torch.testing.assert_close(_step(fused, x, t), _step(plain, x, t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(seen["fused"], seen["plain"], rtol=1e-10, atol=1e-10)
    for (n, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-10, msg=n)


def test_autocast_and_a_list_output_size():
    """Under CPU autocast the fused head runs as SparseLinear (fp32 products, fp32 out); an output
    size given as a list is a size like a tuple."""
    plain, fused = _vgg_pair(dtype=torch.float32)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = plain(x), fused(x)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    m = nn.Sequential(nn.AdaptiveAvgPool2d([7, 7]), nn.Flatten(), nn.Linear(3 * 49, 4)).double()
    sparsetrain.sparsify_(m, model_masks(m, 0.5))
    ref = copy.deepcopy(m)
    assert fuse_(m) == ["2"]
    x = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-12, atol=1e-12)


def test_a_pool_subclass_keeps_its_forward():
    """Only nn.AdaptiveAvgPool2d itself (and BroadcastAvgPool2d, the same pool) is swapped: a
    subclass's forward may compute something else."""
    class Positive(nn.AdaptiveAvgPool2d):
        def forward(self, x):
            return super().forward(x.clamp(min=0)) * 2

    for tail in (lambda: [nn.Flatten(), nn.Linear(3 * 49, 4)], lambda: []):
        m = nn.Sequential(Positive(7), *tail())
        sparsetrain.sparsify_(m, model_masks(m, 0.5))
        assert fuse_(m) == [] and type(m[0]) is Positive


@pytest.mark.parametrize("start, c", [(2, 3), (1, 1)])
def test_a_flattened_pool_output_written_in_place(start, c):
    """torch.flatten of the pool's output that keeps a broadcast dim (start_dim 2, or one channel)
    would be a stride-0 view of a broadcast; the pool returns a fresh tensor, so an in-place op
    on the flatten works as unfused."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(7)

        def forward(self, x):
            f = torch.flatten(self.pool(x), start)
            return f.mul_(2).square().sum()

    m = Head()
    ref = copy.deepcopy(m)
    fuse_(m)
    assert isinstance(m.pool, FusedAdaptiveAvgPool2d)
    xs = [torch.randn(2, c, 1, 1, generator=torch.Generator().manual_seed(0)).requires_grad_() for _ in "ab"]
    outs = [mod(v) for mod, v in zip((m, ref), xs)]
    for o in outs:
        o.backward()
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(xs[0].grad, xs[1].grad)


@pytest.mark.parametrize("module", [rep.BroadcastAvgPool2d, lambda size: FusedAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d(size))])
def test_a_bad_output_size_is_refused_as_pytorchs_pool_refuses_it(module):
    """On a 1x1 map the broadcast took output size -1 as expand's "keep this size" ([N, C, 1, 7] for
    (-1, 7), where PyTorch's pool refuses it) and failed with torch's "integer multiplication overflow"
    or expand's errors for other bad sizes; each is now a ValueError naming output_size."""
    x = torch.randn(2, 3, 1, 1)
    for bad in ((-1, 7), (7, -2), (7, 7, 7), 7.5, "a", (True, 7)):
        with pytest.raises(ValueError, match=rf"^output_size must be an int >= 0 or a pair of them \(None: the "
                                             rf"input's size\), got {repr(bad).replace('(', '.').replace(')', '.')}$"):
            module(bad)(x)
    for good in (7, (0, 7), (None, 3), [2, 5], (np.int32(2), 3), torch.Size([2, 2])):
        torch.testing.assert_close(module(good)(x), F.adaptive_avg_pool2d(x, good), rtol=0, atol=0)


def test_the_fused_head_refuses_an_index_rewritten_in_place_as_sparse_linear_does():
    """FusedSparseLinear on a replicated [N, C, 1, 1] map runs sparse_linear_replicated, which read the CSR's
    index without the seal's check: an EMA of the buffers (AveragedModel(use_buffers=True), truncating
    0.9·a + 0.1·b) moved its weights silently there while SparseLinear's forward refused it. Refused by
    name on both paths; an EMA of the floats only gives the dense masked model's average."""
    from torch.optim.swa_utils import AveragedModel
    torch.manual_seed(5)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(3),
                          nn.Flatten(), nn.Linear(72, 10))
    masks = {"5": random_mask((10, 72), 0.5)}  # (the head alone: the conv's own check would answer first)
    zero_pruned_(dense, masks)
    model = copy.deepcopy(dense)
    sparsetrain.sparsify_(model, masks, fuse=True)
    assert isinstance(model[5], FusedSparseLinear)
    ema = lambda a, b, n: 0.9 * a + 0.1 * b  # noqa: E731
    floats_only = lambda a, b, n: ema(a, b, n) if a.is_floating_point() else b  # noqa: E731
    bad, good, ref = (AveragedModel(m, avg_fn=fn, use_buffers=True)
                      for m, fn in ((model, ema), (model, floats_only), (dense, ema)))
    for _ in range(2):
        for avg in (bad, good):
            avg.update_parameters(model)
        ref.update_parameters(dense)
    assert not torch.equal(bad.module[5].weight.col_indices, model[5].weight.col_indices)
    x = torch.randn(4, 3, 1, 1)  # (a 1x1 map: the pool's output is replicated, the head's fast path)
    for m in (bad, good, ref):
        m.eval()
    with pytest.raises(ValueError, match=r"CSR weight's index buffers .* were changed in place"):
        bad(x)
    torch.testing.assert_close(good(x), ref(x), rtol=1e-5, atol=1e-5)
