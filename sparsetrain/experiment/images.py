"""Image-file datasets (datasets.py's `flowers102` and `imagefolder` loaders): every image decoded
with PIL, its shorter side resized to `size` and center-cropped, as uint8 [3, size, size]; an image
that cannot be read is a DataError naming its file."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import numpy as np
import torch

from .dataset_errors import DataError, DatasetNotFound, brief_error, download_note
from .dataset_lock import download_guard

__all__ = ["pil_to_uint8", "read_image", "load_flowers", "load_imagefolder", "check_skipped_images",
           "SKIPPED_EXTENSIONS", "walk_links", "check_file_twice"]


def pil_to_uint8(img, size: int) -> torch.Tensor:
    """RGB uint8 [3, size, size]: shorter side resized to `size`, then center-cropped."""
    from PIL import Image
    _check_size(size)
    if not isinstance(img, (Image.Image, str, os.PathLike)) and not hasattr(img, "read"):
        raise TypeError(f"img must be a PIL image, a path or a binary file, got {type(img).__name__}")
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


def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:  # (0 failed in PIL's resize)
        raise ValueError(f"size must be a positive int, got {size!r}")


def read_image(path, size: int) -> torch.Tensor:
    """pil_to_uint8 of the file at `path`; DataError naming it where PIL cannot read it."""
    _check_size(size)  # (before the try: a bad size is no unreadable file)
    with _named(path):
        return pil_to_uint8(path, size)


@contextlib.contextmanager
def _named(path):
    """PIL's errors reading the image at `path` (a path, or words saying which image) as a DataError naming it,
    PIL's reason kept."""
    from PIL import Image
    try:
        yield
    except (OSError, ValueError) as e:  # (PIL: not an image, truncated, unreadable; a listed file missing)
        raise DataError(f"{path}: cannot be read as an image ({brief_error(e)})") from None
    except Image.DecompressionBombError as e:  # (an Exception only: over 2 * Image.MAX_IMAGE_PIXELS pixels)
        raise DataError(f"{path}: too large for PIL to decode ({brief_error(e)}); shrink the image or raise "
                        "PIL.Image.MAX_IMAGE_PIXELS") from None


def load_flowers(data_dir: Path, size: int, download: bool):
    try:
        from torchvision.datasets import Flowers102
        import scipy.io  # noqa: F401  (torchvision reads the label .mat files with it)
    except ImportError as e:
        raise ImportError(f"flowers102 needs scipy (torchvision reads its .mat labels): pip install scipy ({e})")
    out = []
    for split in ("train", "val", "test"):
        try:  # (a download under the lock other runs take turns under, its sockets with a timeout)
            with download_guard(data_dir) if download else contextlib.nullcontext():
                ds = Flowers102(str(data_dir), split=split, download=download)
        except Exception as e:
            base = data_dir / "flowers-102"
            if any((base / n).exists() for n in ("jpg", "imagelabels.mat", "setid.mat")):  # (a copy is there: why
                problems = _flowers_problems(base, Flowers102)  # torchvision refused it, not "not found")
                why = (f"fails torchvision's integrity check: {'; '.join(problems)}" +
                       (f" (download attempt failed: {brief_error(e)})" if download else "")
                       if problems else f"cannot be read ({brief_error(e)})")
                raise DataError(f"flowers102: {base} {why}; get the official files with torchvision.datasets."
                                f"Flowers102({str(data_dir)!r}, download=True) where the network allows")
            raise DatasetNotFound(
                f"flowers102 not found in {data_dir / 'flowers-102'} (jpg/, imagelabels.mat, "
                f"setid.mat){download_note(download, f'{type(e).__name__}: {e}')}. Get it with "
                f"torchvision.datasets.Flowers102({str(data_dir)!r}, download=True) where the network allows.")
        # (its file list and labels, not ds[i]: each image read once, a broken or missing one named;
        # torchvision's private names, so ds[i] where a version lacks them)
        if hasattr(ds, "_image_files") and hasattr(ds, "_labels"):
            paths = ds._image_files
            xs, labels = [read_image(path, size) for path in paths], ds._labels
        else:  # (ds[i] decodes the image: PIL's error named no file, now named by it)
            _check_size(size)
            xs, labels, paths = [], [], _flowers_files(data_dir / "flowers-102", split, len(ds))
            for i, path in enumerate(paths):
                with _named(path):
                    img, lab = ds[i]
                    xs.append(pil_to_uint8(img, size))
                labels.append(lab)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        _check_flowers_split(data_dir / "flowers-102", split, paths, labels)
        out += [torch.stack(xs), labels]
    return (*out, 102)


_FLOWERS_SPLITS = {"train": "trnid", "val": "valid", "test": "tstid"}  # (setid.mat's key of each split's ids)


