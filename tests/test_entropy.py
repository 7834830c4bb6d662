"""sparsetrain.entropy: Eq. 1 against hand computations on fixed networks."""
import copy
import math

import pytest
import torch
from torch import nn

from sparsetrain.experiment.entropy import activation_entropy, binary_entropy
from sparsetrain.experiment.models import build_model


def H(p):
    return 0.0 if p in (0, 1) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def _fixed_net():
    """Linear(2, 3) -> ReLU -> Linear(3, 2) -> ReLU, fixed weights."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -0.5, 0.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([-1.0, 0.25]))
    return net


X = torch.tensor([[1.0, 1.0], [-1.0, 2.0], [2.0, -1.0], [0.5, 0.25]])


def test_hand_computation_over_all_batches():
    # layer 1 pre-activations: u0 = x0 -> [1, -1, 2, .5] (3/4 positive); u1 = x1 - .5 ->
    # [.5, 1.5, -1.5, -.25] (2/4); u2 = x0 - x1 -> [0, -3, 3, .25] (2/4: zero is negative).
    # relu: h = [[1, .5, 0], [0, 1.5, 0], [2, 0, 3], [.5, 0, .25]]
    # layer 2: v0 = sum(h) - 1 -> [.5, .5, 4, -.25] (3/4); v1 = .25 - h0 -> [-.75, .25, -1.75, -.25] (1/4)
    l1 = (H(3 / 4) + H(1 / 2) + H(1 / 2)) / 3
    l2 = (H(3 / 4) + H(1 / 4)) / 2
    net = _fixed_net()
    net.train()
    for batches in ([X], [X[:3], X[3:]], [(X[:1], None), (X[1:], None)]):
        r = activation_entropy(net, batches)
        assert r["per_layer"] == pytest.approx({"1": l1, "3": l2}, abs=1e-12)
        assert r["mean"] == pytest.approx((l1 + l2) / 2, abs=1e-12)
        assert r["neurons"] == {"1": 3, "3": 2} and r["samples"] == 4
    assert net.training  # mode restored


def test_frequency_pooled_before_log_not_per_batch_average():
    # one neuron positive in batch 1 (p=1, H=0) and negative in batch 2 (p=0, H=0): the paper's
    # per-batch average would give 0; over the whole set p = 1/2, H = 1 bit.
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU())
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    r = activation_entropy(net, [torch.ones(5, 1), -torch.ones(5, 1)])
    assert r["mean"] == pytest.approx(1.0)


def test_conv_neurons_are_channel_times_position():
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    net = nn.Sequential(conv, nn.ReLU())
    x = torch.tensor([[[[1.0, -1.0], [1.0, 1.0]]], [[[1.0, 1.0], [-1.0, 1.0]]]])  # [2, 1, 2, 2]
    # channel 0 = x: p per position [1, .5, .5, 1]; channel 1 = -x: [0, .5, .5, 0]
    r = activation_entropy(net, [x])
    assert r["neurons"] == {"1": 8}
    assert r["mean"] == pytest.approx(4 * H(0.5) / 8)


def test_reused_relu_module_counts_each_call_site():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.relu(x) - 0.5)

    r = activation_entropy(Reuse(), [torch.tensor([[1.0], [2.0], [-1.0], [0.25]])])
    # call 1: x > 0 for 3/4; call 2: relu(x) - .5 > 0 for [.5, 1.5, -.5, -.25] -> 2/4
    assert r["per_layer"] == pytest.approx({"relu": H(3 / 4), "relu#1": H(1 / 2)})


def test_binary_entropy_values_and_resnet_layers():
    assert binary_entropy(torch.tensor([0.0, 0.5, 1.0, 0.25])).tolist() == pytest.approx([0, 1, 0, H(0.25)])
    m = build_model("resnet18", 10, 3, 32)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r = activation_entropy(m, [x])
    assert len(r["per_layer"]) == 17 and not any("#" in k for k in r["per_layer"])
    assert r["neurons"]["relu"] == 64 * 32 * 32 and r["neurons"]["layer4.1.relu2"] == 512 * 4 * 4
    # every layer's value is Eq. 1 computed neuron by neuron in Python (was: only that it lies in [0, 1])
    mean, per_layer = _eq1_reference(m, x, 3)
    assert r["per_layer"] == pytest.approx(per_layer, abs=1e-9) and r["mean"] == pytest.approx(mean, abs=1e-9)



def test_binary_entropy_refuses_non_probabilities():
    """p outside [0, 1] gave -inf bits silently and a number an AttributeError: refused / taken."""
    assert float(binary_entropy(0.25)) == pytest.approx(H(0.25))
    assert math.isnan(float(binary_entropy(torch.tensor([float("nan")]))[0]))
    for bad in (torch.tensor([0.5, 1.5]), torch.tensor([-0.25]), 2.0):
        with pytest.raises(ValueError, match=r"p must hold probabilities in \[0, 1\]"):
            binary_entropy(bad)
    for bad in ([0.5], None, True):
        with pytest.raises(TypeError, match="p must be a tensor or a number"):
            binary_entropy(bad)

def test_errors():
    with pytest.raises(ValueError, match="no .*ReLU"):
        activation_entropy(nn.Linear(2, 2), [X])
    with pytest.raises(ValueError, match="no samples"):
        activation_entropy(_fixed_net(), [])



def test_refused_tensor_batches_leave_no_hooks_on_the_model():
    """A bare tensor for `batches` is refused before any hook goes on: refused after, the hooks stayed
    on the model, and every later forward (the next entropy, a plain model(x)) raised from them."""
    net = _fixed_net()
    ref = activation_entropy(net, [X])
    with pytest.raises(TypeError, match="not a tensor: wrap one batch as"):
        activation_entropy(net, X)
    assert not any(m._forward_hooks for m in net.modules())
    assert net(X[:1]).shape == (1, 2)  # (a stale hook refused this: 1 row for a batch of 4)
    assert activation_entropy(net, [X]) == ref


@pytest.mark.parametrize("kw, err, msg", [
    ({"batches": None}, TypeError, "batches must be an iterable of batches, got NoneType"),
    ({"batches": 3}, TypeError, "batches must be an iterable of batches, got int"),
    ({"batches": [()]}, TypeError, r"batches must yield tensors or \(tensor, ...\) tuples, got tuple"),
    ({"relu_types": [nn.ReLU]}, TypeError, "relu_types must be an nn.Module subclass or a tuple of them"),
    ({"relu_types": "relu"}, TypeError, "relu_types must be an nn.Module subclass or a tuple of them"),
    ({"relu_types": nn.ReLU6}, ValueError, r"model has no \['ReLU6'\] modules to hook"),
    ({"reduce": 5}, TypeError, "reduce must be a function"),
    ({"device": "banana"}, ValueError, "device must be a torch.device or device string, got 'banana'")])
def test_bad_arguments_are_named(kw, err, msg):
    """Each bad argument is refused naming it (before: a bare "not iterable", an IndexError, an
    isinstance() error, "'int' object is not callable" mid-pass, torch's device-string error)."""
    net = _fixed_net()
    with pytest.raises(err, match=msg):
        activation_entropy(net, **{"batches": [X], **kw})
    assert not any(m._forward_hooks for m in net.modules())
    assert activation_entropy(net, [X], relu_types=nn.ReLU) == activation_entropy(net, [X])  # (a type alone)


@pytest.mark.parametrize("where", ["input", "weights"])
def test_nan_activations_give_nan_not_dead_neurons(where):
    """NaN > 0 is false: a NaN activation counted as OFF, so a diverged model read as dead neurons
    (finite bits, which Algorithm 2 took as an entropy drop). A NaN in the output now makes the
    mean and every layer NaN (also through reduce, and through the fused layers' counting)."""
    import sparsetrain
    from sparsetrain.testing import model_masks

    net, x = _fixed_net(), X.clone()
    if where == "input":
        x[2, 0] = float("nan")
    else:
        with torch.no_grad():
            net[2].weight[1, 0] = float("nan")
    for kw in ({}, {"reduce": lambda t: t}):
        r = activation_entropy(net, [x[:3], x[3:]], **kw)
        assert math.isnan(r["mean"]) and all(math.isnan(v) for v in r["per_layer"].values())
        assert r["neurons"] == {"1": 3, "3": 2} and r["samples"] == 4
    if where == "input":  # (the NaN-free batch alone: finite, as the reference)
        assert activation_entropy(net, [x[3:]]) == activation_entropy(_fixed_net(), [X[3:]])

    class TupleOut(nn.Module):  # (an output that is a tuple / dict of tensors, the NaN in one of them)
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, inp):
            y = self.net(inp)
            return y[:, :1].long(), {"aux": y}
    assert math.isnan(activation_entropy(TupleOut(), [x])["mean"])
    m = build_model("vgg_like", 10, 3, 16, delta=1, gamma=2)
    sparsetrain.sparsify_(m, model_masks(m, 0.5, seed=1), fuse=True)
    xi = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    xi[1, :, 5, 5] = float("nan")
    assert math.isnan(activation_entropy(m, [xi])["mean"])
    assert not math.isnan(activation_entropy(m, [xi[[0, 2]]])["mean"])


