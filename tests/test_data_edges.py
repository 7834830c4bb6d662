"""Dataset loaders' edge cases on tiny files written here: links in an ImageFolder tree, MNIST and
Fashion-MNIST told apart, loose IDX files beside a loaded copy."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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
