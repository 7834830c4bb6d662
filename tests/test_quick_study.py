"""The `quick` profile end to end on the real Fashion-MNIST (~10 min): `make test-slow`."""
import csv
import os

import pytest

from sparsetrain.experiment import study


@pytest.mark.slow
def test_quick_study_shows_the_pipeline(tmp_path):
    assert study.main(["fashion-mnist", "--profile", "quick", "--out", str(tmp_path)]) == 0
    rd = next(tmp_path.glob("fashion-mnist-eps0.2-quick-lenet300-*"))
    with open(rd / "seed0" / "teacher" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["sparsity"]) == pytest.approx(1 - 0.8 ** 24, abs=1e-4)  # 99.53%: below the 0.996 wall
    # the sparse engine takes over as sparsity grows
    assert int(rows[-1]["sparse_layers"]) >= 2 and int(rows[0]["sparse_layers"]) == 0
    assert os.path.getsize(rd / "accuracy_vs_sparsity.png") > 1000
    assert "no early stop" in (rd / "summary.md").read_text()