class _TimeMajor(nn.Module):
    """[B, T, E] -> ReLU over [T, B, E]: dim 0 is not the sample."""

    def __init__(self):
        super().__init__()
        self.lin, self.relu = nn.Linear(6, 5), nn.ReLU()

    def forward(self, x):
        return self.relu(self.lin(x.transpose(0, 1)))


@pytest.mark.parametrize("model", [
    pytest.param(lambda: nn.Sequential(nn.Unflatten(1, (4, 3)), nn.Flatten(0, 1), nn.Linear(3, 5), nn.ReLU()),
                 id="positions-folded-into-dim0"),
    pytest.param(_TimeMajor, id="time-major"),
    pytest.param(lambda: nn.Sequential(nn.Flatten(0), nn.Linear(24, 1), nn.Flatten(0), nn.ReLU()),
                 id="whole-batch-scalar")])
def test_relu_outputs_without_samples_on_dim0_are_refused(model):
    """p is a frequency over samples: a ReLU output whose dim 0 is not the batch (p above 1, H = -inf
    before) is refused, naming the layer."""
    torch.manual_seed(0)
    x = torch.randn(2, 12) if not isinstance(model, type) else torch.randn(2, 7, 6)
    with pytest.raises(ValueError, match=r"layer '(3|relu)' returned shape .* for a batch of 2 samples"):
        activation_entropy(model(), [x, x])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_one_neuron_outputs(dtype):
    """Half-precision models and a ReLU on [B] outputs (one neuron) count as float32 ones do."""
    m = _fixed_net()
    ref = activation_entropy(m, [X])
    half = activation_entropy(copy.deepcopy(m).to(dtype), [X.to(dtype)])
    assert half["neurons"] == ref["neurons"]
    assert half["mean"] == pytest.approx(ref["mean"])  # (the same signs: exact values)
    one = nn.Sequential(nn.Linear(2, 1), nn.Flatten(0), nn.ReLU())
    with torch.no_grad():
        one[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        one[0].bias.zero_()
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])  # 3 of 4 positive: H(3/4)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert activation_entropy(one, [x])["mean"] == pytest.approx(h)


