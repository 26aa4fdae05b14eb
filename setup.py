"""Builds vitfast and its C++/CUDA extension vitfast._C.

CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*) are built when
the installed torch is a CUDA build and nvcc is found; VITFAST_BUILD_CUDA=0|1 forces the choice.
Triton kernels in kernels/ are installed as the subpackage vitfast.kernels.

Install (no build isolation: the extension compiles against the torch already installed):
    pip install --no-build-isolation -e ".[dev]"
"""
import glob
import os
import shutil
import sysconfig

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """A CUDA toolkit root holding both bin/nvcc and include/cuda_runtime.h.

    torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script outside
    the toolkit (e.g. /usr/local/bin/nvcc): the host compiler then misses crt/host_defines.h.
    """
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for root in filter(None, candidates):
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


if "CUDA_HOME" not in os.environ and _find_cuda_home():
    os.environ["CUDA_HOME"] = _find_cuda_home()  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    forced = os.environ.get("VITFAST_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _pip_cuda_include_dirs():
    """CUDA headers shipped by the nvidia-* wheels (ATen's CUDA headers need cusparse.h from there)."""
    site = sysconfig.get_paths()["purelib"]
    return [d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d)]


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    ldflags = ["-fopenmp"]
    if not _want_cuda():
        return CppExtension("vitfast._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=ldflags, py_limited_api=True)
    # sm_80 and sm_90a cubins, plus sm_90 PTX that newer GPUs can JIT ("a" targets are not
    # forward-compatible); override with TORCH_CUDA_ARCH_LIST.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;9.0+PTX")
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
    return CUDAExtension(
        "vitfast._C",
        sources + rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
        include_dirs=_pip_cuda_include_dirs(),
        define_macros=[("VITFAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=ldflags,
        py_limited_api=True,
    )


setup(
    name="vitfast",
    version="0.1.0",
    description="Fused kernels and training scripts for self-supervised Vision Transformers on small data",
    packages=find_packages(include=["vitfast", "vitfast.*"]) + ["vitfast.kernels"],
    package_dir={"vitfast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6", "numpy", "triton>=3.2; platform_system == 'Linux'",
        "scikit-learn",  # the embedded `digits` dataset, k-means for clustering accuracy
        "scipy",         # Hungarian matching (clustering accuracy), SVHN's .mat files
        "pillow",        # ImageFolder datasets
        "matplotlib",    # PNG curves in every run folder
        "tqdm",          # progress bars
    ],
    extras_require={
        "dev": ["pytest", "hypothesis", "ninja", "pybind11", "timm"],
        "xformers": ["xformers"],
    },
)
