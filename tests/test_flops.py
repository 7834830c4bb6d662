"""sparsetrain.flops on small nets with hand-computed counts."""
import pytest
import torch
from torch import nn

from sparsetrain.experiment.flops import forward_flops, layer_nnz, training_flops
from sparsetrain.experiment.models import build_model
from sparsetrain.testing import zero_pruned_


def _net():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))


def test_hand_counted_small_net():
    # input 1x4x4. conv: 18 weights x 16 positions x 2 + 2 channels x 16 bias adds = 576 + 32
    # bn: 2 x 32 elements; relu: 32; maxpool 2x2: 3 comparisons x 8 outputs; linear: 2 x 24 + 3
    r = forward_flops(_net(), (1, 4, 4))
    assert r["per_layer"] == {"0": 608, "1": 64, "2": 32, "3": 24, "5": 51}
    assert r["weights"] == 659 and r["elementwise"] == 120 and r["total"] == 779
    assert forward_flops(_net(), (1, 4, 4), elementwise=False)["total"] == 659


def test_masks_and_zero_weights_scale_with_nonzeros():
    net = _net()
    mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1] = True  # 3 nonzeros
    lin_mask = torch.zeros(3, 8, dtype=torch.bool)
    lin_mask[:, 0] = True
    r = forward_flops(net, (1, 4, 4), masks={"0": mask, "5.weight": lin_mask})
    assert r["per_layer"]["0"] == 2 * 3 * 16 + 32 and r["per_layer"]["5"] == 2 * 3 + 3
    zero_pruned_(net, {"0": mask})  # a dense-masked engine with the pruned weights set to zero
    assert forward_flops(net, (1, 4, 4))["per_layer"]["0"] == 2 * 3 * 16 + 32
    # each refusal names the key (a float or mis-shaped mask named none; one on a BatchNorm was ignored)
    with pytest.raises(ValueError, match=r"masks\['0'\] must be a bool tensor of shape \(2, 1, 3, 3\), got torch.bool \(3, 8\)"):
        forward_flops(net, (1, 4, 4), masks={"0": lin_mask})
    for bad, got in ((lin_mask.float(), r"torch.float32 \(3, 8\)"), (lin_mask.numpy(), "ndarray")):  # (a wrong type:
        with pytest.raises(TypeError, match=rf"masks\['5.weight'\] must be a bool tensor of shape \(3, 8\), got {got}"):
            forward_flops(net, (1, 4, 4), masks={"5.weight": bad})  # a ValueError before 2026-12-06)
    with pytest.raises(KeyError, match=r"masks\['nope'\] names no module"):
        forward_flops(net, (1, 4, 4), masks={"nope": mask})
    with pytest.raises(KeyError, match=r"masks\['1'\]: '1' is a BatchNorm2d, not a conv or linear layer"):
        forward_flops(net, (1, 4, 4), masks={"1": torch.ones(2, dtype=torch.bool)})


def test_a_weight_key_names_a_sparse_layer_too():
    """"name.weight" keys a sparse layer as it keys a dense one (there fc.weight is itself a module,
    the CSR, which the key check took for the masked module)."""
    import sparsetrain
    net = _net()
    mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1] = True
    sparsetrain.sparsify_(net, {"0": mask})
    assert forward_flops(net, (1, 4, 4), masks={"0.weight": mask})["per_layer"]["0"] == 2 * 3 * 16 + 32


def test_sparse_layers_by_nnz():
    from sparsetrain.nn import SparseLinear

    lin = nn.Linear(8, 4)
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) < 0.3
    sp = SparseLinear.from_dense(lin, mask)
    net = nn.Sequential(nn.Flatten(), sp)
    r = forward_flops(net, (2, 4))
    assert r["per_layer"] == {"1": 2 * int(mask.sum()) + 4}  # the CSR child is not counted again
    assert layer_nnz(sp) == int(mask.sum())

    class FakeSparseConv(nn.Module):  # duck type of SparseConv2d: .nnz plus conv attributes
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
            self.kernel_size, self.stride, self.padding, self.nnz = (3, 3), (2, 2), (1, 1), 7

        def forward(self, x):
            return self.conv(x)

    r = forward_flops(nn.Sequential(FakeSparseConv()), (3, 8, 8))
    assert r["per_layer"] == {"0": 2 * 7 * 16}  # output 5x4x4, no bias
    # the layer as the model itself: its inner conv was counted again (a dense 3x3x3x5 at 16 positions)
    assert forward_flops(FakeSparseConv(), (3, 8, 8))["per_layer"] == {"": 2 * 7 * 16}


