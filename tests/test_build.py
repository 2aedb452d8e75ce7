"""The package as built: backends report themselves, import stays light, kernels stay torch-free."""
import pathlib
import re
import subprocess
import sys

import torch

import fusedloss

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_backends_report_availability_and_reason():
    status = fusedloss.backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert status["reference"].available and status["cpu"].available
    for name, (available, reason) in status.items():
        assert isinstance(available, bool) and reason, name
    if not torch.cuda.is_available():
        assert not status["cuda"].available and "CUDA" in status["cuda"].reason


def test_import_is_light():
    """Importing fusedloss loads neither Triton nor torch._dynamo."""
    code = ("import sys, fusedloss; "
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cuda_sources_include_no_torch_headers():
    heavy = re.compile(r'#include\s*[<"](torch|ATen|c10)/')
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        assert not heavy.search(path.read_text()), path


def test_every_schema_has_a_cpu_kernel():
    schemas = re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text())
    assert schemas
    for name in schemas:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{name}", "CPU"), name
