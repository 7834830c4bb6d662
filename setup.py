"""Builds the single C++ extension `sparsetrain._C` from every file under csrc/.

`make install` builds it in place (`setup.py build_ext --inplace`) in a build directory that
persists (build/temp.*), where ninja recompiles only the files whose sources or included headers
changed; the editable install of the package itself (`pip install -e .`) skips the extension
(SPARSETRAIN_SKIP_EXT=1) and finds the in-place library. ccache is used when its compiler links
are on PATH (the Makefile puts /usr/lib/ccache there when it exists).

Flags: -O3 -fopenmp -g0 -Wno-psabi by default (no debug info: 40% of a file's compile time). Opt in with
NATIVE=1 (adds -march=native) or DEBUG=1 (-O0 -g). Hot loops carry function multiversioning
(AVX-512 / AVX2 / baseline clones picked at load time), so a portable build still uses the
machine's vector units. No network access at build time.
"""
import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    """An on/off build switch from the environment: unset, empty or 0 is off, 1 on; anything else is
    off with a warning (NATIVE=yes was silently off; DEBUG and NATIVE are generic names that an
    environment may set for other tools, so not an error)."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        print(f"setup.py: warning: {name}={value!r} is neither 0 nor 1: off", file=sys.stderr)
    return value == "1"


def get_extensions():
    if _flag("SPARSETRAIN_SKIP_EXT"):
        return []
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    # the headers: in the sdist (it must build like a checkout) and, without ninja, rebuild triggers
    headers = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    if _flag("DEBUG"):
        cxx = ["-O0", "-g", "-fopenmp"]
    else:
        # (-Wno-psabi: GCC's notes on passing 64-byte vectors, about always-inline templates inside
        # this one library, not an interface)
        cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-g0", "-Wno-psabi"]
        if _flag("NATIVE"):
            cxx.append("-march=native")
    return [
        CppExtension(
            "sparsetrain._C",
            sources,
            depends=headers,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx + ["-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
