"""Builds fusedloss._C: the CPU kernels always, the CUDA kernels when they can be built.

FUSEDLOSS_CUDA=1 forces the CUDA build, FUSEDLOSS_CUDA=0 skips it; unset, CUDA is built
when nvcc and a CUDA-enabled torch are both present. TORCH_CUDA_ARCH_LIST picks the
architectures (torch's default otherwise).
"""
import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_decision():
    """Return (build_cuda, reason)."""
    flag = os.environ.get("FUSEDLOSS_CUDA", "").strip()
    if flag == "0":
        return False, "FUSEDLOSS_CUDA=0"
    if flag == "1":
        return True, "FUSEDLOSS_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return False, "nvcc is not on the PATH and CUDA_HOME is unset"
    return True, f"nvcc and torch {torch.__version__} (CUDA {torch.version.cuda}) found"


def _extension():
    include = [os.path.join(HERE, "csrc", "include")]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: the shift of each exponent must round exactly as the maximum it
    # was taken from, or the largest softmax entry comes out as exp(-ulp) instead of 1.
    # -fno-trapping-math -fno-math-errno (as torch itself is built): selects by floating-point
    # comparison (masks, relu, clamps) become vector blends and sqrt vectorises; no kernel
    # reads the floating-point exception flags or errno, and no result changes.
    cxx = ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno",
           "-fvisibility=hidden"]
    if os.environ.get("FUSEDLOSS_SANITIZE") == "1":
        cxx += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                "-fno-omit-frame-pointer", "-O1"]
    build_cuda, reason = _cuda_decision()
    _write_build_info(build_cuda, reason)
    if not build_cuda:
        print(f"fusedloss: building without CUDA kernels ({reason})")
        return CppExtension("fusedloss._C", sources, include_dirs=include,
                            extra_compile_args={"cxx": cxx},
                            extra_link_args=_sanitizer_link_args())
    macros = ["-DFUSEDLOSS_WITH_CUDA"]
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension(
        "fusedloss._C", sources, include_dirs=include,
        # nvcc keeps its default --fmad=true (contraction of a * b + c into an fma) for every
        # kernel; the one expression whose result is promised exact, z - M = 0 at the row
        # maximum, rounds z = s c and the difference explicitly (__fmul_rn, __fsub_rn in
        # csrc/cuda/margin.cu). .ci/run compiles the .cu files with these flags and ptxas -v.
        extra_compile_args={"cxx": cxx + macros,
                            "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=_sanitizer_link_args())


def _write_build_info(build_cuda, reason):
    """Record how _C was built, for fusedloss.backends() and python -m fusedloss.info."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "torch default") if build_cuda else ""
    with open(os.path.join(HERE, "python", "fusedloss", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"CUDA_BUILT = {build_cuda!r}\nCUDA_REASON = {reason!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\nTORCH_VERSION = {torch.__version__!r}\n")


def _sanitizer_link_args():
    return ["-fsanitize=address,undefined"] if os.environ.get("FUSEDLOSS_SANITIZE") == "1" else []


def _torch_requirement():
    """torch==<the release being built against>: the C++ ABI of _C matches that release only."""
    release = torch.__version__.split("+")[0]
    return f"torch=={release}"


setup(
    install_requires=[_torch_requirement()],
    packages=find_packages("python") + ["fusedloss.triton_kernels"],
    package_dir={"fusedloss": "python/fusedloss", "fusedloss.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