@pytest.mark.parametrize("name,shape", [("lenet300", (1, 28, 28)), ("vgg_d1g5", (3, 32, 32)),
                                        ("vgg_d2g5", (3, 32, 32)), ("resnet18", (3, 32, 32))])
def test_weighted_layers_match_torch_flop_counter(name, shape):
    """The conv/linear count against an independent one: torch.utils.flop_counter counts the
    aten mm/convolution calls (2 FLOPs per multiply-add). Biases are removed (torch does not count
    their adds) and every weight set nonzero (a dense layer counts its nonzeros)."""
    from torch.utils.flop_counter import FlopCounterMode
    m = build_model(name, 10, shape[0], shape[1]).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.fill_(0.5)
                mod.bias = None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(torch.zeros(1, *shape))
    ours = forward_flops(m, shape, elementwise=False)
    assert ours["weights"] == ours["total"] == counter.get_total_flops() > 0


@pytest.mark.parametrize("layer,shape", [(nn.ConvTranspose2d(3, 5, 3, stride=2, bias=False), (3, 6, 6)),
                                         (nn.ConvTranspose1d(4, 6, 3, stride=3, bias=False), (4, 7)),
                                         (nn.Conv2d(3, 6, 3, groups=3, bias=False), (3, 7, 5)),
                                         (nn.Conv1d(2, 4, 2, bias=False), (2, 9))])
def test_other_convs_match_torch_flop_counter(layer, shape):
    """A transposed conv multiplies every weight at each input position (not output position)."""
    from torch.utils.flop_counter import FlopCounterMode
    m = nn.Sequential(layer).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(torch.zeros(1, *shape))
    assert forward_flops(m, shape)["weights"] == counter.get_total_flops() > 0


@pytest.mark.parametrize("kw", [{}, {"kdim": 6, "vdim": 5}])
def test_attention_projections_are_counted_by_hand(kw):
    """nn.MultiheadAttention reads its projections' weights in F.multi_head_attention_forward: its in_proj
    (a bare Parameter) and out_proj (a Linear never called) counted 0 before 2026-12-07. Hand count per
    projection: 2 * nonzeros * positions + the bias adds (q and out over the query's L positions, k and v
    over the key's S), out_proj's mask read as for any linear layer."""
    from sparsetrain.experiment.flops import dense_macs
    E, L, S = 8, 7, 3
    kdim, vdim = kw.get("kdim", E), kw.get("vdim", E)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(E, 2, **kw)

        def forward(self, x):  # (one flat sample: query, key and value side by side; called by keyword)
            q, k, v = x.split([L * E, S * kdim, S * vdim], dim=1)
            return self.att(query=q.reshape(L, 1, E), key=k.reshape(S, 1, kdim), value=v.reshape(S, 1, vdim),
                            need_weights=False)[0]
    m, shape = M(), (L * E + S * kdim + S * vdim,)
    att = m.att
    with torch.no_grad():
        (att.in_proj_weight if att._qkv_same_embed_dim else att.q_proj_weight)[:3].zero_()  # (3 rows of q pruned)
    mask = torch.rand(E, E) > 0.5
    r = forward_flops(m, shape, masks={"att.out_proj": mask}, elementwise=False)
    hand = ((2 * (E - 3) * E * L + E * L) + (2 * E * kdim * S + E * S) + (2 * E * vdim * S + E * S)
            + (2 * int(mask.sum()) * L + E * L))
    assert r["per_layer"] == {"att": hand} and r["total"] == hand
    assert dense_macs(m, shape) == E * E * L + E * kdim * S + E * vdim * S + E * E * L
    enc = nn.TransformerEncoderLayer(E, 2, dim_feedforward=12, batch_first=True)
    r = forward_flops(enc, (L, E), elementwise=False)["per_layer"]
    assert r == {"self_attn": 4 * (2 * E * E * L + E * L), "linear1": 2 * E * 12 * L + 12 * L,
                 "linear2": 2 * 12 * E * L + E * L}


