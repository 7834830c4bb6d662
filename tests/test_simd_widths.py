"""The CPU kernels are templates over the register width (64 bytes AVX-512, 32 AVX2, 16 baseline)
and run the width of the CPU they are on. SPARSETRAIN_VEC_BYTES narrows it, so the narrower
instantiations (their split accumulator passes included) are checked against the dense reference
on whatever CPU runs the suite: the kernel tests are re-run in a subprocess per narrower width."""
import json
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


# {value: the width a fresh load of the kernels with SPARSETRAIN_VEC_BYTES=value runs}: one process
# imports torch (~2 s of the ~2.5 s a fresh process took), then forks a child per value that sets the
# variable and loads the extension (its width is read once, as the library loads: a fresh load each)
_WIDTHS = """
import json, os, sys, torch
values, pids = json.loads(sys.argv[1]), {}
for v in values:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.environ["SPARSETRAIN_VEC_BYTES"] = v
        from sparsetrain.engine.ops import simd_bytes
        os.write(w, str(simd_bytes()).encode())
        os._exit(0)
    os.close(w)
    pids[v] = (pid, r)
got = {}
for v, (pid, r) in pids.items():
    got[v] = int(os.read(r, 64).decode() or -1)
    assert os.waitpid(pid, 0)[1] == 0, v
print(json.dumps(got))
"""


def _widths(*env_values):
    env = {k: v for k, v in os.environ.items() if k != "SPARSETRAIN_VEC_BYTES"}
    out = subprocess.run([sys.executable, "-c", _WIDTHS, json.dumps(env_values)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_detected_width_and_override():
    hw = simd_bytes()
    assert hw in (16, 32, 64)
    got = _widths("16", "32", "64", "junk", "16abc", "16.9", " 16", "4294967312")
    assert got["16"] == 16
    assert got["32"] == min(32, hw)   # narrows only: a wider clone is not the one running
    assert got["64"] == hw and got["junk"] == hw
    # only exactly 16 or 32 narrow (atoi read these as 16; the last overflowed int)
    assert [got[v] for v in ("16abc", "16.9", " 16", "4294967312")] == [hw] * 4


@pytest.fixture(scope="module")
def narrower_runs(request):
    """{width: the pytest subprocess re-running SELECTION at it}, every selected width's started at
    once: each runs ~1 CPU core of kernel tests, side by side on a 2-core machine (one after the other
    they took ~45 s). Each with GOMP_SPINCOUNT=10000 (the study CLI's default, README): side by side,
    each one's OpenMP workers spun at the barriers on the cores the other needed (~3x the CPU time:
    20 s for both, 6-8 s with it)."""
    widths = sorted({item.callspec.params["width"] for item in request.session.items
                     if getattr(item, "originalname", "") == "test_kernels_match_reference_at_narrower_widths"})
    procs = {w: subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SELECTION],
                                 cwd=HERE, env={"GOMP_SPINCOUNT": "10000", **os.environ, "SPARSETRAIN_VEC_BYTES": w}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for w in widths}
    yield procs
    for p in procs.values():  # (one its test did not wait for, a session stopped early by -x: ended)
        if not p.stdout.closed:
            p.kill()
            p.communicate()


@pytest.mark.parametrize("width", ["16", "32"])
def test_kernels_match_reference_at_narrower_widths(width, narrower_runs):
    proc = narrower_runs[width]
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-4000:] + stderr[-2000:]
    assert " passed" in stdout and "failed" not in stdout
