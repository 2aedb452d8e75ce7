"""torch.library.opcheck and torch.compile(fullgraph=True) for every op."""
import pytest
import torch

import fusedloss

from conftest import HAS_CUDA, assert_close


def margin_samples(device):
    """Argument tuples of fusedloss::margin_cross_entropy covering its branches."""
    def make(n, c, dtype, requires_grad):
        cos = (torch.rand(n, c, device=device) * 2 - 1).to(dtype).requires_grad_(requires_grad)
        target = torch.randint(0, c, (n,), device=device)
        target[0] = -100
        return cos, target

    acc = torch.float32
    samples = []
    for dtype, grad in [(torch.float32, True), (torch.float32, False), (torch.float64, True),
                        (torch.bfloat16, True)]:
        cos, target = make(5, 33, dtype, grad)
        a = torch.float64 if dtype == torch.float64 else acc
        samples.append((cos, target, None, None, 64.0, 1.0, 0.5, 0.0, False, 0.1, 1e-3, -100,
                        grad))
        samples.append((cos, target, torch.full((5,), 0.4, dtype=a, device=device),
                        torch.full((5,), 0.1, dtype=a, device=device), 30.0, 1.35, 0.0, 0.0, True,
                        0.0, 0.0, -100, grad))
    return samples


@pytest.mark.parametrize("sample", range(8))
def test_opcheck_margin_cpu(sample):
    torch.library.opcheck(torch.ops.fusedloss.margin_cross_entropy, margin_samples("cpu")[sample])


def _margin_step(backend):
    def step(cos, target):
        return fusedloss.margin_cross_entropy(cos, target, m2=0.5, label_smoothing=0.1, backend=backend)
    return step


def _check_compiled(backend, device):
    cos = (torch.rand(8, 50, device=device) * 2 - 1).requires_grad_()
    target = torch.randint(0, 50, (8,), device=device)
    compiled = torch.compile(_margin_step(backend), fullgraph=True)
    loss = compiled(cos, target)
    loss.backward()
    grad = cos.grad.clone()
    cos.grad = None
    eager = _margin_step(backend)(cos, target)
    eager.backward()
    assert_close(loss.detach(), eager.detach().double(), torch.float32, "loss")
    assert_close(grad, cos.grad.double(), torch.float32, "grad")


def test_compile_fullgraph_margin_cpu():
    torch._dynamo.reset()
    _check_compiled("cpu", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compile_fullgraph_margin_gpu(backend):
    torch._dynamo.reset()
    _check_compiled(backend, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("sample", range(8))
def test_opcheck_margin_gpu(sample):
    args = margin_samples("cuda")[sample]
    torch.library.opcheck(torch.ops.fusedloss.margin_cross_entropy, args)
    fusedloss.margin.OP.triton  # defines the Triton twin
    torch.library.opcheck(torch.ops.fusedloss.margin_cross_entropy_triton, args)


def margin_linear_samples(device):
    """Argument tuples of fusedloss::margin_linear_cross_entropy covering its branches."""
    samples = []
    for dtype, grad, normalize in [(torch.float32, True, True), (torch.float32, False, True),
                                   (torch.float64, True, False), (torch.bfloat16, True, True)]:
        x = torch.randn(6, 12, device=device).to(dtype).requires_grad_(grad)
        w = torch.randn(21, 12, device=device).to(dtype).requires_grad_(grad)
        target = torch.randint(0, 21, (6,), device=device)
        target[1] = -100
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        row = torch.linspace(0.5, 1.5, 6, dtype=acc, device=device)
        samples.append((x, w, target, None, None, None, 64.0, 1.0, 0.5, 0.0, False, 0.1, 0.0,
                        -100, normalize, 0, False, grad))
        samples.append((x, w, target, row * 0.4, row * 0.1, row, 30.0, 1.35, 0.0, 0.0, True, 0.0,
                        1e-3, -100, normalize, 4, True, grad))
    return samples


@pytest.mark.parametrize("sample", range(8))
def test_opcheck_margin_linear_cpu(sample):
    torch.library.opcheck(torch.ops.fusedloss.margin_linear_cross_entropy,
                          margin_linear_samples("cpu")[sample])


def _check_linear_compiled(backend, device):
    def step(x, w, target):
        return fusedloss.linear_margin_cross_entropy(x, w, target, m2=0.5, backend=backend)

    x = torch.randn(8, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    target = torch.randint(0, 40, (8,), device=device)
    loss = torch.compile(step, fullgraph=True)(x, w, target)
    loss.backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    eager = step(x, w, target)
    eager.backward()
    assert_close(loss.detach(), eager.detach().double(), torch.float32, "loss")
    assert_close(grads[0], x.grad.double(), torch.float32, "grad embeddings")
    assert_close(grads[1], w.grad.double(), torch.float32, "grad weight")


def test_compile_fullgraph_margin_linear_cpu():
    torch._dynamo.reset()
    _check_linear_compiled("cpu", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_compile_fullgraph_margin_linear_triton():
    torch._dynamo.reset()
    _check_linear_compiled("triton", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("sample", range(8))
def test_opcheck_margin_linear_triton(sample):
    fusedloss.margin_linear.OP.triton  # defines the Triton op
    torch.library.opcheck(torch.ops.fusedloss.margin_linear_cross_entropy_triton,
                          margin_linear_samples("cuda")[sample])