def _check_flowers_split(base: Path, split: str, paths, labels: torch.Tensor) -> None:
    """A Flowers-102 split (its images' files or words, their labels as torchvision gives them: 0-based) must hold
    images (setid.mat listing none crashed in torch.stack, naming no file) with labels in 1..102 as
    imagelabels.mat holds them (others loaded as labels -1 or 102 of a 102-class dataset): a DataError naming
    the split, the file and, for a label, its first image."""
    if not len(labels):
        raise DataError(f"flowers102: {base / 'setid.mat'} lists no {split} images (its '{_FLOWERS_SPLITS[split]}' is "
                        "empty), where each split of Flowers-102 holds some (1020 train, 1020 val, 6149 test); restore "
                        "the official setid.mat")
    bad = ((labels < 0) | (labels > 101)).nonzero().flatten().tolist()
    if bad:
        raise DataError(f"flowers102: {base / 'imagelabels.mat'}: the {split} images' labels must lie in 1..102, got "
                        f"{int(labels[bad[0]]) + 1} for {paths[bad[0]]} ({len(bad)} of {len(labels)} outside); restore "
                        "the official imagelabels.mat")


def _flowers_files(base: Path, split: str, n: int) -> list:
    """The `n` files of a Flowers-102 split in torchvision's order (jpg/image_<id>.jpg, the ids in setid.mat), to
    name an image that ds[i] cannot read; where setid.mat does not tell them, the split and index in words."""
    try:
        from scipy.io import loadmat
        ids = loadmat(base / "setid.mat", squeeze_me=True)[_FLOWERS_SPLITS[split]]
        ids = np.atleast_1d(ids).tolist()
    except Exception:  # (names only: ds[i] read the file already, its own error is raised either way)
        ids = []
    if len(ids) == n:
        return [base / "jpg" / f"image_{int(i):05d}.jpg" for i in ids]
    return [f"flowers102: {split} image {i} (in {base / 'jpg'})" for i in range(n)]


def _flowers_problems(base: Path, flowers_cls) -> list:
    """What torchvision's Flowers102 integrity check refuses in `base`: jpg/ or a .mat file missing, or a
    .mat file whose md5 is not the official one's."""
    from torchvision.datasets.utils import check_md5
    problems = [] if (base / "jpg").is_dir() else [f"{base / 'jpg'} is not a folder of images"]
    mats = [v for k, v in getattr(flowers_cls, "_file_dict", {}).items() if k != "image"]  # (torchvision's private)
    for name, md5 in mats:
        p = base / name
        if not p.is_file():
            problems.append(f"{p} missing")
        elif not check_md5(str(p), md5):
            problems.append(f"{p} differs from the official file (md5 {md5} expected)")
    return problems


# image formats that torchvision's ImageFolder skips (it reads IMG_EXTENSIONS, in any case: .JPG, .webp too)
SKIPPED_EXTENSIONS = (".gif", ".jfif", ".jpe", ".avif", ".heic", ".heif", ".jxl", ".apng", ".jp2", ".j2k", ".ico",
                      ".tga", ".psd", ".pcx", ".pbm", ".pnm", ".pfm", ".dib", ".qoi", ".sgi", ".icns")


