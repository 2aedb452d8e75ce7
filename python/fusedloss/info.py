"""`python -m fusedloss.info`: the version, the backends built and why any is missing, the
torch and Triton versions, the CUDA architectures of the build, and every public function
with its family, its ops and the backends that run it here (from the op registry)."""
import importlib.metadata
import platform

import torch

import fusedloss
from fusedloss import _ops, specs


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main():
    build = _ops._build_info
    print(f"fusedloss {fusedloss.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or 'none'}), triton {_version('triton')}")
    if build is not None:
        print(f"built against torch {build.TORCH_VERSION}; CUDA kernels: "
              f"{'yes, archs ' + build.CUDA_ARCHS if build.CUDA_BUILT else 'no (' + build.CUDA_REASON + ')'}")
    if _ops._C is None:
        print(f"fusedloss._C (the cpu and cuda kernels) failed to load: {_ops._C_ERROR}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    for name, status in fusedloss.backends().items():
        print(f"  {name:<9} {'yes' if status.available else 'no '}  {status.reason}")
    print_ops()


def print_ops():
    """One line per public function: family, ops, and the backends with a kernel that can run
    here (the reference backend always can)."""
    available = {name for name, status in fusedloss.backends().items() if status.available}
    print(f"{'function':<37} {'family':<10} {'backends here':<24} ops")
    for spec in specs.registry():
        here = ["reference"] + [b for b in spec.backends if b in available
                                and all(b == "triton" or b in _ops.kernel_backends(op)
                                        for op in spec.ops)]
        print(f"{spec.name:<37} {spec.family:<10} {', '.join(here):<24} "
              f"{', '.join(spec.ops) or '(torch ops)'}")


if __name__ == "__main__":
    main()
