"""Datasets as in-memory uint8 tensors, label noise, validation split, and a seeded batch iterator.

`load_dataset(name, data_dir, ...)` -> `Splits` (train / val / test `Split`s). Order of operations:
labels (cifar100n: the human noisy labels replace the training labels) -> `subset` (first n
training images; spread evenly over files listed class by class) -> validation split (seeded,
disjoint) -> label noise on train, and on val unless `clean_val`. Noise: exactly floor(N * eps)
samples of the split, chosen by a seeded permutation, get a label drawn uniformly from the *other*
classes ("symmetric", the paper's) or from all classes ("uniform", may keep the label). The test
split is never noised.

`iterate(split, batch_size, shuffle=, augment=, generator=)` yields normalised float batches;
augmentation runs as tensor ops per batch. Same generator state -> same order and augmentation,
so `epoch_generator(seed, epoch)` makes every epoch reproducible and resumable.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..engine.args import check_flag, is_int
from .datasets import DATASETS, HUMAN_NOISE, LOADERS, DataError, DatasetNotFound, read_idx

__all__ = ["DATASETS", "DatasetNotFound", "DataError", "Split", "Splits", "load_dataset", "iterate",
           "epoch_generator", "add_label_noise", "read_idx", "NOISE_KINDS"]

NOISE_KINDS = ("symmetric", "uniform")
POLICIES = ("standard", "autoaugment")  # training augmentation policies (iterate's `policy`)


def seeded(seed: int, *stream: int) -> torch.Generator:
    """An independent generator per (seed, purpose...) tuple: seed and stream entries in [0, 2^32) (SeedSequence
    reads a larger int as several 32-bit words: seeded(5 + 7 * 2**32, 1) was seeded(5, 7, 1); a negative one
    raised numpy's bare "expected non-negative integer"). The streams in use differ in their first entry (a
    trailing 0 makes no new stream: SeedSequence pads its pool with zeros)."""
    for arg, v in (("seed", seed), *(("stream", e) for e in stream)):
        if not is_int(v) or not 0 <= v < 2**32:
            raise ValueError(f"{arg} must be an int in [0, 2^32), got {v!r}")
    s = int(np.random.SeedSequence([int(seed), *map(int, stream)]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(s & (2**63 - 1))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator for shuffling and augmenting epoch `epoch` of a run with seed `seed`."""
    _check_count("seed", seed)
    _check_count("epoch", epoch)
    if epoch >= 2**32 - 1000:  # (its stream, 1000 + epoch, is one 32-bit word: seeded's error named "stream")
        raise ValueError(f"epoch must be an int in [0, 2^32 - 1000), got {epoch!r}")
    return seeded(seed, 1000 + int(epoch))


def _check_count(arg: str, v) -> None:
    """A seed or an epoch: a non-negative int (int(1.5) drew seed 1's split, noise and batches)."""
    if not is_int(v) or v < 0:
        raise ValueError(f"{arg} must be a non-negative int, got {v!r}")


@dataclass
class Split:
    """One split. x: uint8 [N, C, H, W]; y: int64 [N] labels used (noisy where noised); y_clean:
    the original labels; index: position in the source split (training-file order for train/val,
    test order for test); noisy: bool [N], chosen for noise; mean/std: per-channel normalisation
    on the [0, 1] scale; pad: augment=True shifts by up to `pad` px (zero padding + random crop)
    and flips horizontally at random; pad = 0: no augmentation (MNIST-like, Flowers-102)."""
    x: torch.Tensor
    y: torch.Tensor
    y_clean: torch.Tensor
    index: torch.Tensor
    noisy: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pad: int = 0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, sel: torch.Tensor) -> "Split":
        return Split(self.x[sel], self.y[sel], self.y_clean[sel], self.index[sel], self.noisy[sel],
                     self.mean, self.std, self.pad)

    def to(self, device) -> "Split":
        """The images and labels on `device`, moved once (a GPU epoch then never waits on a CPU
        loader); the bookkeeping tensors stay on the CPU."""
        return Split(self.x.to(device), self.y.to(device), self.y_clean, self.index, self.noisy,
                     self.mean.to(device), self.std.to(device), self.pad)


