"""Builds glowfast._C (csrc/) with torch.utils.cpp_extension.

The C++ (CPU) kernels are always built; the CUDA kernels are added when torch is a CUDA build and
nvcc is found. Install with `pip install --no-build-isolation -e .` after torch (see README).
"""

import glob
import os
import shutil
import sys

# Without a GPU, cpp_extension guesses CUDA_HOME=/usr/local and finds no arch list; set sane defaults
# before importing it. The environment overrides both.
if os.path.isdir("/usr/local/cuda"):
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    if os.environ.get("GLOWFAST_NO_CUDA", "0") == "1":
        return False
    has_nvcc = CUDA_HOME is not None and (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None
    )
    return torch.version.cuda is not None and has_nvcc


def _openmp_flags() -> list[str]:
    """-fopenmp where torch's CPU parallel backend is OpenMP (Linux builds): ATen's at::parallel_for is a header
    template that runs its loop in parallel only if the *extension* is compiled with OpenMP (_OPENMP defines
    INTRA_OP_PARALLEL); without the flag the CPU kernels ran on one thread whatever torch.get_num_threads() said.
    Compile flag only, not a link flag: the OpenMP symbols then resolve to the runtime libtorch_cpu already loads
    (torch's bundled libgomp), never a second copy from the system compiler."""
    if os.environ.get("GLOWFAST_NO_OPENMP", "0") == "1" or not sys.platform.startswith("linux"):
        return []
    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def extensions():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    openmp = _openmp_flags()
    cxx_flags = ["-O3", "-std=c++20", *openmp]
    if _want_cuda():
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        return [
            CUDAExtension(
                "glowfast._C",
                sources,
                define_macros=[("WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
            )
        ]
    return [CppExtension("glowfast._C", sources, extra_compile_args={"cxx": cxx_flags})]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