def test_a_head_that_squeezes_the_batch_dim_away_is_counted():
    """The count runs one sample, where `fc(pool(x).squeeze())` drops the batch dim too: the linear counted
    1 // units = 0 positions and the ReLU after it 1 element before 2026-12-07 (the model at any batch > 1
    does the full work)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool = nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1)
            self.fc, self.act = nn.Linear(8, 10), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(self.pool(self.conv(x)).squeeze()))
    r = forward_flops(Net(), (3, 8, 8))["per_layer"]
    assert r == {"conv": 2 * 8 * 27 * 36 + 8 * 36, "pool": 8 * 36, "fc": 2 * 8 * 10 + 10, "act": 10}


def test_adaptive_pool_windows_hand_counted():
    # 16x16 -> 7x7 adaptive average pooling: window starts floor(i*16/7) = 0,2,4,6,9,11,13 and
    # ends ceil((i+1)*16/7) = 3,5,7,10,12,14,16, so sizes 3,3,3,4,3,3,3: 22 per dim, 22^2 = 484
    # summed window cells per channel
    r = forward_flops(nn.Sequential(nn.AdaptiveAvgPool2d(7)), (32, 16, 16))
    assert r["per_layer"]["0"] == 32 * 484


def test_resnet18_macs_match_known_value_and_mode_restored():
    m = build_model("resnet18", 10, 3, 32).train()
    m.bn1.eval()  # a frozen BatchNorm inside a training model keeps its mode
    r = forward_flops(m, (3, 32, 32))
    assert m.training and not m.bn1.training and m.layer1[0].bn1.training
    # the CIFAR ResNet-18 has 0.556 G multiply-adds in its conv and linear layers
    assert r["weights"] // 2 == pytest.approx(556e6, rel=0.002)


def test_training_flops():
    assert training_flops(100, 50, 2) == 30_000
    assert training_flops({"total": 10}, 3, 1, factor=1.0) == 30
    with pytest.raises(ValueError, match="n_samples"):
        training_flops(1, -1, 1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="epochs must be a finite non-negative number"):
            training_flops(1, 1, bad)


def test_paper_images_are_the_files_the_paper_trained_on():
    """The paper's count charges the whole CIFAR training file (its code trains on our validation
    share too: 45,000 + 5,000); Flowers-102's validation is an official split the paper's code never
    trains on (its 1,020 images were counted, doubling the column)."""
    from types import SimpleNamespace

    from sparsetrain.experiment.loop import paper_images
    for name, official, want in (("cifar10", False, 50_000), ("flowers102", True, 45_000)):
        splits = SimpleNamespace(name=name, train=range(45_000), val=range(5_000), test=range(10_000),
                                 official_val=official)
        assert paper_images(splits) == want, name


def test_pools_returning_indices_are_counted_as_without():
    """A pool with return_indices=True returns (values, indices): counted as the same pool without
    (the hook read .dim() of the tuple: AttributeError)."""
    for pool, twin in ((nn.MaxPool2d(2, return_indices=True), nn.MaxPool2d(2)),
                       (nn.AdaptiveMaxPool2d(3, return_indices=True), nn.AdaptiveMaxPool2d(3))):
        r = forward_flops(nn.Sequential(pool), (2, 6, 6))
        assert r["per_layer"] == forward_flops(nn.Sequential(twin), (2, 6, 6))["per_layer"]
    # by hand: 2 channels x 3x3 outputs x (4 - 1) comparisons (2x2 windows on 6x6, both pools)
    assert forward_flops(nn.Sequential(nn.MaxPool2d(2, return_indices=True)), (2, 6, 6))["total"] == 2 * 9 * 3


def test_input_shape_that_does_not_fit_names_input_shape():
    """A shape the model cannot take (channels, flattened size, a batch dim given) is a ValueError
    naming input_shape in every counter (torch's bare shape mismatch before; paper_macs checked no
    argument: AttributeError on a non-module, TypeError on an int shape)."""
    from sparsetrain.experiment.flops import dense_macs, paper_macs
    lenet, vgg = build_model("lenet300", 10, 1, 28), build_model("vgg_d1g5", 10, 3, 32)
    for fn in (forward_flops, dense_macs, paper_macs):
        with pytest.raises(ValueError, match=r"input_shape \(3, 32, 32\) does not fit the model.*mat1 and mat2"):
            fn(lenet, (3, 32, 32))
        with pytest.raises(ValueError, match=r"input_shape \(1, 3, 32, 32\) does not fit the model"):
            fn(vgg, (1, 3, 32, 32))
        for bad in (784, (0, 28), (True, 28, 28)):
            with pytest.raises(ValueError, match="input_shape must be a non-empty tuple of positive ints"):
                fn(lenet, bad)
        with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
            fn("lenet300", (1, 28, 28))
    # the refused pass left no hook behind and the mode as it was
    assert all(not m._forward_hooks for m in vgg.modules()) and vgg.training
    assert paper_macs(lenet, (1, 28, 28)) == dense_macs(lenet, (1, 28, 28)) == 784 * 300 + 300 * 100 + 100 * 10


def test_paper_convention_refuses_a_model_without_weighted_layers():
    """dense_macs / paper_macs / paper_round_flops count conv and linear weights only: a model with
    none was charged 0 FLOPs per round; forward_flops still counts such a model's elementwise work."""
    from sparsetrain.experiment.flops import dense_macs, paper_macs, paper_round_flops
    net = nn.Sequential(nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    for call in (lambda: dense_macs(net, (2, 4, 4)), lambda: paper_macs(net, (2, 4, 4)),
                 lambda: paper_round_flops(net, (2, 4, 4), 100, 1)):
        with pytest.raises(ValueError, match=r"model \(Sequential\) has no conv or linear layer"):
            call()
    # BN: 2 x 32 elements, ReLU: 32, pool: 16 adds x 2 channels
    assert forward_flops(net, (2, 4, 4)) == {"total": 128, "weights": 0, "elementwise": 128,
                                             "per_layer": {"0": 64, "1": 32, "2": 32}}
    with_conv = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), *net)
    assert dense_macs(with_conv, (2, 4, 4)) == 4 * 16  # 4 weights x 16 positions


