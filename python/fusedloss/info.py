"""`python -m fusedloss.info`: the version, the backends built and why any is missing, the
torch and Triton versions and the CUDA architectures of the build."""
import importlib.metadata
import platform

import torch

import fusedloss
from fusedloss import _ops


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


if __name__ == "__main__":
    main()
