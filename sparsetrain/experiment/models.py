"""The paper's models (DSD² Appendix A, B.1): ResNet-18/50 (torchvision, CIFAR stem for small
inputs), VGG-like(δ, γ) of Table 2 and LeNet-300-100.

Every ReLU is its own `nn.ReLU` module, used once per forward, so that forward hooks (the
activation entropy of Eq. 1, sparsetrain.experiment.entropy) see each activation site exactly once.
torchvision's residual blocks call one `self.relu` two or three times; the blocks below replace it
by distinct `relu1`, `relu2` (, `relu3`).

Parameter counts (paper Table 3, CIFAR-10: 3 input channels, 10 classes) are *all* parameters:
conv and linear weights and biases plus BatchNorm affine weights (running stats are buffers, not
counted). Measured: VGG-like d1g5 25,962 (26.0 K), d1g6 70,346, d1g7 214,410, d1g8 723,722,
d1g9 2,627,082, d2g5 97,322, d3g5 350,634, d4g5 1,299,626 (1.3 M), d5g5 4,967,082; ResNet-18
11,173,962; ResNet-50 23,520,842. The table's 4.9 M (d5g5) and 11.1 M (ResNet-18) are these
counts truncated to one decimal, while 26.0 K and 1.3 M are rounded: every entry equals the count
either rounded or truncated at the table's precision. ResNet-50's 23.5 M is the 10-class head
(with the ImageNet 1000-class head and 7x7 stem it is 25.6 M; 23.5 M is also the count with no
head at all).
"""
from __future__ import annotations

import inspect
import numbers
import re
from collections import OrderedDict

from torch import nn

from ..engine.args import check_flag, is_int
from ..engine.replicated import BroadcastAvgPool2d

__all__ = ["resnet18", "resnet50", "vgg_like", "lenet_300_100", "build_model", "count_parameters",
           "MODEL_NAMES", "MODELS", "resolve_name", "canonical_name",
           "one_spelling"]

SMALL_INPUT = 64  # images of at most this side get the CIFAR stem (3x3 stride-1 conv, no max-pool)