def test_layer_nnz_checks_the_mask_of_a_sparse_layer_too():
    """A mis-shaped mask was refused for a dense layer only: a sparse layer's weight is a CSR (not a
    tensor) and the mask's True count came back. A module that is not a conv or linear layer (a
    BatchNorm: its scale's nonzeros came back; a ReLU: AttributeError) is a TypeError."""
    from sparsetrain.nn import SparseLinear
    lin = nn.Linear(8, 4)
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    sp = SparseLinear.from_dense(lin, mask)
    assert layer_nnz(sp, mask) == layer_nnz(lin, mask) == int(mask.sum())
    for layer in (lin, sp):
        with pytest.raises(ValueError, match=r"mask shape \(3, 3\) must equal the weight shape \(4, 8\)"):
            layer_nnz(layer, torch.ones(3, 3, dtype=torch.bool))
    for bad in (nn.BatchNorm2d(3), nn.ReLU()):
        with pytest.raises(TypeError, match=f"module must be a conv or linear layer.*got {type(bad).__name__}"):
            layer_nnz(bad)


def test_bsr_linear_counted_as_its_dense_masked_linear():
    """A BSRLinear (weight: a BSR, `.nnz` on the weight, not the layer) counts as the nn.Linear with its
    block mask applied: it was no weighted layer to the counter before (0 FLOPs, and dense_macs refused
    the model as having no conv or linear layer)."""
    from sparsetrain import BSRLinear
    from sparsetrain.experiment.flops import dense_macs

    lin = nn.Linear(40, 20)  # (20 x 40 in 16 x 16 blocks: the last block row and column are padded)
    mask = torch.zeros(20, 40, dtype=torch.bool)
    mask[:16, :16] = mask[16:, 32:] = True  # two blocks, one of them cut by the padding: 256 + 32 weights
    dense = nn.Sequential(nn.Flatten(), lin)
    ref = forward_flops(dense, (40,), masks={"1": mask})
    bsr = nn.Sequential(nn.Flatten(), BSRLinear.from_dense(lin, 16, mask))
    r = forward_flops(bsr, (40,))
    assert r == ref and r["per_layer"] == {"1": 2 * int(mask.sum()) + 20}
    assert layer_nnz(bsr[1]) == int(mask.sum())
    assert forward_flops(bsr, (40,), masks={"1.weight": mask}) == ref
    assert dense_macs(bsr, (40,)) == dense_macs(dense, (40,)) == 20 * 40