@dataclass
class Splits:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    eps: float
    noise: str
    seed: int
    fingerprint: str = ""  # of the data loaded (images and labels, before noise): see fingerprint()
    official_val: bool = False  # val is the dataset's own validation split (flowers102), not carved from train
    source: str = ""  # the folder the files were read from (Fashion-MNIST's may be Debian's copy: not data_dir)

    @property
    def flipped(self) -> torch.Tensor:
        """Training-file indices of train samples whose label differs from the original."""
        return self.train.index[self.train.y.cpu() != self.train.y_clean]  # (y may be on a GPU: Split.to)

    @property
    def labels_fingerprint(self) -> str:
        """fingerprint() of the split and labels as drawn (train and val indices and labels, noise
        included): seeded draws that a torch release or a change to this module may redraw, which the
        data's fingerprint (before the split and the noise) cannot see. A run records it per seed."""
        return fingerprint(self.train.index, self.train.y.cpu(), self.val.index, self.val.y.cpu())

    mean = property(lambda self: tuple(self.train.mean.tolist()), doc="per-channel mean, [0, 1] scale")
    std = property(lambda self: tuple(self.train.std.tolist()), doc="per-channel std, [0, 1] scale")

    def summary(self) -> dict:
        """JSON-friendly description for a run's config."""
        d = {k: getattr(self, k) for k in ("name", "num_classes", "in_channels", "eps", "noise", "seed")}
        return {**d, **{k: len(getattr(self, k)) for k in ("train", "val", "test")},
                "image_size": list(self.image_size), "train_flipped": int(self.flipped.numel()),
                "val_flipped": int((self.val.y.cpu() != self.val.y_clean).sum()),
                "mean": self.train.mean.tolist(), "std": self.train.std.tolist(),
                "labels_fingerprint": self.labels_fingerprint}


