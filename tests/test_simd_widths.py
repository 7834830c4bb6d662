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
# (every tile width), linear (tile widths 16 and 64, fp64), the BatchNorm passes fused around the
# conv (vector bodies and scalar tails, against nn.BatchNorm2d)
SELECTION = [
    "test_sparse_conv2d.py::test_many_tiles_chunks_and_threads",
    "test_sparse_conv2d.py::test_rectangular_kernels_strides_paddings",
    "test_sparse_conv2d.py::test_streamed_planes_and_stride2_rows",
    "test_sparse_conv2d.py::test_small_map_kernel_matches_dense_masked",
    "test_sparse_conv2d.py::test_small_map_kernel_float64_and_one_thread",
    "test_sparse_conv2d.py::test_float64",
    "test_sparse_linear.py::test_matches_dense_masked",
    "test_sparse_linear.py::test_large_batch_tiles_and_threads",
    "test_sparse_linear.py::test_float64",
    "test_fused.py::test_fused_matches_unfused",
    "test_fused.py::test_backward_relu_masks_are_the_forward_s_at_zero",
]


def _width(env_value):
    env = dict(os.environ, SPARSETRAIN_VEC_BYTES=env_value)
    out = subprocess.run([sys.executable, "-c", "from sparsetrain.engine.ops import simd_bytes; print(simd_bytes())"],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_detected_width_and_override():
    hw = simd_bytes()
    assert hw in (16, 32, 64)
    assert _width("16") == 16
    assert _width("32") == min(32, hw)   # narrows only: a wider clone is not the one running
    assert _width("64") == hw and _width("junk") == hw


@pytest.mark.parametrize("width", ["16", "32"])
def test_kernels_match_reference_at_narrower_widths(width):
    env = dict(os.environ, SPARSETRAIN_VEC_BYTES=width)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SELECTION],
                          cwd=HERE, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