def _out(n, k, s=1, p=0):  # conv / pool output length
    return (n + 2 * p - k) // s + 1


def _adaptive(n_in, n_out):  # summed window lengths of an adaptive pool along one dim
    import math
    return sum(math.ceil((i + 1) * n_in / n_out) - math.floor(i * n_in / n_out) for i in range(n_out))


def _hand_lenet(nnz):
    # fc: 2 per kept weight + 1 per bias; ReLU: 1 per element
    return 2 * nnz["fc1"] + 300 + 300 + 2 * nnz["fc2"] + 100 + 100 + 2 * nnz["fc3"] + 10


def _hand_vgg23(nnz, h=13, w=11):
    # VGG-like(2, 3): stage s has 2^(3+s-1) channels, conv3x3 pad 1 (bias) -> ReLU -> BN, MaxPool2d(2) per stage;
    # AdaptiveAvgPool2d(7); Linear(49 * 16, 10)
    total, c = 0, None
    for s, width in ((1, 8), (2, 16)):
        for k in (1, 2):
            p = h * w  # (3x3, pad 1, stride 1: same size)
            total += 2 * nnz[f"block{s}_{k}.conv"] * p + width * p + width * p + 2 * width * p
        h, w = h // 2, w // 2
        total += 3 * width * h * w  # max of 4: 3 comparisons per output
        c = width
    total += c * _adaptive(h, 7) * _adaptive(w, 7)
    return total + 2 * nnz["classifier"] + 10


def _hand_resnet18(nnz, h=33, w=29):
    # CIFAR stem: conv3x3 s1 p1 (no bias) -> BN -> ReLU, no max-pool; BasicBlocks; global average pool; fc (bias)
    total = 2 * nnz["conv1"] * h * w + 3 * 64 * h * w
    for li, width in enumerate((64, 128, 256, 512), 1):
        for b in (0, 1):
            stride = 2 if li > 1 and b == 0 else 1
            ho, wo = _out(h, 3, stride, 1), _out(w, 3, stride, 1)
            p, pre = ho * wo, f"layer{li}.{b}"
            total += 2 * nnz[f"{pre}.conv1"] * p + 3 * width * p  # conv1, bn1 (2), relu1 (1)
            total += 2 * nnz[f"{pre}.conv2"] * p + 3 * width * p  # conv2, bn2, relu2 (the + not counted)
            if f"{pre}.downsample.0" in nnz:  # 1x1 stride-2 conv + BN
                assert (_out(h, 1, stride), _out(w, 1, stride)) == (ho, wo)
                total += 2 * nnz[f"{pre}.downsample.0"] * p + 2 * width * p
            h, w = ho, wo
    total += 512 * h * w  # adaptive average pool to 1x1: every input cell once
    return total + 2 * nnz["fc"] + 10


@pytest.mark.parametrize("name,shape,hand", [("lenet300", (1, 28, 28), _hand_lenet),
                                             ("vgg_d2g3", (3, 13, 11), _hand_vgg23),
                                             ("resnet18", (3, 33, 29), _hand_resnet18)])