# ------------------------------------------------------------------------------- noise
def add_label_noise(y: torch.Tensor, eps: float, num_classes: int, *, kind: str = "symmetric",
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (noisy labels, chosen: bool [N]). Exactly floor(N*eps) samples are chosen by a
    seeded permutation; symmetric: new label uniform over the num_classes-1 other classes;
    uniform: uniform over all classes."""
    _check_eps(eps)
    _check_generator(generator)
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    # (a label >= num_classes was "flipped" modulo num_classes, never to its own class's residue)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex() \
            or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer tensor of labels in [0, {num_classes}), got "
                         + (f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__))
    if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(f"y must hold labels in [0, {num_classes}) (num_classes={num_classes}), got labels "
                         f"{int(y.min())}..{int(y.max())}")
    if kind == "symmetric" and eps > 0 and num_classes < 2:
        raise ValueError(f"symmetric noise needs num_classes >= 2, got {num_classes}")
    n, y = y.shape[0], y.clone()
    k = math.floor(n * eps + 1e-9)  # guard: 0.29 * 100 = 28.999999999999996
    chosen = torch.zeros(n, dtype=torch.bool)
    idx = torch.randperm(n, generator=generator)[:k]
    chosen[idx] = True
    if kind == "symmetric":  # old + U{1..C-1} mod C: uniform over the other classes
        y[idx] = (y[idx] + torch.randint(1, num_classes, (k,), generator=generator)) % num_classes
    else:
        y[idx] = torch.randint(0, num_classes, (k,), generator=generator)
    return y, chosen


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")


# ------------------------------------------------------------------------------- splits
def load_dataset(name: str, data_dir, *, eps: float = 0.0, noise: str = "symmetric",
                 val_fraction: float = 0.1, clean_val: bool = False, seed: int = 0,
                 subset: int | None = None, test_subset: int | None = None,
                 label_file=None, image_size: int | None = None, download: bool = True) -> Splits:
    """Load `name` (one of DATASETS) from `data_dir` and build the train/val/test splits.

    cifar100n: eps must be 0 (the labels are already noisy); label_file defaults to
    data_dir/CIFAR-100_human.pt. flowers102 keeps its official train/val/test (val_fraction
    unused), no augmentation (paper I.2). flowers102 and imagefolder (data_dir/train and
    data_dir/val, one folder per class; val/ is the test split) are decoded into memory at
    `image_size` (default 64; shorter side resized, center crop); imagefolder augments by shifts
    of image_size/8 px and flips (an in-memory stand-in for random-resized crops: ImageNet
    itself does not fit in memory). Tests pass download=False.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    _check_eps(eps)
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    _check_count("seed", seed)
    for arg, v in (("clean_val", clean_val), ("download", download)):  # ("no" is truthy: a clean val)
        check_flag(v, arg)
    for arg, v in (("data_dir", data_dir), ("label_file", label_file)):  # (5 read as the folder "5")
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise TypeError(f"{arg} must be a path (str or os.PathLike) or None, got {type(v).__name__}")
    for arg, v in (("subset", subset), ("test_subset", test_subset), ("image_size", image_size)):
        if v is not None and (not is_int(v) or v < 1):  # (a numpy int is an int, as Config's subset)
            raise ValueError(f"{arg} must be a positive int or None, got {v!r}")
    subset, test_subset, image_size = (None if v is None else int(v) for v in (subset, test_subset, image_size))
    if name in HUMAN_NOISE and eps > 0:
        raise ValueError(f"eps must be 0 for {name} (its human labels are the noise), got {eps}")
    if label_file and name not in HUMAN_NOISE:  # (it would be ignored: the CLI refuses --label-file alike)
        raise ValueError(f"label_file is for {', '.join(HUMAN_NOISE)} (human labels), not {name}")
    if data_dir is not None and not str(data_dir).strip():  # ('' read as ./data without a word, as --out '' refused)
        raise ValueError(f"data_dir must be a folder path or None (./data), not empty, got {data_dir!r}")
    data_dir = Path(os.path.expanduser(str(data_dir or "data")))  # None: ./data
    raw = LOADERS[name](data_dir, name=name, download=download, image_size=image_size or 64, label_file=label_file)
    xtr, ytr_used, y_orig, xte, yte, nc, pad = (raw.x_train, raw.y_train, raw.y_train_clean, raw.x_test,
                                                raw.y_test, raw.num_classes, raw.pad)
    official_val = raw.val
    if len(xtr) == 0:
        raise DataError(f"{name}: the training file holds no images")
    if len(xte) == 0:  # (every test metric would be NaN, and best.json not JSON)
        raise DataError(f"{name}: the test file holds no images")
    if xte.shape[1:] != xtr.shape[1:]:
        raise DataError(f"{name}: test images {tuple(xte.shape[1:])} differ from training images {tuple(xtr.shape[1:])}")
    if subset is not None:
        keep = _subset(len(xtr), subset, raw.by_class)
        xtr, ytr_used, y_orig = xtr[keep], ytr_used[keep], y_orig[keep]
    if test_subset is not None:
        keep = _subset(len(xte), test_subset, raw.by_class)
        xte, yte = xte[keep], yte[keep]
    # per channel over the training images (an official validation split's too: training data)
    mean, std = _channel_stats(xtr if official_val is None else torch.cat([xtr, official_val[0]]))

    def make(x, y_used, y_clean):
        return Split(x, y_used.clone(), y_clean.clone(), torch.arange(len(y_used)),
                     y_used != y_clean, mean, std, pad)

    pool = make(xtr, ytr_used, y_orig)
    test = make(xte, yte, yte)
    if official_val is not None:
        train, val = pool, make(*official_val, official_val[1])
        val.index = val.index + len(pool)  # distinct from train's indices: file order after train
    else:
        n = len(pool)
        perm = torch.randperm(n, generator=seeded(seed, 1))
        n_val = min(math.floor(n * val_fraction + 1e-9), n - 1)  # (guard: 0.29 * 100; never past n - 1, as fraction < 1)
        val, train = pool.take(perm[:n_val].sort().values), pool.take(perm[n_val:].sort().values)
    if clean_val:
        val.y, val.noisy = val.y_clean.clone(), torch.zeros_like(val.noisy)
    if eps > 0:
        train.y, train.noisy = add_label_noise(train.y, eps, nc, kind=noise, generator=seeded(seed, 2))
        if not clean_val:
            val.y, val.noisy = add_label_noise(val.y, eps, nc, kind=noise, generator=seeded(seed, 3))
    c, h, w = xtr.shape[1:]
    return Splits(name, train, val, test, nc, c, (h, w), float(eps), noise, int(seed),
                  fingerprint(xtr, ytr_used, xte, yte, *(official_val or ())), official_val is not None, raw.source)


def _subset(n: int, k: int, by_class: bool) -> slice | torch.Tensor:
    """The first k of n images; for files listed class by class (imagefolder, flowers102), k spread
    evenly over them instead (image i*n//k), so that every class keeps its share."""
    return (torch.arange(k) * n) // k if by_class and k < n else slice(0, k)


def fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 (16 hex digits) over the shapes and bytes of the data actually loaded: a run records
    it and refuses to continue on different data (~0.1 s per 100 MB)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy())  # (the buffer itself: no copy)
    return h.hexdigest()[:16]


