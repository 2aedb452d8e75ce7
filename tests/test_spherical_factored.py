"""FactoredSphericalLinear: the exact factored SGD layer against a dense SphericalLinear
trained by plain torch.optim.SGD."""
import time

import pytest
import torch

from fusedloss.nn import SphericalLinear
from fusedloss.reference.spherical import spherical_z_loss
from fusedloss.spherical_factored import FactoredSphericalLinear

DT = torch.float64


def _rel(x, y):
    return ((x - y).norm() / y.norm()).item()


def _pair(d, C, lr, bias, stabilize_every, **kw):
    dense = SphericalLinear(d, C, bias=bias, dtype=DT, **kw)
    fac = FactoredSphericalLinear(d, C, lr, bias=bias, dtype=DT,
                                  stabilize_every=stabilize_every, **kw)
    fac.load_dense(dense.weight.detach(), dense.bias.detach() if bias else None)
    return dense, fac


def _effective_dense(dense):
    W = dense.weight.detach()
    return torch.cat([W, dense.bias.detach()[:, None]], 1) if dense.bias is not None else W


def _step_both(dense, fac, opt, h, t, rel_tol, step):
    """One SGD step of the dense layer (by `opt`) and of the factored one (in its backward) on
    the same batch, whose losses agree within `rel_tol`."""
    l1, l2 = dense(h, t), fac(h, t)
    assert abs(l1.item() - l2.item()) <= rel_tol * abs(l1.item()), step
    opt.zero_grad()
    l1.backward()
    l2.backward()
    opt.step()


@pytest.mark.parametrize("bias", [False, True])
def test_tracks_dense_sgd_with_network_below(bias):
    """Same losses, hidden gradients and effective W (and bias) within 1e-4 relative over 200
    steps of plain SGD, with a small network below trained by the hidden gradients; the
    stabilisation period (30) is hit 6 times, and the factors are non-trivial in between."""
    torch.manual_seed(1)
    C, d, d_in, m, lr, steps = 50, 8, 12, 16, 0.5, 200
    dense, fac = _pair(d, C, lr, bias, stabilize_every=30)
    W0 = _effective_dense(dense).clone()
    net1 = torch.nn.Sequential(torch.nn.Linear(d_in, d), torch.nn.Tanh()).to(DT)
    net2 = torch.nn.Sequential(torch.nn.Linear(d_in, d), torch.nn.Tanh()).to(DT)
    net2.load_state_dict(net1.state_dict())
    opt1 = torch.optim.SGD(list(net1.parameters()) + list(dense.parameters()), lr=lr)
    opt2 = torch.optim.SGD(net2.parameters(), lr=lr)
    protos = torch.randn(C, d_in, dtype=DT)
    factors_used = False
    for step in range(steps):
        t = torch.randint(0, C, (m,))
        t[:3] = t[3]                        # repeated targets in a batch
        x = protos[t] + 0.5 * torch.randn(m, d_in, dtype=DT)
        h1, h2 = net1(x), net2(x)
        h1.retain_grad()
        h2.retain_grad()
        l1, l2 = dense(h1, t), fac(h2, t)
        assert abs(l1.item() - l2.item()) <= 1e-4 * abs(l1.item()), step
        opt1.zero_grad()
        opt2.zero_grad()
        l1.backward()
        l2.backward()
        assert _rel(h2.grad, h1.grad) < 1e-4, step
        opt1.step()
        opt2.step()
        factors_used |= _rel(fac.U, torch.eye(fac.D, dtype=DT)) > 1e-3
        if step % 10 == 9:
            assert _rel(fac.effective(), _effective_dense(dense)) < 1e-4, step
    assert fac.steps == steps
    assert factors_used
    Y = _effective_dense(dense)
    assert _rel(Y, W0) > 0.05                      # the layer did learn
    assert _rel(fac.weight(), dense.weight.detach()) < 1e-4
    if bias:
        assert _rel(fac.bias(), dense.bias.detach()) < 1e-4
    # the bookkeeping: Q = Y^T Y, column sums, U^-1
    assert _rel(fac.gram(), Y.t() @ Y) < 1e-4
    assert _rel(fac.s, Y.sum(0)) < 1e-4
    assert _rel(fac.U @ fac.Uinv, torch.eye(fac.D, dtype=DT)) < 1e-8