@pytest.mark.parametrize("sparsity", [0.0, 0.8])
def test_whole_models_against_a_hand_formula(name, shape, hand, sparsity):
    """Every conv, linear, BN, ReLU and pool of LeNet-300-100, a VGG-like and ResNet-18 at odd input
    sizes, dense and at sparsity 0.8 (masks, and the same model on the sparse engine), against a
    formula written layer by layer; training = 3 x forward, dense_macs = every weight once."""
    import sparsetrain
    from sparsetrain.experiment.flops import dense_macs
    torch.manual_seed(0)
    m = build_model(name, 10, shape[0], shape[1:])
    weighted = {n: mod for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(mod.weight.shape, generator=g) >= sparsity for n, mod in weighted.items()}
    with torch.no_grad():
        for n, mod in weighted.items():
            mod.weight.copy_(torch.where(masks[n], 0.5, 0.0))  # (no init zero: nonzeros = the mask)
    nnz = {n: int(mk.sum()) for n, mk in masks.items()}
    want = hand(nnz)
    assert forward_flops(m, shape, masks)["total"] == forward_flops(m, shape)["total"] == want
    assert training_flops(forward_flops(m, shape, masks), 7, 2) == 3 * want * 7 * 2
    dense_nnz = {n: mod.weight.numel() for n, mod in weighted.items()}
    assert dense_macs(m, shape) == (hand(dense_nnz) - hand({n: 0 for n in weighted})) // 2
    if sparsity:  # the same model with every layer on the sparse engine, fused or not, counts the same
        import copy
        fused = sparsetrain.sparsify_(copy.deepcopy(m), masks, fuse=True)
        sparsetrain.sparsify_(m, masks)
        assert forward_flops(m, shape)["total"] == forward_flops(fused, shape)["total"] == want
        assert name == "lenet300" or any(type(x).__name__ == "SparseConvBNReLU" for x in fused.modules())


def test_counters_refuse_bad_flags_and_sample_counts():
    """elementwise="no" counted the elementwise layers (a truthy string); 2.5 samples or images were
    charged as such, and a numpy int sample count was refused as not a number."""
    import numpy as np
    from sparsetrain.experiment.flops import paper_round_flops
    net = _net()
    for arg in ("elementwise", "dense"):
        with pytest.raises(TypeError, match=f"{arg} must be True or False, got 'no'"):
            forward_flops(net, (1, 4, 4), **{arg: "no"})
    for bad in (2.5, True, -1, "3"):
        with pytest.raises(ValueError, match="n_samples must be a non-negative int"):
            training_flops(10, bad, 1)
    with pytest.raises(ValueError, match="n_samples must be a non-negative int, got 10.5"):
        paper_round_flops(net, (1, 4, 4), 10.5, 1)
    with pytest.raises(ValueError, match=r"fwd_flops must be an int or forward_flops\(\)'s dict \(with 'total'\)"):
        training_flops({"weights": 10}, 3, 1)
    assert training_flops(np.int64(100), np.int64(50), np.float64(2.0)) == training_flops(100, 50, 2) == 30_000