def count_parameters(model: nn.Module) -> int:
    """All trainable-or-not parameters (weights, biases, BN affine); buffers excluded."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------- ResNets
def resnet18(num_classes: int = 10, in_channels: int = 3, small_input: bool = True) -> nn.Module:
    """ResNet-18; `small_input` (32x32-like images) gives the CIFAR stem (resnet.py)."""
    _check_common(num_classes, in_channels, small_input)
    from .resnet import build_resnet
    return build_resnet(18, int(num_classes), int(in_channels), small_input)


def resnet50(num_classes: int = 10, in_channels: int = 3, small_input: bool = True) -> nn.Module:
    """ResNet-50 (bottleneck blocks); `small_input` gives the CIFAR stem (resnet.py)."""
    _check_common(num_classes, in_channels, small_input)
    from .resnet import build_resnet
    return build_resnet(50, int(num_classes), int(in_channels), small_input)


# ------------------------------------------------------------------------------- VGG-like
def vgg_like(delta: int, gamma: int, num_classes: int = 10, in_channels: int = 3,
             image_size: int | tuple[int, int] = 32, dropout: float = 0.0) -> nn.Sequential:
    """VGG-like(δ, γ) of Table 2: δ stages of two blocks conv3x3(pad 1, bias) -> ReLU -> BatchNorm2d,
    stage s (1-based) has 2^(γ+s-1) channels and ends with MaxPool2d(2); then
    AdaptiveAvgPool2d(7) and one Linear(7*7*width, classes). The 7x7 pool is the authors' code and
    reproduces Table 3's counts. A stage-final max-pool that would shrink a map below 1x1 (e.g.
    δ=5 on 28x28 images) is left out, so every δ works on every input size. `dropout`: an
    nn.Dropout before the classifier (Appendix D), named "dropout"."""
    for arg, v, lo in (("delta", delta, 1), ("gamma", gamma, 0)):
        if not is_int(v) or v < lo:  # (numpy's ints too: labels.max() + 1 is an np.int64)
            raise ValueError(f"{arg} must be an int >= {lo}, got {v!r}")
    delta, gamma = int(delta), int(gamma)  # (an np.int64 sum could wrap around below 15)
    if delta + gamma >= 15:  # (as resolve_name: refused before a layer is built, not an allocation of GBs)
        raise ValueError(f"VGG-like needs delta + gamma <= 14, got delta={delta}, gamma={gamma} (its last stage "
                         f"would hold {2 ** (delta + gamma - 1)} channels, over 2^31 weights)")
    _check_common(num_classes, in_channels)
    dropout = _check_dropout(dropout)
    num_classes, in_channels = int(num_classes), int(in_channels)
    h, w = _pair(image_size)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_channels
    for s in range(1, delta + 1):
        width = 2 ** (gamma + s - 1)
        for k in (1, 2):
            layers[f"block{s}_{k}"] = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(c, width, 3, stride=1, padding=1),
                relu=nn.ReLU(inplace=True),
                bn=nn.BatchNorm2d(width)))
            c = width
        if h >= 2 and w >= 2:
            layers[f"pool{s}"] = nn.MaxPool2d(2)
            h, w = h // 2, w // 2
    layers["avgpool"] = BroadcastAvgPool2d(7)
    layers["flatten"] = nn.Flatten(1)
    if dropout:
        layers["dropout"] = nn.Dropout(dropout)
    layers["classifier"] = nn.Linear(7 * 7 * c, num_classes)
    return nn.Sequential(layers)


# ------------------------------------------------------------------------------- LeNet
def lenet_300_100(num_classes: int = 10, in_features: int = 784, dropout: float = 0.0) -> nn.Sequential:
    """LeNet-300-100: flatten -> 784-300-100-classes fully connected with ReLU (`dropout`: an
    nn.Dropout before fc3)."""
    _check_common(num_classes, 1)
    dropout = _check_dropout(dropout)
    if not is_int(in_features) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    num_classes, in_features = int(num_classes), int(in_features)
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(1),
        fc1=nn.Linear(in_features, 300), relu1=nn.ReLU(inplace=True),
        fc2=nn.Linear(300, 100), relu2=nn.ReLU(inplace=True),
        **({"dropout": nn.Dropout(dropout)} if dropout else {}),
        fc3=nn.Linear(100, num_classes)))


def _with_dropout(model: nn.Module, p: float) -> nn.Module:
    """A ResNet with an nn.Dropout(p) before its classifier (Appendix D), applied after the global
    pool (avgpool = Sequential(pool, dropout): the state_dict keys stay torchvision's)."""
    if p:
        model.avgpool = nn.Sequential(OrderedDict(pool=model.avgpool, dropout=nn.Dropout(p)))
    return model


# ------------------------------------------------------------------------------- factory
# name -> builder(num_classes, in_channels, (h, w), **kwargs). Adding a model: a builder here (and
# its aliases); the experiment's --model/--student choices and checks follow from this table.
MODELS = {
    "resnet18": lambda nc, c, hw, dropout=0.0: _with_dropout(resnet18(nc, c, small_input=max(hw) <= SMALL_INPUT), dropout),
    "resnet50": lambda nc, c, hw, dropout=0.0: _with_dropout(resnet50(nc, c, small_input=max(hw) <= SMALL_INPUT), dropout),
    "vgg_like": lambda nc, c, hw, delta=5, gamma=5, dropout=0.0: vgg_like(delta, gamma, nc, c, hw, dropout),
    "lenet300": lambda nc, c, hw, dropout=0.0: lenet_300_100(nc, c * hw[0] * hw[1], dropout),
}
_ALIASES = {"resnet-18": "resnet18", "resnet-50": "resnet50", "vgg-like": "vgg_like", "vgg": "vgg_like",
            "lenet_300_100": "lenet300", "lenet-300-100": "lenet300", **{k: k for k in MODELS}}
_VGG_SHORT = re.compile(r"vgg(?:[_-]like)?[_-]?d(\d+)g(\d+)$")


def resolve_name(name: str) -> tuple[str, dict]:
    """(canonical model name, builder kwargs) for a model name or alias; "vgg_d5g5" is VGG-like
    with delta=5, gamma=5. ValueError naming the known models otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key, kwargs = name.lower(), {}
    m = _VGG_SHORT.match(key)
    if m:
        key, kwargs = "vgg_like", {"delta": int(m.group(1)), "gamma": int(m.group(2))}
        if kwargs["delta"] < 1:
            raise ValueError(f"model {name!r}: VGG-like needs delta >= 1 stage (vgg_d<delta>g<gamma>)")
        if kwargs["delta"] + kwargs["gamma"] >= 15:  # last stage 2^(delta+gamma-1) channels: 18 x 4^14 > 2^31 weights
            raise ValueError(f"model {name!r}: VGG-like needs delta + gamma <= 14 (its last stage would hold "
                             f"{2 ** (kwargs['delta'] + kwargs['gamma'] - 1)} channels, over 2^31 weights)")
    if key not in _ALIASES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)} (or vgg_dXgY, e.g. vgg_d5g5)")
    return _ALIASES[key], kwargs


def canonical_name(name: str) -> str:
    """One spelling per architecture ("VGG-d1g5", "vgg_like_d1g5" -> "vgg_d1g5"; "vgg" -> "vgg_d5g5";
    "resnet-18" -> "resnet18"): what identifies a model where aliases must not differ."""
    key, kwargs = resolve_name(name)
    if key == "vgg_like":
        return f"vgg_d{kwargs.get('delta', 5)}g{kwargs.get('gamma', 5)}"
    return key


def one_spelling(name):
    """canonical_name, or `name` as given where it names no model (a hand-edited record, another type): how recorded
    model names are compared (a run, a phase's state)."""
    try:
        return canonical_name(name)
    except (TypeError, ValueError):
        return name


def build_model(name: str, num_classes: int, in_channels: int = 3,
                image_size: int | tuple[int, int] = 32, **kwargs) -> nn.Module:
    """Model by name: "resnet18", "resnet50", "vgg_like" (kwargs delta=5, gamma=5; or the short
    form "vgg_d5g5"), "lenet300" (LeNet-300-100 on flattened C*H*W inputs); every one takes
    dropout=p (in [0, 1): an nn.Dropout before the classifier)."""
    key, implied = resolve_name(name)
    clash = {k: kwargs[k] for k in implied if k in kwargs and kwargs[k] != implied[k]}
    if clash:  # ("vgg_d5g5", delta=2 built VGG-like(2, 5) under the name of (5, 5))
        raise ValueError(f"build_model({name!r}) names {implied}, but got {clash}: give one or the other")
    kwargs = {**implied, **kwargs}
    allowed = set(inspect.signature(MODELS[key]).parameters) - {"nc", "c", "hw"}
    extra = set(kwargs) - allowed
    if extra:
        raise TypeError(f"build_model({key!r}) got unexpected keyword arguments {sorted(extra)}; "
                        f"allowed: {sorted(allowed)}")
    if "dropout" in kwargs:
        kwargs["dropout"] = _check_dropout(kwargs["dropout"])
    _check_common(num_classes, in_channels)  # (lenet300 sees only C*H*W: in_channels=True was 1, 0 "in_features")
    return MODELS[key](num_classes, in_channels, _pair(image_size), **kwargs)


def _pair(size) -> tuple[int, int]:
    hw = (size, size) if is_int(size) else size  # (a bool is no side: (28, True) built for 28x1 images)
    if not isinstance(hw, (tuple, list)) or len(hw) != 2 or not all(is_int(s) and s >= 1 for s in hw):
        raise ValueError(f"image_size must be a positive int or (height, width), got {size!r}")
    return int(hw[0]), int(hw[1])


def _check_dropout(p) -> float:
    """p as a float (numpy's float32 too, which is no float); p = 1 drops every input of the classifier
    in training (its output ignores the image)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
    return float(p)


def _check_common(num_classes, in_channels, small_input: bool = True) -> None:
    if not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not is_int(in_channels) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    check_flag(small_input, "small_input")  # (a string "False" was truthy: the CIFAR stem on ImageNet-sized input)


MODEL_NAMES = tuple(MODELS)