def _channel_stats(x: torch.Tensor):
    """Per-channel mean and std of uint8 images [N, C, H, W] on the [0, 1] scale, exact, from
    per-channel histograms of the 256 pixel values."""
    v = torch.arange(256, dtype=torch.float64) / 255
    hist = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])])
    hist = hist.double() / max(x.shape[0] * x[0, 0].numel(), 1)
    mean = hist @ v
    std = (hist @ (v * v) - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


# ------------------------------------------------------------------------------- batches
def iterate(split: Split, batch_size: int, *, shuffle: bool = False, augment: bool = False,
            generator: torch.Generator | None = None, drop_last: bool = False, device=None,
            with_index: bool = False, policy: str = "standard"):
    """Yield (x float32 [B, C, H, W] normalised, y int64 [B]) (plus `index` when with_index).

    shuffle: a random order from `generator`; augment: the split's augmentation (Split.pad), and
    with policy "autoaugment" then AutoAugment's CIFAR-10 policy per image and one Cutout square
    (Appendix D; _autoaugment_cutout), random draws from `generator` too, so a given generator
    state gives identical batches.
    Evaluation and entropy passes use augment=False. The order and every random draw come from
    the CPU `generator` whatever the split's device, so a GPU run sees the CPU run's batches."""
    if not isinstance(split, Split):
        raise TypeError(f"split must be a data.Split, got {type(split).__name__}")
    if split.x.dtype != torch.uint8:  # (ToTensor's floats in [0, 1] were divided by 255 again, silently)
        raise TypeError(f"split.x must be uint8 images [N, C, H, W] (pixels 0..255: iterate scales them by 1/255 and "
                        f"the split's mean/std), got {split.x.dtype}; convert ToTensor's or ConvertImageDtype's floats "
                        "in [0, 1] with (x * 255).round().to(torch.uint8)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for arg, v in (("shuffle", shuffle), ("augment", augment), ("drop_last", drop_last), ("with_index", with_index)):
        check_flag(v, arg)  # (augment="no" is truthy: augmented evaluation batches)
    _check_generator(generator)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    scale = (1.0 / (255.0 * split.std)).view(1, -1, 1, 1)
    shift = (-split.mean / split.std).view(1, -1, 1, 1)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        xb = split.x.index_select(0, idx.to(split.x.device))  # (much faster than x[idx] for uint8)
        if augment and split.pad > 0:
            xb = _shift_flip(xb, split.pad, generator)
        hole = None
        if augment and policy == "autoaugment":
            xb, hole = _autoaugment_cutout(xb, generator)
        xb = xb.float().mul_(scale).add_(shift)  # (x/255 - mean) / std, as one affine map
        if hole is not None:
            xb.masked_fill_(hole, 0.0)  # (Cutout zeroes the normalised image: the mean colour)
        yb = split.y.index_select(0, idx.to(split.y.device))
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield (xb, yb, split.index[idx]) if with_index else (xb, yb)


def _shift_flip(xb: torch.Tensor, pad: int, generator) -> torch.Tensor:
    """Per sample: zero-pad by `pad`, crop back at a random offset in [0, 2*pad]^2 (torchvision's
    RandomCrop(size, padding=pad) on black-padded images), flip horizontally with p = 1/2."""
    b, c, h, w = xb.shape
    xb = torch.nn.functional.pad(xb, (pad, pad, pad, pad))
    wp = w + 2 * pad
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)                                       # [B, h]
    cols = torch.where(flip[:, None], dx[:, None] + w - 1 - torch.arange(w),
                       dx[:, None] + torch.arange(w))                          # [B, w]
    # one gather over the flattened plane: out[b, c, i, j] = xb[b, c, rows[b, i], cols[b, j]]
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).to(xb.device).expand(b, c, h * w)
    return xb.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)


def _autoaugment_cutout(xb: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAugment's CIFAR-10 policy per image (torchvision, uint8), then Cutout (DeVries & Taylor
    2017, as AutoAugment's CIFAR runs use it): one square of side = half the image's shorter side
    (16 px at 32x32), centred uniformly over the image and clipped at its borders. Returns the
    images and the holes' mask [B, 1, H, W] (filled after normalisation). torchvision draws from
    the global RNG: it is seeded from `generator` inside fork_rng (the global RNG is left as it was,
    and the same generator state gives the same batch)."""
    from torchvision.transforms import v2
    b, _, h, w = xb.shape
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        xb = torch.stack([policy(img) for img in xb]) if b else xb
    side = max(1, min(h, w) // 2)
    cy, cx = torch.randint(0, h, (b,), generator=generator), torch.randint(0, w, (b,), generator=generator)
    ys, xs = torch.arange(h), torch.arange(w)
    in_y = (ys >= (cy - side // 2)[:, None]) & (ys < (cy - side // 2 + side)[:, None])  # [B, H]
    in_x = (xs >= (cx - side // 2)[:, None]) & (xs < (cx - side // 2 + side)[:, None])  # [B, W]
    return xb, (in_y[:, :, None] & in_x[:, None, :])[:, None].to(xb.device)