def test_tracks_dense_fixed_hidden_without_grad_sum_reduction_ignore_index():
    """Hidden batches that do not require grad still trigger the step; reduction='sum';
    ignored rows contribute nothing; no stabilisation for 200 steps."""
    torch.manual_seed(2)
    C, d, m, lr = 40, 6, 16, 0.05
    dense, fac = _pair(d, C, lr, False, stabilize_every=1000, reduction="sum")
    opt = torch.optim.SGD(dense.parameters(), lr=lr)
    for step in range(200):
        h = torch.randn(m, d, dtype=DT)
        t = torch.randint(0, C, (m,))
        t[::5] = -100
        _step_both(dense, fac, opt, h, t, 1e-4, step)
    assert fac.steps == 200
    assert _rel(fac.weight(), dense.weight.detach()) < 1e-4
    assert _rel(fac.weight(), fac.V) > 1e-3  # never folded: the factors carry the update


def test_forward_and_logits_match_reference():
    torch.manual_seed(3)
    fac = FactoredSphericalLinear(5, 30, lr=0.1, bias=True, dtype=DT, a=0.7, b=0.3)
    h = torch.randn(7, 5, dtype=DT)
    t = torch.randint(0, 30, (7,))
    logits = h @ fac.weight().t() + fac.bias()
    torch.testing.assert_close(fac.logits(h), logits)
    want = spherical_z_loss(logits, t, a=0.7, b=0.3)
    with torch.no_grad():
        got = fac(h, t)
    torch.testing.assert_close(got, want)
    assert fac.steps == 0  # no step without a backward


def test_stale_backward_raises_and_bad_input():
    fac = FactoredSphericalLinear(4, 10, lr=0.1, bias=False, dtype=DT)
    h = torch.randn(3, 4, dtype=DT)
    t = torch.tensor([0, 1, 2])
    l1 = fac(h, t)
    l2 = fac(h, t)
    l2.backward()
    with pytest.raises(RuntimeError, match="changed between"):
        l1.backward()
    with pytest.raises(ValueError, match="target values"):
        fac(h, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="hidden must be"):
        fac(torch.randn(3, 5, dtype=DT), t)
    with pytest.raises(ValueError, match="num_classes"):
        FactoredSphericalLinear(4, 1, lr=0.1)


def test_step_time_independent_of_num_classes(capsys):
    """Cost sanity: time per step (stabilisation excluded) at d=32, m=16 from C=10k to 200k.
    Reported, not asserted (shared CPUs)."""
    torch.manual_seed(4)
    d, m = 32, 16
    report = []
    for C in (10_000, 50_000, 200_000):
        fac = FactoredSphericalLinear(d, C, lr=0.1, bias=False, dtype=torch.float32,
                                      stabilize_every=10**9)
        batches = [(torch.randn(m, d, requires_grad=True), torch.randint(0, C, (m,)))
                   for _ in range(60)]
        for h, t in batches[:10]:
            fac(h, t).backward()
        start = time.perf_counter()
        for h, t in batches[10:]:
            fac(h, t).backward()
        per_step = (time.perf_counter() - start) / 50
        start = time.perf_counter()
        fac.stabilize()
        report.append((C, per_step * 1e3, (time.perf_counter() - start) * 1e3))
    with capsys.disabled():
        for C, ms, stab in report:
            print(f"\nFactoredSphericalLinear d={d} m={m} C={C}: {ms:.3f} ms/step, "
                  f"stabilise {stab:.1f} ms", end="")
        print()


def test_fallback_fold_on_ill_conditioned_step_stays_exact():
    """With cond_limit = 0 every step takes the fold path (V absorbs U M, the scatter goes to V
    directly): it must still track the dense layer."""
    torch.manual_seed(5)
    C, d, m, lr = 30, 5, 8, 0.3
    dense, fac = _pair(d, C, lr, True, stabilize_every=1000)
    fac.cond_limit = 0.0
    opt = torch.optim.SGD(dense.parameters(), lr=lr)
    for step in range(20):
        h = torch.randn(m, d, dtype=DT, requires_grad=True)
        _step_both(dense, fac, opt, h, torch.randint(0, C, (m,)), 1e-9, step)
    assert fac.refolds == 20
    assert torch.equal(fac.U, torch.eye(fac.D, dtype=DT))
    assert _rel(fac.effective(), _effective_dense(dense)) < 1e-9