@pytest.mark.parametrize("where", ["next_round", "measure"])
def test_cumulative_flops_of_a_resumed_run_equal_the_uninterrupted_ones(mnist_dir, study_args, monkeypatch, where):
    """Killed after round 2 was measured and recorded but before the next round's state was saved
    (in next_round), or while round 2 was being measured: the resumed run measures that round once and
    charges every round once (cum_flops = running sum of round_flops = 3 x fwd x train samples x epochs)."""
    from conftest import read_rows, run_dir, strip_timing
    from sparsetrain.experiment import loop, study
    from sparsetrain.experiment.flops import paper_macs
    base = study_args(mnist_dir, "--teachers", "dense")
    assert study.main(base + ["--out", str(mnist_dir / "a")]) == 0
    real, calls = getattr(loop, where), {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            if where == "measure":
                raise KeyboardInterrupt
            real(*a, **k)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, where, dying)
    assert study.main(base + ["--out", str(mnist_dir / "b")]) == 130 and calls["n"] == 3
    monkeypatch.setattr(loop, where, real)
    assert study.main(base + ["--out", str(mnist_dir / "b"), "--resume"]) == 0
    for phase in ("teacher", "distill-dense"):
        ra, rb = (read_rows(run_dir(mnist_dir / d) / "seed0" / phase / "metrics.csv") for d in "ab")
        assert strip_timing(ra) == strip_timing(rb) and len(rb) == 5
        cum = 0
        for k, r in enumerate(rb):
            assert int(r["round"]) == k
            assert int(r["round_flops"]) == 3 * int(r["fwd_flops"]) * 72 * 2  # (80 images - 10% validation, 2 epochs)
            cum += int(r["round_flops"])
            assert int(r["cum_flops"]) == cum
            assert int(r["paper_cum_flops"]) == (k + 1) * int(rb[0]["paper_round_flops"])
    # the KD teacher (its dense round 0): its forward once per training sample and epoch, its run up to round 0
    teacher, student = (read_rows(run_dir(mnist_dir / "b") / "seed0" / p / "metrics.csv") for p in ("teacher",
                                                                                                   "distill-dense"))
    lenet = build_model("lenet300", 10, 1, 28)
    for r in student:
        assert int(r["teacher_flops"]) == int(teacher[0]["fwd_flops"]) * 72 * 2
        assert int(r["teacher_cost"]) == int(teacher[0]["cum_flops"]) == int(teacher[0]["round_flops"])
        assert int(r["teacher_paper_flops"]) == paper_macs(lenet, (1, 28, 28)) * 80 * 2
        assert int(r["paper_round_flops"]) == 3 * paper_macs(lenet, (1, 28, 28)) * 80 * 2


def test_a_skipped_final_sample_is_not_charged(mnist_dir, study_args):
    """72 training images in batches of 71: train_epoch skips the final batch of one sample (BatchNorm
    cannot train on it), so each epoch trains, and the KD teacher infers, 71 samples, not 72 as charged."""
    from conftest import read_rows, run_dir
    from sparsetrain.experiment import study
    from sparsetrain.experiment.train import steps_per_epoch
    assert steps_per_epoch(72, 71) == 1
    assert study.main(study_args(mnist_dir, "--teachers", "dense", "--batch-size", "71")) == 0
    teacher, student = (read_rows(run_dir(mnist_dir / "runs") / "seed0" / p / "metrics.csv")
                        for p in ("teacher", "distill-dense"))
    for r in teacher + student:
        assert int(r["round_flops"]) == 3 * int(r["fwd_flops"]) * 71 * 2  # (2 epochs)
    for r in student:
        assert int(r["teacher_flops"]) == int(teacher[0]["fwd_flops"]) * 71 * 2


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.Hardtanh(), nn.PReLU(), nn.RReLU(), nn.Hardswish(),
                                 nn.Hardsigmoid(), nn.Mish(), nn.SELU(), nn.CELU(), nn.Softplus()])
def test_every_common_activation_counts_one_per_element(act):
    """ReLU, GELU, SiLU, Sigmoid, ... counted 1 per output element, but PReLU, Hardswish, Mish, SELU,
    Softplus, ... 0: the same network cost less with one of those."""
    r = forward_flops(nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), act), (2, 7, 6))
    assert r["per_layer"] == {"0": 2 * 2 * 3 * 9 * 5 * 4, "1": 3 * 5 * 4} and r["elementwise"] == 3 * 5 * 4


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(3), nn.GroupNorm(1, 3), nn.InstanceNorm2d(3),
                                  nn.InstanceNorm2d(3, affine=True)])
def test_every_norm_layer_counts_two_per_element(norm):
    """BatchNorm, GroupNorm and LayerNorm counted 2 per output element, InstanceNorm 0."""
    r = forward_flops(nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), norm), (2, 7, 6))
    assert r["per_layer"] == {"0": 2 * 2 * 3 * 9 * 5 * 4, "1": 2 * 3 * 5 * 4}
