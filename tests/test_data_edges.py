"""Dataset loaders' edge cases on tiny files written here: links in an ImageFolder tree, MNIST and
Fashion-MNIST told apart, loose IDX files beside a loaded copy."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from sparsetrain.experiment import data as D

ROOT = Path(__file__).resolve().parents[1]


def _imagefolder(root, classes=("cat", "dog"), n=2):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_a_link_loop_in_an_imagefolder_is_refused_by_name(tmp_path):
    """ImageFolder's scan follows directory links: `train/cat/loop -> ..` read the class folders again at
    every level down to the OS's 40 links (82 images for 4), and two such links doubled the scan per level,
    which never ended. A folder reached twice is now a DataError naming the link (run in a subprocess
    with a timeout: the hang it was)."""
    _imagefolder(tmp_path)
    expected = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    os.symlink("..", tmp_path / "train" / "cat" / "loop")
    os.symlink("..", tmp_path / "train" / "dog" / "loop")
    code = ("import sys; from sparsetrain.experiment import data as D\n"
            "D.load_dataset('imagefolder', sys.argv[1], image_size=8, val_fraction=0.0, download=False)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                           timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the scan of an imagefolder with two link loops did not end")
    assert r.returncode == 1 and (f"DataError: imagefolder: {tmp_path / 'train' / 'cat' / 'loop'} is a link to "
                                  f"{tmp_path / 'train'}, a folder above it: a loop") in r.stderr, r.stderr
    (tmp_path / "train" / "dog" / "loop").unlink()  # (one loop: it loaded, each image many times)
    with pytest.raises(D.DataError, match=rf"{tmp_path / 'train' / 'cat' / 'loop'} is a link to {tmp_path / 'train'},"
                                          r" a folder above it: a loop .*; remove the link"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    (tmp_path / "train" / "cat" / "loop").unlink()
    os.symlink(tmp_path / "val", tmp_path / "val" / "dog" / "up")  # (an absolute link above it alike)
    with pytest.raises(D.DataError, match=rf"{tmp_path / 'val' / 'dog' / 'up'} is a link to {tmp_path / 'val'}, "
                                          "a folder above it"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    (tmp_path / "val" / "dog" / "up").unlink()
    # a link to another class folder: its images read twice (as dogs too)
    os.symlink("../cat", tmp_path / "train" / "dog" / "more")
    with pytest.raises(D.DataError, match=rf"{tmp_path / 'train' / 'dog' / 'more'} is a link to "
                                          rf"{tmp_path / 'train' / 'cat'}, reached already: its images would be read twice"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    (tmp_path / "train" / "dog" / "more").unlink()
    # links elsewhere (a class folder kept on another disk, the split itself a link) still load, as before
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "train" / "dog").rename(tmp_path / "elsewhere" / "dog")
    os.symlink(tmp_path / "elsewhere" / "dog", tmp_path / "train" / "dog")
    (tmp_path / "val").rename(tmp_path / "val-real")
    os.symlink("val-real", tmp_path / "val")
    s = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert torch.equal(s.train.x, expected.train.x) and torch.equal(s.train.y, expected.train.y)
    assert torch.equal(s.test.x, expected.test.x) and torch.equal(s.test.y, expected.test.y)


def test_loose_idx_files_beside_a_loaded_copy_are_named_in_a_warning(tmp_path, monkeypatch):
    """IDX files lying in DATA_DIR itself are never read (either dataset's); they were named only when nothing
    was found. With a download allowed the official copy was downloaded and loaded without a word about them
    (torchvision's download stood in for here: it writes the four files into DATA_DIR/MNIST/raw/); now a
    warning names them and where to move them, as it does beside a copy already in its folder."""
    import warnings

    from sparsetrain.experiment import datasets
    from sparsetrain.testing import write_mnist
    write_mnist(tmp_path, gz=True, n_train=12, n_test=4, seed=1)  # (loose: the user's, never read)
    calls = []

    def download(cls_name, data_dir):
        calls.append(cls_name)
        arrays.update(write_mnist(data_dir / cls_name / "raw", gz=False, n_train=10, n_test=5, seed=2))
    arrays = {}
    monkeypatch.setattr(datasets, "_download", download)
    note = (f"{tmp_path} holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            f"t10k-labels-idx1-ubyte.gz loose, never read there (MNIST's and Fashion-MNIST's files have the same names): "
            f"move them into {tmp_path / 'mnist'} if they are mnist's.")
    with pytest.warns(UserWarning) as w:
        s = D.load_dataset("mnist", tmp_path, val_fraction=0.0)
    assert calls == ["MNIST"] and [str(m.message) for m in w] == [
        f"mnist: loaded from {tmp_path / 'MNIST' / 'raw'} (downloaded); {note}"]
    assert torch.equal(s.train.y, torch.from_numpy(arrays["train-labels-idx1-ubyte"]))  # (the download's, not the loose)
    assert torch.equal(s.test.x[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).to(torch.uint8))
    with pytest.warns(UserWarning) as w:  # (the copy found in its folder: named alike, without the download)
        D.load_dataset("mnist", tmp_path, val_fraction=0.0, download=False)
    assert calls == ["MNIST"] and [str(m.message) for m in w] == [f"mnist: loaded from {tmp_path / 'MNIST' / 'raw'}; {note}"]
    for f in tmp_path.glob("*.gz"):  # (nothing loose: no warning)
        f.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = D.load_dataset("mnist", tmp_path, val_fraction=0.0, download=False)
    assert torch.equal(s.train.y, torch.from_numpy(arrays["train-labels-idx1-ubyte"]))


def test_a_val_fraction_just_under_1_leaves_a_training_image(tmp_path):
    """The validation split takes floor(N * val_fraction) images, with 1e-9 added against rounding (0.29 * 100 =
    28.999999999999996); for a fraction just under 1 that added image took the last training one: val_fraction
    1 - 1e-12 (in [0, 1), accepted) held out all 12, an empty training split. It keeps N - 1 at most now."""
    from sparsetrain.testing import write_mnist
    write_mnist(tmp_path / "mnist", gz=False, n_train=12, n_test=4)
    for vf, n_val in ((1 - 1e-12, 11), (0.95, 11), (0.5, 6), (0.29, 3), (0.0, 0)):
        s = D.load_dataset("mnist", tmp_path, val_fraction=vf, download=False)
        assert (len(s.train), len(s.val)) == (12 - n_val, n_val), vf
        assert sorted(s.train.index.tolist() + s.val.index.tolist()) == list(range(12))  # (disjoint, all of them)


def test_imagefolder_splits_sharing_a_folder_through_a_link_are_refused(tmp_path):
    """A link from one split into the other (train/dog/more -> ../../val/dog), or val/ a link to train/, read the
    same images into the training and the test split (test accuracy measured on training images) without a
    word; the folders walked are now shared by the two splits' scans, and one reached in both is refused."""
    _imagefolder(tmp_path)
    os.symlink(tmp_path / "val" / "dog", tmp_path / "train" / "dog" / "more")
    with pytest.raises(D.DataError, match=rf"imagefolder: {tmp_path / 'val' / 'dog'} and {tmp_path / 'train' / 'dog' / 'more'}"
                                          r" are one folder \(a link\), in train and val: the same images in both splits "
                                          r"\(test images trained on\); remove the link"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    (tmp_path / "train" / "dog" / "more").unlink()
    os.symlink("../../train/cat", tmp_path / "val" / "cat" / "old")
    with pytest.raises(D.DataError, match=rf"{tmp_path / 'val' / 'cat' / 'old'} and {tmp_path / 'train' / 'cat'} are one "
                                          "folder"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    (tmp_path / "val" / "cat" / "old").unlink()
    expected = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    (tmp_path / "val").rename(tmp_path / "val-real")
    os.symlink("train", tmp_path / "val")
    with pytest.raises(D.DataError, match=rf"imagefolder: {tmp_path / 'val'} is {tmp_path / 'train'}: the same images in "
                                          "train and val"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    (tmp_path / "val").unlink()
    os.symlink("val-real", tmp_path / "val")  # (a split that is a link of its own: loads, as before)
    s = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert torch.equal(s.test.x, expected.test.x) and torch.equal(s.train.x, expected.train.x)


def test_an_imagefolder_class_linked_to_a_missing_folder_is_refused(tmp_path):
    """A class folder that is a link to a folder that is gone (a disk not mounted) is no folder to ImageFolder:
    the class was left out of both splits without a word (one class fewer, its images untrained and untested).
    It is now a DataError naming the link and its target."""
    _imagefolder(tmp_path, classes=("cat", "dog", "eel"))
    expected = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert expected.num_classes == 3
    for split in ("train", "val"):
        (tmp_path / split / "eel").rename(tmp_path / f"{split}-eel")
        os.symlink(tmp_path / "disk" / split / "eel", tmp_path / split / "eel")
    with pytest.raises(D.DataError, match=rf"imagefolder: {tmp_path / 'train' / 'eel'}: a link to "
                                          rf"{tmp_path / 'disk' / 'train' / 'eel'}, which does not exist .*remove the link"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    (tmp_path / "disk").mkdir()  # (the disk mounted: the same data as before)
    for split in ("train", "val"):
        (tmp_path / "disk" / split).mkdir()
        (tmp_path / f"{split}-eel").rename(tmp_path / "disk" / split / "eel")
    s = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert s.num_classes == 3 and torch.equal(s.train.x, expected.train.x) and torch.equal(s.test.y, expected.test.y)


def test_a_failed_download_completing_torchvisions_partial_idx_copy_is_named(tmp_path, monkeypatch):
    """torchvision's MNIST/raw/ holding three of the four files is completed by a download where allowed; when
    that download failed the error said only that the folder held part of mnist (CIFAR's names the failed
    attempt): it now says why the copy was not completed, as CIFAR's does."""
    from sparsetrain.experiment import datasets
    from sparsetrain.testing import write_mnist
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw, gz=True, n_train=12, n_test=4)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    calls = []
    monkeypatch.setattr(datasets, "_download", lambda cls, d: calls.append((cls, d)) or "URLError: no network")
    with pytest.raises(D.DataError, match=rf"^{raw} holds part of mnist: t10k-labels-idx1-ubyte \[.gz\] missing "
                                          r"\(download attempt failed: URLError: no network\); complete the copy"):
        D.load_dataset("mnist", tmp_path)
    assert calls == [("MNIST", tmp_path)]
    with pytest.raises(D.DataError, match=rf"^{raw} holds part of mnist: t10k-labels-idx1-ubyte \[.gz\] missing; "):
        D.load_dataset("mnist", tmp_path, download=False)  # (no attempt: no such note)
    assert len(calls) == 1


def test_an_imagefolder_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """ImageFolder's scan (os.walk) skips a folder it cannot list (permission denied) without a word: the images of
    train/cat/more/ were left out (5 training images for 6). It is now a DataError naming the folder. As root, where
    chmod does not deny listing, os.scandir is made to fail for that folder; otherwise a real chmod 000 too."""
    _imagefolder(tmp_path)
    _imagefolder(tmp_path / "more", n=1)
    for split in ("train", "val"):  # (a subfolder in each class folder: ImageFolder reads it too)
        for c in ("cat", "dog"):
            (tmp_path / "more" / split / c).rename(tmp_path / split / c / "more")
    expected = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert (len(expected.train), len(expected.test)) == (6, 6)
    deny, scandir = tmp_path / "train" / "cat" / "more", os.scandir

    def refuse(path="."):
        if os.fspath(path) == str(deny):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)
    with monkeypatch.context() as m:
        m.setattr(os, "scandir", refuse)
        with pytest.raises(D.DataError, match=rf"^imagefolder: {deny} cannot be listed \(Permission denied\): its images "
                                              r"would be left out without a word; fix its permissions"):
            D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
        deny = tmp_path / "val"  # (a split's own folder alike)
        with pytest.raises(D.DataError, match=rf"^imagefolder: {deny} cannot be listed"):
            D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    if os.geteuid() != 0:  # (a real permission: denied to a user other than root)
        deny = tmp_path / "train" / "cat" / "more"
        deny.chmod(0)
        try:
            with pytest.raises(D.DataError, match=rf"^imagefolder: {deny} cannot be listed \(Permission denied\)"):
                D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
        finally:
            deny.chmod(0o755)
    s = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)  # (listable: as before)
    assert torch.equal(s.train.x, expected.train.x) and torch.equal(s.test.y, expected.test.y)


def test_loose_cifar_batches_in_the_data_dir_are_named(tmp_path):
    """CIFAR's batches are read from DATA_DIR/cifar-10-batches-py/ (cifar-100-python/) only; copied loose into
    DATA_DIR the not-found message listed where it looked but not the files the user had put in the wrong place
    (as the IDX loaders' does). Now it names them and where to move them, and so does a partial copy's message."""
    from sparsetrain.testing import write_cifar
    for name, c10, names in (("cifar10", True, [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]),
                             ("cifar100", False, ["train", "test", "meta"])):
        root = tmp_path / name
        x, y = write_cifar(root, c10=c10, n_per_batch=4, n_test=3)
        folder = root / ("cifar-10-batches-py" if c10 else "cifar-100-python")
        for f in folder.iterdir():
            f.rename(root / f.name)
        note = f" {root} holds {', '.join(names)} loose, never read there: move them into {folder}."
        with pytest.raises(D.DatasetNotFound) as e:
            D.load_dataset(name, root, download=False)
        assert str(e.value).startswith(f"{name} not found: looked for {folder / names[0]}, ") and str(e.value).endswith(
            f"into {root}.{note}"), str(e.value)
        (root / names[1]).rename(folder / names[1])  # (part of the copy in its folder: named with what it lacks)
        with pytest.raises(D.DataError) as e:
            D.load_dataset(name, root, download=False)
        rest = [n for n in names if n != names[1]]
        assert str(e.value) == (f"{folder} holds part of {name}: {', '.join(rest[:-1])} missing; "
                                f"complete the copy or remove it; {root} holds {', '.join(rest)} loose, never read there: "
                                f"move them into {folder}."), str(e.value)
        for n in rest:
            (root / n).rename(folder / n)
        (root / "train").mkdir(exist_ok=True)  # (a folder of that name, an imagefolder split: not a loose batch)
        s = D.load_dataset(name, root, val_fraction=0.0, download=False)
        assert torch.equal(s.train.x.reshape(len(x), -1), torch.from_numpy(x)) and torch.equal(s.train.y, torch.from_numpy(y))
        (folder / names[1]).unlink()
        with pytest.raises(D.DataError) as e:  # (nothing loose: no such note)
            D.load_dataset(name, root, download=False)
        assert str(e.value).endswith(f"{names[1]} missing; complete the copy or remove it"), str(e.value)


def test_the_dataset_warnings_point_at_the_caller_of_load_dataset(tmp_path):
    """The loose-IDX-files warning pointed at the caller of load_dataset, the class-counts one (stacklevel=2) at a line
    of datasets.py, where the user's code is not: both now point at the line calling load_dataset. Label files of
    Fashion-MNIST's counts in mnist/ (1x1 images) and IDX files loose in DATA_DIR raise both at once."""
    import inspect

    from sparsetrain.experiment.dataset_checks import IDX_COUNTS
    from sparsetrain.testing import write_idx, write_mnist
    rng = np.random.default_rng(0)
    (tmp_path / "mnist").mkdir()
    for split, counts in zip(("train", "t10k"), IDX_COUNTS["fashion-mnist"]):
        y = rng.permutation(np.repeat(np.arange(10), counts))
        write_idx(tmp_path / "mnist" / f"{split}-labels-idx1-ubyte", y, gz=False)
        write_idx(tmp_path / "mnist" / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (len(y), 1, 1)), gz=False)
    write_mnist(tmp_path, gz=True, n_train=12, n_test=4)  # (loose: never read)
    with pytest.warns(UserWarning) as w:
        line = inspect.currentframe().f_lineno + 1
        s = D.load_dataset("mnist", tmp_path, val_fraction=0.0, download=False)
    assert s.train.y.bincount(minlength=10).tolist() == list(IDX_COUNTS["fashion-mnist"][0])  # (loaded, as asked)
    got = sorted((str(m.message).split(";")[0][:40], m.filename, m.lineno) for m in w)
    assert got == [(f"mnist: loaded from {tmp_path / 'mnist'}"[:40], __file__, line),
                   (f"mnist: the images per class of {tmp_path / 'mnist'}"[:40], __file__, line)], got


def test_a_link_to_a_missing_folder_inside_a_class_folder_is_refused(tmp_path):
    """A class folder that is a link to nothing was refused; a link deeper down (train/cat/more -> a disk not mounted)
    was no folder to ImageFolder either, and its images were left out without a word (6 training images for 8). It
    is now a DataError naming the link and its target, as for a class folder."""
    _imagefolder(tmp_path)
    _imagefolder(tmp_path / "more")
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "more" / split / c).rename(tmp_path / split / c / "more")
    expected = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert (len(expected.train), len(expected.test)) == (8, 8)
    link, disk = tmp_path / "train" / "cat" / "more", tmp_path / "disk"
    link.rename(tmp_path / "cat-more")
    os.symlink(disk / "cat-more", link)
    with pytest.raises(D.DataError, match=rf"^imagefolder: {link}: a link to {disk / 'cat-more'}, which does not exist "
                                          r"\(what it held would be left out without a word\); mount or restore it"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    disk.mkdir()  # (the disk mounted: the same data as before)
    (tmp_path / "cat-more").rename(disk / "cat-more")
    s = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert torch.equal(s.train.x, expected.train.x) and torch.equal(s.train.y, expected.train.y)


def test_an_image_file_linked_into_another_class_or_split_is_refused(tmp_path, monkeypatch):
    """ImageFolder reads a file that is a link as the image it leads to: train/dog/2.png -> ../cat/0.png loaded that
    cat twice (once as a dog), and a link into val/ trained on a test image, without a word (folder links were
    checked, file links not). Such a link is now a DataError naming it and its target (a link from train into val
    too, checked once val is walked); a link to a file outside the dataset loads as before. Only links are
    resolved: a tree without any costs a stat per folder, none per file (an lstat per file was taken before)."""
    from sparsetrain.experiment import images
    _imagefolder(tmp_path)
    expected = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    train, val = tmp_path / "train", tmp_path / "val"
    for link, target, why in (
            (train / "dog" / "2.png", "../cat/0.png", r"an image of class 'cat': read twice, also as 'dog'"),
            (train / "cat" / "2.png", "../../val/cat/0.png", r"an image of the other split: the same image in train and val"),
            (val / "dog" / "2.png", train / "dog" / "1.png", r"an image of the other split: the same image in train and val")):
        os.symlink(target, link)
        shown = (link.parent / target).resolve()
        with pytest.raises(D.DataError, match=rf"^imagefolder: {link} is a link to {shown}, {why}.*; remove the link$"):
            D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
        link.unlink()
    os.symlink("../cat/0.png", train / "dog" / "2.png")  # (walk_links alone, as check_skipped_images calls it)
    with pytest.raises(D.DataError, match=rf"{train / 'dog' / '2.png'} is a link to {train / 'cat' / '0.png'}, an image"):
        list(images.walk_links(train))
    (train / "dog" / "2.png").unlink()
    (tmp_path / "outside").mkdir()  # (a file kept outside the dataset: loads, as before)
    (train / "dog" / "1.png").rename(tmp_path / "outside" / "1.png")
    os.symlink(tmp_path / "outside" / "1.png", train / "dog" / "1.png")
    s = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert torch.equal(s.train.x, expected.train.x) and torch.equal(s.train.y, expected.train.y)
    (train / "dog" / "1.png").unlink()
    (tmp_path / "outside" / "1.png").rename(train / "dog" / "1.png")
    calls, stat, lstat = [], os.stat, os.lstat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: calls.append(("stat", os.fspath(p))) or stat(p, *a, **k))
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: calls.append(("lstat", os.fspath(p))) or lstat(p, *a, **k))
    images.check_skipped_images(train)
    assert sorted(calls) == [("stat", str(p)) for p in (train, train / "cat", train / "dog")]


