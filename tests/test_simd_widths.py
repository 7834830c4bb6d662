"""The CPU kernels are templates over the register width (64 bytes AVX-512, 32 AVX2, 16 baseline)
and run the width of the CPU they are on. SPARSETRAIN_VEC_BYTES narrows it, so the narrower
instantiations (their split accumulator passes included) are checked against the dense reference
on whatever CPU runs the suite: the kernel tests are re-run in a subprocess per narrower width."""
import os
import subprocess
import sys

import pytest

from sparsetrain.engine.ops import simd_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
# phase-plane conv (sparse and channel-blocked rows, strides, streamed rows, fp64), small-map conv
# (every tile width), strided 1x1 conv (every register block, fp64), linear (tile widths 16 and 64, fp64), the BatchNorm passes fused around the
# conv (vector bodies and scalar tails, against nn.BatchNorm2d)
SELECTION = [
    "test_sparse_conv2d.py::test_many_tiles_chunks_and_threads",
    "test_sparse_conv2d.py::test_rectangular_kernels_strides_paddings",
    "test_sparse_conv2d.py::test_streamed_planes_and_stride2_rows",
    "test_sparse_conv2d.py::test_small_map_kernel_matches_dense_masked",
    "test_sparse_conv2d.py::test_small_map_kernel_float64_and_one_thread",
    "test_sparse_conv2d.py::test_strided_1x1_kernel_matches_dense_masked",
    "test_sparse_conv2d.py::test_float64",
    "test_sparse_linear.py::test_matches_dense_masked",
    "test_sparse_linear.py::test_large_batch_tiles_and_threads",
    "test_sparse_linear.py::test_float64",
    "test_fused.py::test_fused_matches_unfused",
    "test_fused.py::test_backward_relu_masks_are_the_forward_s_at_zero",
]


def _widths(*env_values):  # {value: the width a fresh process with SPARSETRAIN_VEC_BYTES=value runs} (at once)
    code = "from sparsetrain.engine.ops import simd_bytes; print(simd_bytes())"
    procs = {v: subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, SPARSETRAIN_VEC_BYTES=v),
                                 stdout=subprocess.PIPE, text=True) for v in env_values}
    return {v: int(p.communicate(timeout=120)[0].strip()) for v, p in procs.items()}


def test_detected_width_and_override():
    hw = simd_bytes()
    assert hw in (16, 32, 64)
    got = _widths("16", "32", "64", "junk", "16abc", "16.9", " 16", "4294967312")
    assert got["16"] == 16
    assert got["32"] == min(32, hw)   # narrows only: a wider clone is not the one running
    assert got["64"] == hw and got["junk"] == hw
    # only exactly 16 or 32 narrow (atoi read these as 16; the last overflowed int)
    assert [got[v] for v in ("16abc", "16.9", " 16", "4294967312")] == [hw] * 4


@pytest.mark.parametrize("width", ["16", "32"])
def test_kernels_match_reference_at_narrower_widths(width):
    env = dict(os.environ, SPARSETRAIN_VEC_BYTES=width)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SELECTION],
                          cwd=HERE, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
