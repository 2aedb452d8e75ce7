"""What is particular to LDR-KL (fusedloss.ldr_kl_loss, linear_ldr_kl_loss): its identities,
gradients in fp64, the per-row temperature without a gradient, the authors' preprocessing.
The oracle comparisons over every sample, backend and bad input come from the specs."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.reference import ldr_kl as reference

from conftest import cpu_and_gpu_backends

BACKENDS = cpu_and_gpu_backends()


def _inputs(n=6, c=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype)
    return z, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_fp64(backend, device):
    z, t = _inputs()
    z, t = z.to(device).requires_grad_(), t.to(device)
    lam = torch.linspace(0.3, 2.0, 6, dtype=torch.float64, device=device)
    for kw in (dict(lam=0.7, margin=1.5), dict(lam=lam)):
        assert torch.autograd.gradcheck(
            lambda x: fusedloss.ldr_kl_loss(x, t, backend=backend, **kw), (z,))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_lam_matches_the_fp64_oracle(backend, device, dtype):
    z, t = _inputs(7, 33, seed=3, dtype=dtype)
    t[2] = -100
    z, t = z.to(device).requires_grad_(), t.to(device)
    lam = torch.linspace(0.2, 2.5, 7, device=device)
    got = fusedloss.ldr_kl_loss(z, t, lam=lam, margin=0.5, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(got.sum(), z)
    z64 = z.detach().double().requires_grad_()
    want = reference.ldr_kl_loss(z64, t, lam=lam.double(), margin=0.5, reduction="none")
    (grad64,) = torch.autograd.grad(want.sum(), z64)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(grad.double(), grad64, **tol)


def test_margin_zero_lam_one_is_cross_entropy_minus_log_c():
    """lam = 1, margin = 0: log((1/C) sum exp(z_k - z_y)) = CE - log C."""
    z, t = _inputs()
    got = fusedloss.ldr_kl_loss(z, t, lam=1.0, margin=0.0, reduction="none")
    torch.testing.assert_close(got, F.cross_entropy(z, t, reduction="none") - math.log(11))


def test_large_lam_tends_to_the_mean_margin_gap():
    """lam -> inf: lam log mean exp(a_k / lam) -> mean_k a_k, a_k = z_k - z_y + c [k != y]."""
    z, t = _inputs()
    a = z - z.gather(1, t[:, None]) + 2.0 * (1 - F.one_hot(t, 11).double())
    got = fusedloss.ldr_kl_loss(z, t, lam=1e6, reduction="none")
    torch.testing.assert_close(got, a.mean(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lam_tensor_takes_no_gradient_and_equals_rowwise_floats(backend, device):
    z, t = _inputs(dtype=torch.float32)
    z, t = z.to(device).requires_grad_(), t.to(device)
    lam = torch.tensor([0.2, 0.5, 1.0, 2.0, 3.0, 9.0], device=device, requires_grad=True)
    rows = fusedloss.ldr_kl_loss(z, t, lam=lam, reduction="none", backend=backend)
    rows.sum().backward()
    assert lam.grad is None
    each = torch.stack([fusedloss.ldr_kl_loss(z[i:i + 1], t[i:i + 1], lam=float(lam[i]),
                                              backend=backend) for i in range(6)])
    torch.testing.assert_close(rows, each, rtol=1e-5, atol=1e-5)


def test_authors_softplus_preprocessing_is_the_callers():
    """LDRLoss_V1's optional transform: z -> softplus(z) / mean(softplus(z)) per row, done by
    the caller; the gradient flows through it."""
    z, t = _inputs()
    z.requires_grad_()
    pre = lambda x: F.softplus(x) / F.softplus(x).mean(dim=1, keepdim=True)  # noqa: E731
    fused = fusedloss.ldr_kl_loss(pre(z), t)
    (g_fused,) = torch.autograd.grad(fused, z)
    oracle = reference.ldr_kl_loss(pre(z), t)
    (g_oracle,) = torch.autograd.grad(oracle, z)
    torch.testing.assert_close(fused, oracle)
    torch.testing.assert_close(g_fused, g_oracle)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "cuda"])
def test_linear_form_with_bias_and_row_lam_matches_logits(backend, device):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(9, 7, generator=g, dtype=torch.float64, device="cpu").to(device)
    w = torch.randn(21, 7, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(21, generator=g, dtype=torch.float64).to(device)
    t = torch.randint(0, 21, (9,), generator=g).to(device)
    lam = torch.linspace(0.4, 3.0, 9, dtype=torch.float64, device=device)
    leaves = [x.requires_grad_() for x in (h, w, b)]
    fused = fusedloss.linear_ldr_kl_loss(h, w, t, b, lam=lam, backend=backend)
    logits = fusedloss.ldr_kl_loss(F.linear(h, w, b), t, lam=lam, backend="reference")
    for a, e in zip(torch.autograd.grad(fused, leaves), torch.autograd.grad(logits, leaves)):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(fused, logits)


def test_modules_are_the_functions_with_their_keywords():
    z, t = _inputs(dtype=torch.float32)
    lam = torch.linspace(0.5, 2.0, 6)
    loss = fusedloss.nn.LDRKLLoss(lam=0.5, margin=1.0)
    torch.testing.assert_close(loss(z, t), fusedloss.ldr_kl_loss(z, t, lam=0.5, margin=1.0))
    torch.testing.assert_close(loss(z, t, lam=lam),
                               fusedloss.ldr_kl_loss(z, t, lam=lam, margin=1.0))
    layer = fusedloss.nn.LDRKLLinear(5, 11, lam=2.0)
    h = torch.randn(6, 5)
    torch.testing.assert_close(layer(h, t), fusedloss.ldr_kl_loss(
        torch.nn.functional.linear(h, layer.weight, layer.bias), t, lam=2.0, backend="reference"),
        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_convergence_matches_reference(backend, device):
    """A small MLP on clustered data, 50 SGD steps of LDR-KL on its logits: the fused and
    reference loss curves agree."""
    from conftest import assert_curves_agree, clustered_data, sgd_loss_curve, small_mlp
    classes, dim = 10, 16
    x, y = clustered_data(classes, dim, 32, centre_scale=3, noise=1, device=device)

    def train(backend_name):
        torch.manual_seed(1)
        net = small_mlp(dim, classes, device)
        return sgd_loss_curve(
            lambda: fusedloss.ldr_kl_loss(net(x).float(), y, lam=0.5, backend=backend_name),
            list(net.parameters()), lr=0.1, steps=50)

    assert_curves_agree(train(backend), train("reference"), tol=1e-3)