def test_a_link_whose_target_cannot_be_reached_says_so(tmp_path, monkeypatch):
    """A link to nothing was said to lead to a target that "does not exist" where it may exist but not be
    reachable (a folder on the way that cannot be searched, as a user other than root). The stat's errno now
    tells them apart: ENOENT does not exist, EACCES cannot be reached (permission denied), any other its reason
    (a link to itself). As root, where chmod does not deny the search, os.stat is made to fail for the link."""
    _imagefolder(tmp_path)
    link, locked = tmp_path / "train" / "cat" / "more", tmp_path / "locked"
    os.symlink(locked / "cat-more", link)
    kw = dict(image_size=8, val_fraction=0.0, download=False)
    with pytest.raises(D.DataError, match=rf"^imagefolder: {link}: a link to {locked / 'cat-more'}, which does not exist "
                                          r"\(what it held would be left out without a word\); mount or restore it"):
        D.load_dataset("imagefolder", tmp_path, **kw)
    denied = (rf"^imagefolder: {link}: a link to {locked / 'cat-more'}, which cannot be reached \(Permission denied: a "
              r"folder on the way to it cannot be searched\) \(what it held would be left out without a word\); fix the "
              r"permissions on the way to it, or remove the link$")
    stat = os.stat

    def refuse(p, *a, **k):
        if os.fspath(p) == str(link):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return stat(p, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(os, "stat", refuse)
        with pytest.raises(D.DataError, match=denied):
            D.load_dataset("imagefolder", tmp_path, **kw)
    if os.geteuid() != 0:  # (a real permission: denied to a user other than root)
        (locked / "cat-more").mkdir(parents=True)
        locked.chmod(0)
        try:
            with pytest.raises(D.DataError, match=denied):
                D.load_dataset("imagefolder", tmp_path, **kw)
        finally:
            locked.chmod(0o755)
    link.unlink()
    os.symlink("self.png", tmp_path / "train" / "cat" / "self.png")  # (a loop: its reason)
    with pytest.raises(D.DataError, match=rf"self.png: a link to self.png, which cannot be reached \(Too many levels of "
                                          r"symbolic links\) .*; fix or remove the link$"):
        D.load_dataset("imagefolder", tmp_path, **kw)


def test_an_image_linked_within_its_class_is_refused_and_dedup_stores_hard_links_load(tmp_path):
    """A symlink to an image of its own class (train/cat/2.png -> 0.png) loaded that image twice without a word: a
    duplicate sample (the class's count and balance off); it is a DataError naming both, as a link into another
    class or split is. Hard links (in one class, two classes, both splits) and two symlinks to one file outside
    the dataset are what content-deduplicating stores (DVC, git-annex, `hardlink`) make of byte-identical
    images: they load, each path a sample, as ImageFolder lists them."""
    _imagefolder(tmp_path)
    train, val = tmp_path / "train", tmp_path / "val"
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.png").write_bytes((train / "cat" / "0.png").read_bytes())
    os.symlink("0.png", train / "cat" / "2.png")
    with pytest.raises(D.DataError) as e:
        D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert str(e.value) == (f"imagefolder: {train / 'cat' / '2.png'} is a link to {train / 'cat' / '0.png'}, an image "
                            "of its own class 'cat': read twice (a duplicate sample: the class's count and balance "
                            "off); remove the link")
    (train / "cat" / "2.png").unlink()
    for links in ([("sym", tmp_path / "outside" / "x.png", train / "dog" / "5.png"),
                   ("sym", tmp_path / "outside" / "x.png", train / "dog" / "6.png")],
                  [("hard", train / "cat" / "0.png", train / "cat" / "2.png")],
                  [("hard", train / "cat" / "0.png", train / "dog" / "2.png")],
                  [("hard", val / "dog" / "1.png", train / "cat" / "2.png")]):
        for kind, target, link in links:
            (os.symlink if kind == "sym" else os.link)(target, link)
        s = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
        want = ImageFolder(str(train))  # (the reference: what torchvision lists, each path a sample)
        assert len(s.train) == len(want) == 4 + len(links)
        assert s.train.y.tolist() == [y for _, y in want.samples]
        for _, _, link in links:
            link.unlink()


def test_several_dangling_links_in_a_folder_are_each_named_with_their_own_target_and_reason(tmp_path):
    """Several links to nothing in one folder were named together as "a link to" the first one's target, with
    the first one's reason (a link to itself was said to lead to the first link's missing file, "which does not
    exist"). Each is now named with its own target, reason and fix; one alone reads as before."""
    _imagefolder(tmp_path)
    cat = tmp_path / "train" / "cat"
    os.symlink(tmp_path / "gone" / "x.png", cat / "a.png")  # (ENOENT)
    os.symlink("self.png", cat / "self.png")  # (ELOOP)
    with pytest.raises(D.DataError) as e:
        D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert str(e.value) == (
        f"imagefolder: 2 links in {cat} lead to nothing (what they held would be left out without a word): "
        f"{cat / 'a.png'}: a link to {tmp_path / 'gone' / 'x.png'}, which does not exist: mount or restore it, or "
        f"remove the link; {cat / 'self.png'}: a link to self.png, which cannot be reached (Too many levels of "
        "symbolic links): fix or remove the link")


def test_an_imagefolder_of_one_class_is_refused_by_folder(tmp_path):
    """train/ and val/ holding one class folder each loaded as a 1-class dataset (num_classes 1: a loss of 0 whatever
    the model predicts, a run that learns nothing without a word); now a DataError naming the folder and its class.
    Two classes load as before."""
    _imagefolder(tmp_path, classes=("cat",))
    with pytest.raises(D.DataError, match=rf"^imagefolder: {tmp_path / 'train'} holds one class folder \('cat'\), where "
                                          r"a classifier needs 2 at least \(with one its loss is 0 whatever it predicts\); "
                                          r"add a folder of images per class$"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, download=False)
    _imagefolder(tmp_path, classes=("dog",))
    s = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert s.num_classes == 2 and s.train.y.tolist() == [0, 0, 1, 1]