def test_torch_fallback_equals_cpp_op(monkeypatch):
    import sys

    m = build_model("vgg_like", 10, 3, 16, delta=2, gamma=2)
    x = [torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with_op = activation_entropy(m, x)
    monkeypatch.setitem(sys.modules, "sparsetrain.engine.ops", None)  # import fails -> torch reduction
    assert activation_entropy(m, x) == with_op


class _SkipsOnNegativeMean(nn.Module):
    """A second ReLU call only for batches with a positive mean: data-dependent control flow."""

    def __init__(self):
        super().__init__()
        self.lin, self.relu = nn.Linear(2, 3), nn.ReLU()

    def forward(self, x):
        h = self.relu(self.lin(x))
        return self.relu(h) if x.mean() > 0 else h


def test_relu_called_in_some_batches_only_is_refused():
    """A layer seen in some batches only would divide its counts by every batch's samples (p too
    low, silently): refused, naming the call counts."""
    m = _SkipsOnNegativeMean()
    pos, neg = torch.ones(3, 2), -torch.ones(3, 2)
    assert activation_entropy(m, [pos, pos])["samples"] == 6  # (the same calls every batch: fine)
    with pytest.raises(ValueError, match=r"called \{'relu': 1\} times in one batch but \{'relu': 2\} in the first"):
        activation_entropy(m, [pos, neg])


# ---------------------------------------------------------------------------- Eq. 1 by a direct reference
def _eq1_reference(model, x, batch_size):
    """Eq. 1 the slow way: eval mode, a forward hook on every nn.ReLU keeping each sample's states
    (out > 0: ReLU(0) = 0 is the negative state, zeta = 0), p per neuron over all of x, binary entropy
    in bits neuron by neuron in Python, mean over the layer's neurons, then over layers."""
    model = copy.deepcopy(model).eval()
    states, calls = {}, {}

    def make(name):
        def hook(_m, _i, out):
            k = calls.get(name, 0)
            calls[name] = k + 1
            states.setdefault(name if k == 0 else f"{name}#{k}", []).append((out > 0).reshape(out.shape[0], -1))
        return hook
    for n, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(make(n))
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            calls.clear()
            model(x[i:i + batch_size])
    per_layer = {}
    for key, s in states.items():
        p = torch.cat(s).double().mean(0).tolist()
        per_layer[key] = sum(H(q) for q in p) / len(p)
    return sum(per_layer.values()) / len(per_layer), per_layer


def _with_ties_and_dead_neurons(name):
    """The tiny VGG-like / ResNet with non-trivial BN statistics, where the ReLU input of channels 0
    and 1 of the first layer is exactly 0 for an all-zero image (no bias, no BN shift: ties on some
    samples only) and positive for a positive one (p differs far from 1/2 with the convention),
    channel 2 is always negative (dead), and one layer is dead as a whole."""
    torch.manual_seed(1)
    m = build_model("vgg_like", 10, 3, 16, delta=2, gamma=2) if name == "vgg" else build_model("resnet18", 10, 3, 16)
    for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 2.0)
    # (VGG-like: conv -> ReLU -> BN, the conv's output is the ReLU's input; ResNet: conv -> BN -> ReLU)
    tie, layer = (m.block1_1.conv, m.block2_2.conv) if name == "vgg" else (m.bn1, m.layer4[1].bn1)
    with torch.no_grad():
        tie.bias[:2].zero_(), tie.weight[2].zero_(), tie.bias[2].fill_(-1.0)
        (tie if name == "vgg" else m.conv1).weight[:2].abs_()
        layer.weight.zero_(), layer.bias.fill_(-1.0)
        if name != "vgg":
            tie.running_mean[:2].zero_()
    return m


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("sparsity", [0.0, 0.8])
@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_eq1_against_a_direct_reference(name, sparsity, fuse):
    """The library's entropy (C++ counting, the fused kernels' counting, pooled batches) against the
    reference on the dense PyTorch model with the masks applied, over 23 samples in batches of 5 and
    7 (the last one partial); ReLU(0) counts as the negative state, dead neurons and a dead layer
    give 0 bits."""
    import sparsetrain
    from sparsetrain.testing import model_masks, zero_pruned_

    model = _with_ties_and_dead_neurons(name)
    masks = model_masks(model, sparsity, seed=1)
    dense = copy.deepcopy(model)
    zero_pruned_(dense, masks)
    if sparsity or fuse:
        sparsetrain.sparsify_(model, masks, fuse=fuse)
    x = torch.randn(23, 3, 16, 16, generator=torch.Generator().manual_seed(2)).abs()
    x[::4] = 0.0  # (6 all-zero images: the tied channels' inputs are exactly 0 there, > 0 elsewhere)
    dead = "block2_2.relu" if name == "vgg" else "layer4.1.relu1"
    for bs in (5, 7):
        mean, per_layer = _eq1_reference(dense, x, bs)
        got = activation_entropy(model, [(x[i:i + bs], None) for i in range(0, 23, bs)])
        # (fused: the folded conv sums in another order, a sign can flip at rounding level)
        tol = 2e-3 if fuse else 1e-9
        assert got["samples"] == 23 and set(got["per_layer"]) == set(per_layer)
        assert got["per_layer"] == pytest.approx(per_layer, abs=tol)
        assert got["mean"] == pytest.approx(mean, abs=tol)
        assert got["per_layer"][dead] == per_layer[dead] == 0.0
    # the convention itself, on one neuron: 2 of 4 positive (ReLU(0) negative) -> 1 bit, not H(3/4)
    ties = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU())
    with torch.no_grad():
        ties[0].weight.fill_(1.0)
    assert activation_entropy(ties, [torch.tensor([[1.0], [0.0], [-0.0], [2.0]])])["mean"] == pytest.approx(1.0)
