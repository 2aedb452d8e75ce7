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


def pair_samples(device):
    """(op, args) of the three pair ops: every kind, both distances, with and without a
    reference set and mining thresholds."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=g).to(device).requires_grad_()
    ref = torch.randn(9, 8, generator=g).to(device).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 0], device=device)
    ref_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2], device=device)
    ops = torch.ops.fusedloss
    thresholds, _ = ops.pair_extrema(x.detach(), labels, x.detach(), labels, 0, 0, 0)
    thresholds = thresholds.flip(1).contiguous()
    samples = [(ops.pair_extrema, (x, labels, ref, ref_labels, d, -1, 0)) for d in (0, 1)]
    samples.append((ops.pair_extrema, (x, labels, x, labels, 0, 0, 4)))
    stats_args = [
        (x, labels, x, labels, thresholds, 0, 0, [2.0, 50.0, 0.5, 0.1], 0, 0),
        (x, labels, ref, ref_labels, None, 0, 0, [2.0, 50.0, 0.5, 0.1], -1, 3),
        (x, labels, ref, ref_labels, None, 1, 0, [0.1], -1, 0),
        (x, labels, ref, ref_labels, None, 2, 1, [0.0, 1.0], 4, 0),
        (x, labels, x, labels, None, 2, 0, [1.0, 0.0], 0, 0),
    ]
    samples += [(ops.pair_row_stats, args) for args in stats_args]
    for args in stats_args[1:3]:
        stats = ops.pair_row_stats(*(a.detach() if torch.is_tensor(a) else a for a in args))
        grad_stats = torch.ones_like(stats)
        samples.append((ops.pair_row_stats_backward,
                        (grad_stats, stats, *(a.detach() if torch.is_tensor(a) else a
                                              for a in args), True, True)))
    return samples


@pytest.mark.parametrize("sample", range(10))
def test_opcheck_pairs_cpu(sample):
    op, args = pair_samples("cpu")[sample]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_pairs_cpu():
    torch._dynamo.reset()

    def step(x, labels):
        return fusedloss.supcon_loss(x, labels, backend="cpu")

    x = torch.randn(12, 8, requires_grad=True)
    labels = torch.arange(12) % 4
    loss = torch.compile(step, fullgraph=True)(x, labels)
    loss.backward()
    grad = x.grad.clone()
    x.grad = None
    step(x, labels).backward()
    assert_close(grad, x.grad.double(), torch.float32, "grad embeddings")