def check_skipped_images(root: Path, seen: dict | None = None, files: dict | None = None) -> None:
    """Images ImageFolder would skip without a word (a format of SKIPPED_EXTENSIONS in a class folder, or
    any image lying in `root` outside one): a DataError naming the folders and counts, so that a
    split never trains on fewer images than it holds. Other files (notes, .DS_Store) are not images."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    skip, root = {}, Path(root)  # (str or Path)
    for r, dirs, names in walk_links(root, seen, files):  # (ImageFolder follows links too; `files`: walk_links')
        top = Path(r) == root  # (there every image is outside a class folder)
        n = sum(f.lower().endswith(SKIPPED_EXTENSIONS + (IMG_EXTENSIONS if top else ())) for f in names)
        if n:
            skip[Path(r)] = n
    if skip:
        where = ", ".join(f"{d} ({n}{', outside any class folder' if d == root else ''})" for d, n in list(skip.items())[:4])
        n = sum(skip.values())
        raise DataError(f"imagefolder: {n} image{'s' * (n > 1)} ImageFolder would skip without a word, in {where}"
                        f"{' ...' if len(skip) > 4 else ''}: it reads {' '.join(IMG_EXTENSIONS)} files in a class "
                        "folder only; convert the images (or move them into their class folder) or remove them")


def walk_links(root: Path, seen: dict | None = None, files: dict | None = None):
    """os.walk(root, followlinks=True), as ImageFolder scans, in sorted order; a folder reached twice (by
    (st_dev, st_ino)) is a DataError naming the link: one back to a folder above it is a loop (read again
    down to the OS's 40 links; two such links doubled the scan per level: it never ended), one to another
    folder reads its images twice (under two classes). `seen`: the folders of another split walked before
    ({(st_dev, st_ino): path}, filled in), one of which reached again puts test images in training. A class
    folder (or a folder in one) that is a link to nothing (no folder to ImageFolder, which left the class or its
    images out) is a DataError too, saying whether its target does not exist or cannot be reached (a folder on
    the way not searchable), and so is a folder that cannot be listed (permission denied: os.walk, as
    ImageFolder, skipped its images). An image file ImageFolder reads (in a class folder) that is one file with
    another it reads, a symlink to it, is refused by check_file_twice (hard links load: dedup stores make them);
    `files` ({st_dev << 64 | st_ino: path}, filled in) holds another split's. Only links are resolved
    (os.scandir tells them, and a file's inode, without a stat): a tree without any pays nothing per file."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    seen, files = {} if seen is None else seen, {} if files is None else files
    root = Path(root)
    st = os.stat(root)
    first = seen.setdefault((st.st_dev, st.st_ino), root)
    if first != root:  # (val/ a link to train/)
        raise DataError(f"imagefolder: {root} is {first}: the same images in train and val (test images trained "
                        "on); give each split its own folder")
    todo = [(os.fspath(root), st.st_dev)]
    while todo:
        r, dev = todo.pop()
        dirs, names, flinks, inodes = _list(r)
        dirs.sort()
        gone = []
        for f in sorted(flinks):
            try:
                t = os.stat(os.path.join(r, f))  # (the target: a file, as the link is no folder)
                inodes[f] = (t.st_dev, t.st_ino)
            except OSError as e:
                gone.append((f, e))
        if gone:  # (a class folder's link to an unmounted disk: ImageFolder left the class out, num_classes fewer;
            # a link deeper down, to a folder of images or an image: those)
            _refuse_gone(Path(r), gone, top=r == str(root))
        if r != str(root):  # (in a class folder: the images ImageFolder reads, by the file each is: one int, one
            for f, ino in sorted(inodes.items()):  # str per file, no object the garbage collector tracks)
                if f.lower().endswith(IMG_EXTENSIONS):
                    key = ino[0] << 64 | ino[1] if isinstance(ino, tuple) else (dev or 0) << 64 | ino
                    path = os.path.join(r, f)
                    if files.setdefault(key, path) is not path:
                        check_file_twice(Path(files[key]), Path(path), root)
        devs = {}
        for d in dirs:
            p = Path(r) / d
            try:
                st = os.stat(p)
            except OSError:  # (os.walk skips what it cannot list too)
                continue
            devs[d] = st.st_dev
            first = seen.setdefault((st.st_dev, st.st_ino), p)
            if first != p:
                loop = first == Path(r) or first in Path(r).parents
                split = not (first == root or root in first.parents)  # (reached in another split)
                if split:
                    raise DataError(f"imagefolder: {p} and {first} are one folder (a link), in train and val: the same "
                                    "images in both splits (test images trained on); remove the link")
                raise DataError(f"imagefolder: {p} is a link to {first}, " + (
                    "a folder above it: a loop (its images read again at every level, or a scan never ending)" if loop
                    else "reached already: its images would be read twice") + "; remove the link")
        yield r, dirs, names
        # (depth first, in order: os.walk's top-down; a folder left out of `dirs` by the caller is not walked)
        todo.extend((os.path.join(r, d), devs.get(d)) for d in reversed(dirs))


def _list(r: str):
    """The folder `r`'s (dirs, files, file links, {file: inode}) as os.walk(followlinks=True) tells dirs from
    files (a link to a folder is a folder; one to nothing or to what cannot be reached is a file); the inodes of
    the files that are no link (d_ino: no stat); DataError if unlistable."""
    try:
        with os.scandir(r) as it:
            entries = list(it)
    except OSError as e:
        raise DataError(f"imagefolder: {e.filename or r} cannot be listed ({e.strerror or brief_error(e)}): its images "
                        "would be left out without a word; fix its permissions (or remove it)") from None
    dirs, files, flinks, inodes = [], [], [], {}
    for e in entries:
        try:
            is_dir = e.is_dir()  # (a stat for links only: d_type otherwise)
        except OSError:  # (a link whose target cannot be reached: os.walk's file too)
            is_dir = False
        (dirs if is_dir else files).append(e.name)
        try:
            link = not is_dir and e.is_symlink()
        except OSError:
            link = False
        if link:
            flinks.append(e.name)
        elif not is_dir:
            inodes[e.name] = e.inode()
    return dirs, files, flinks, inodes


def _refuse_gone(r: Path, gone: list, top: bool):
    """DataError naming the links in `r` ([(name, the OSError of their target's stat)]) to nothing or to what
    cannot be reached, each with its target and its errno's reason (ENOENT, ENOTDIR: it does not exist; EACCES:
    a folder on the way cannot be searched; any other, its reason) and what to do."""
    held = "a class folder there was" if top else "what it held would be"
    whys = [_why_gone(e) for _, e in gone]
    if len(gone) == 1:
        (f, _), (why, fix) = gone[0], whys[0]
        raise DataError(f"imagefolder: {r / f}: a link to {os.readlink(r / f)}, {why} ({held} left out without a "
                        f"word); {fix}")
    # (several: each with its own target and reason; the first's were said of all before)
    each = "; ".join(f"{r / f}: a link to {os.readlink(r / f)}, {why}: {fix}" for (f, _), (why, fix) in zip(gone[:4], whys))
    held = "class folders there were" if top else "what they held would be"
    raise DataError(f"imagefolder: {len(gone)} links in {r} lead to nothing ({held} left out without a word): "
                    f"{each}{f' (and {len(gone) - 4} more)' if len(gone) > 4 else ''}")


def _why_gone(e: OSError) -> tuple:
    """(why, fix) for a link whose target's stat raised `e`."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return "which does not exist", "mount or restore it, or remove the link"
    denied = e.errno in (errno.EACCES, errno.EPERM)
    why = (f"which cannot be reached ({e.strerror or brief_error(e)}" +
           (": a folder on the way to it cannot be searched)" if denied else ")"))
    return why, "fix the permissions on the way to it, or remove the link" if denied else "fix or remove the link"


def check_file_twice(first: Path, path: Path, root: Path) -> None:
    """Two images ImageFolder reads (`first`, walked before, and `path`, in the split at `root`) found to be one
    file by walk_links (by (st_dev, st_ino)), one of them a symlink to the other: a DataError naming both, the
    image loaded twice, under two labels, as a test image trained on, or as a duplicate sample of its own class
    (its count and the class balance off). Hard links, and two symlinks to one file outside the folders walked,
    load as they are: content-deduplicating stores make them (DVC's and git-annex's caches, `hardlink`), for
    images the dataset holds twice byte for byte. Confirmed by a stat of both (an overlay's d_ino may differ)."""
    if first.is_symlink() == path.is_symlink() or not os.path.samefile(first, path):
        return
    (a, ra), (b, rb) = (first, root if root in first.parents else None), (path, root)
    if b.is_symlink():
        (a, ra), (b, rb) = (b, rb), (a, ra)  # (a: the link, b: the image it leads to)
    ca, cb = (a.relative_to(ra).parts[0] if ra else None), (b.relative_to(rb).parts[0] if rb else None)
    why = ("an image of the other split: the same image in train and val (a test image trained on)" if ra != rb else
           f"an image of class {cb!r}: read twice, also as {ca!r}" if ca != cb else
           f"an image of its own class {ca!r}: read twice (a duplicate sample: the class's count and balance off)")
    raise DataError(f"imagefolder: {a} is a link to {b}, {why}; remove the link")


def load_imagefolder(data_dir: Path, size: int):
    from torchvision.datasets import ImageFolder
    if not (data_dir / "train").is_dir() or not (data_dir / "val").is_dir():
        raise DatasetNotFound(f"imagefolder needs {data_dir / 'train'} and {data_dir / 'val'}, each "
                              "with one sub-directory of images per class (ImageNet layout)")
    seen, files = {}, {}  # (the folders and image files walked: none in both splits, no image read twice)

    def folder(split):
        check_skipped_images(data_dir / split, seen, files)
        try:
            return ImageFolder(str(data_dir / split))
        except FileNotFoundError as e:  # (a class folder without images, or no class folder)
            raise DataError(f"imagefolder: {data_dir / split}: {brief_error(e)}") from None

    tr = folder("train")
    if len(tr.classes) == 1:  # (num_classes 1: cross-entropy 0 whatever the model predicts, nothing learnt)
        raise DataError(f"imagefolder: {data_dir / 'train'} holds one class folder ({tr.classes[0]!r}), where a "
                        "classifier needs 2 at least (with one its loss is 0 whatever it predicts); add a folder of "
                        "images per class")
    te = folder("val")
    if tr.classes != te.classes:
        only = sorted(set(tr.classes) ^ set(te.classes))[:5]
        raise DataError(f"imagefolder: the class folders of {data_dir / 'train'} and {data_dir / 'val'} differ "
                        f"({len(tr.classes)} and {len(te.classes)}; in one only: {', '.join(only) or 'none, in another order'})")

    def read(ds):
        return torch.stack([read_image(p, size) for p, _ in ds.samples]), torch.as_tensor(ds.targets, dtype=torch.int64)
    return (*read(tr), *read(te), len(tr.classes))
