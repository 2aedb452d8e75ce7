"""torch.library.opcheck and torch.compile(fullgraph=True) for every op."""
import pytest
import torch

import fusedloss

from conftest import assert_compiled_matches_eager, cpu_and_gpu_backends


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


@pytest.mark.parametrize("backend,device", cpu_and_gpu_backends())
def test_compile_fullgraph_margin(backend, device):
    def step(cos, target):
        return fusedloss.margin_cross_entropy(cos, target, m2=0.5, label_smoothing=0.1,
                                              backend=backend)

    cos = (torch.rand(8, 50, device=device) * 2 - 1).requires_grad_()
    target = torch.randint(0, 50, (8,), device=device)
    assert_compiled_matches_eager(step, (cos, target), ("loss", "grad"))


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


@pytest.mark.parametrize("backend,device", cpu_and_gpu_backends(["triton"]))
def test_compile_fullgraph_margin_linear(backend, device):
    def step(x, w, target):
        return fusedloss.linear_margin_cross_entropy(x, w, target, m2=0.5, backend=backend)

    x = torch.randn(8, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    target = torch.randint(0, 40, (8,), device=device)
    assert_compiled_matches_eager(step, (x, w, target),
                                  ("loss", "grad embeddings", "grad weight"))


def spherical_samples(device):
    """Argument tuples of fusedloss::spherical_z_loss covering its branches."""
    samples = []
    for dtype, grad, a, b in [(torch.float32, True, 1.0, 0.0), (torch.float32, False, 2.0, 0.5),
                              (torch.float64, True, 0.5, -1.0), (torch.bfloat16, True, 1.0, 0.0),
                              (torch.float16, True, 3.0, 1.0)]:
        logits = (torch.randn(5, 33, device=device) * 2 + 1).to(dtype).requires_grad_(grad)
        target = torch.randint(0, 33, (5,), device=device)
        target[0] = -100
        samples.append((logits, target, a, b, -100, grad))
    wide = torch.randn(6, 40, device=device)[:, :33].requires_grad_()  # row stride 40
    samples.append((wide, torch.randint(0, 33, (6,), device=device), 1.0, 0.0, -100, True))
    return samples


@pytest.mark.parametrize("backend,device", cpu_and_gpu_backends())
def test_compile_fullgraph_spherical(backend, device):
    def step(logits, target):
        return fusedloss.spherical_z_loss(logits, target, a=2.0, b=0.5, backend=backend)

    logits = (torch.randn(8, 50, device=device) + 3).requires_grad_()
    target = torch.randint(0, 50, (8,), device=device)
    target[2] = -100
    assert_compiled_matches_eager(step, (logits, target), ("loss", "grad"))


# The ops whose CPU kernels opcheck tests: the builder of their sample arguments, and how many
# samples it builds.
CPU_OPCHECK = {
    "margin_cross_entropy": (margin_samples, 8),
    "margin_linear_cross_entropy": (margin_linear_samples, 8),
    "spherical_z_loss": (spherical_samples, 6),
}


@pytest.mark.parametrize("op,sample", [(op, sample) for op, (_, count) in CPU_OPCHECK.items()
                                       for sample in range(count)])
def test_opcheck_cpu(op, sample):
    samples = CPU_OPCHECK[op][0]
    torch.library.opcheck(getattr(torch.ops.fusedloss, op), samples("cpu")[sample])


# Per family with GPU kernels: its module (whose OP.triton defines the Triton twin op), the
# builder of its sample arguments, how many samples it builds, and the ops run on each sample.
GPU_OPCHECK = {
    "margin": (fusedloss.margin, margin_samples, 8,
               ["margin_cross_entropy", "margin_cross_entropy_triton"]),
    "margin_linear": (fusedloss.margin_linear, margin_linear_samples, 8,
                      ["margin_linear_cross_entropy_triton"]),
    "spherical": (fusedloss.spherical, spherical_samples, 6,
                  ["spherical_z_loss", "spherical_z_loss_triton"]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("family,sample", [(family, sample)
                                           for family, (_, _, count, _) in GPU_OPCHECK.items()
                                           for sample in range(count)])
def test_opcheck_gpu(family, sample):
    module, samples, _, ops = GPU_OPCHECK[family]
    module.OP.triton  # defines the Triton twin
    args = samples("cuda")[sample]
    for op in ops:
        torch.library.opcheck(getattr(torch.ops.fusedloss, op), args)


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
    def step(x, labels):
        return fusedloss.supcon_loss(x, labels, backend="cpu")

    x = torch.randn(12, 8, requires_grad=True)
    assert_compiled_matches_eager(step, (x, torch.arange(12) % 4), ("loss", "grad embeddings"))
