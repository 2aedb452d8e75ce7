"""Shared test helpers: tolerances by dtype, the backends to test, devices."""
import os

import torch

# Without a GPU, Triton kernels run on CPU tensors under the interpreter. Triton reads the
# variable when a kernel is defined, so it is set before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402


HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Relative tolerance of a result computed in `dtype`, against an fp64 oracle run on the
# same (rounded) inputs. fp16/bf16 results are rounded to 11 and 8 significant bits.
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}


def assert_close(actual, expected, dtype, what=""):
    """`actual` equals the fp64 `expected` within the tolerance of `dtype`, measured against
    the largest magnitude of `expected` (so a gradient full of tiny softmax entries is
    judged against its target column). NaN must match NaN."""
    tol = TOLERANCE[dtype]
    expected = expected.double()
    magnitude = float(expected.abs().nan_to_num(0.0).max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * max(1.0, magnitude),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def device_backends():
    """(backend, device) pairs that this machine can test against the reference."""
    pairs = [pytest.param("cpu", "cpu", id="cpu")]
    if HAS_TRITON:
        dev = "cuda" if HAS_CUDA else "cpu"
        pairs.append(pytest.param("triton", dev, id="triton", marks=pytest.mark.triton))
    pairs.append(pytest.param("cuda", "cuda", id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]))
    return pairs


def pytest_collection_modifyitems(config, items):
    if not HAS_TRITON:
        skip = pytest.mark.skip(reason="Triton is not installed")
        for item in items:
            if "triton" in item.keywords:
                item.add_marker(skip)
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
