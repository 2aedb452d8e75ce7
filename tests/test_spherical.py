"""spherical_z_loss: every backend against the fp64 reference oracle, forward and gradient;
shift and scale invariance; the cancellation test; bad input. (Its opcheck and torch.compile
tests are in tests/test_compile.py.)"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fusedloss.reference.spherical import SIGMA_FLOOR
from fusedloss.spherical import spherical_z_loss

from conftest import (DTYPES, ScoresLossContract, assert_close, assert_curves_agree,
                      assert_gradcheck, bad_input_params, clustered_data, device_backends,
                      loss_and_grads, nan_rows_loss_and_grad, oracle, scores_and_target_bad_inputs,
                      scores_drivers, sgd_loss_curve)

HYPER = {"default": {}, "sharp": dict(a=4.0, b=1.5), "soft": dict(a=0.25, b=-1.0)}


def make_inputs(n, c, dtype, device="cpu", ignore=(), mean=0.0, spread=1.0):
    """Logits mean + spread * N(0, 1) per row (drawn in fp64, then rounded to `dtype`), and
    targets in [0, C) with the rows in `ignore` set to -100."""
    logits = mean + spread * torch.randn(n, c, dtype=torch.float64)
    target = torch.randint(0, c, (n,))
    for row in ignore:
        target[row] = -100
    return logits.to(dtype).to(device), target.to(device)


def spherical(**options):
    """call(backend, logits, target) of spherical_z_loss with `options`."""
    return lambda backend, logits, target: spherical_z_loss(logits, target, backend=backend,
                                                            **options)


run, check_against_oracle = scores_drivers(spherical)


class TestScoresContract(ScoresLossContract):
    """The contract of every loss of [N, C] scores (tests/conftest.py), with a sharp softplus
    past a z-score of 0.5."""

    loss = staticmethod(spherical)
    inputs = staticmethod(make_inputs)
    options = dict(a=2.0, b=0.5)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("hyper", list(HYPER))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_oracle(backend, device, hyper, dtype):
    logits, target = make_inputs(7, 53, dtype, device, ignore=(5,), mean=0.3, spread=2.0)
    check_against_oracle(logits, target, backend, reduction="none", **HYPER[hyper])


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("n,c", [(1, 2), (3, 2), (1, 5), (1, 1001), (2, 1000), (5, 129), (4, 2051),
                                 (64, 4099)])
def test_odd_shapes(backend, device, n, c):
    logits, target = make_inputs(n, c, torch.float32, device)
    check_against_oracle(logits, target, backend, a=1.5, b=0.3)


@pytest.mark.parametrize("backend,device", device_backends())
def test_nan_propagates_only_from_rows_that_count(backend, device):
    logits, target = make_inputs(4, 30, torch.float32, device, ignore=(3,))
    _, grad = nan_rows_loss_and_grad(lambda reduction: spherical(reduction=reduction), backend,
                                     logits, target)
    assert torch.isnan(grad[1]).all() and torch.isnan(grad[2]).all()


@pytest.mark.parametrize("backend,device", device_backends())
def test_cancellation_mean_100x_spread(backend, device):
    """Rows whose mean is 100 times their spread (spreads from 1e-2 to 1e2): fp32 stays
    within 1e-4 relative of the fp64 oracle on the same fp32 values, loss and gradient.
    The textbook fp32 variance E[o^2] - mu^2 misses that bound on the same rows."""
    n, c = 8, 4099
    spread = torch.logspace(-2, 2, n, dtype=torch.float64)[:, None]
    logits = (100 * spread + spread * torch.randn(n, c, dtype=torch.float64)).float().to(device)
    target = torch.randint(0, c, (n,), device=device)
    call = spherical(a=1.0, b=0.0, reduction="none")
    loss, grad = loss_and_grads(call, backend, (logits, target))
    want_loss, want_grad = oracle(call, (logits, target))
    loss_err = ((loss.cpu().double() - want_loss).abs() / want_loss.abs()).max()
    grad_err = ((grad.cpu().double() - want_grad).norm(dim=1) / want_grad.norm(dim=1)).max()
    assert loss_err < 1e-4 and grad_err < 1e-4, (float(loss_err), float(grad_err))

    x = logits.cpu()
    naive_mu = x.mean(1)
    naive_sigma = ((x * x).mean(1) - naive_mu * naive_mu).clamp_min(0).sqrt()
    naive_z = (x.gather(1, target.cpu()[:, None]).squeeze(1) - naive_mu) / naive_sigma
    naive_err = ((F.softplus(-naive_z).double() - want_loss).abs() / want_loss.abs()).max()
    assert naive_err > 1e-4, float(naive_err)


@pytest.mark.parametrize("backend,device", device_backends())
def test_constant_row_holds_sigma_at_the_floor(backend, device):
    """All outputs equal: the spread is 0, sigma is the floor, z_c = 0; the gradient has no
    component along o - mu (there is none) and is that of z_c = (o_c - mu) / floor."""
    logits = torch.full((2, 8), 0.5, dtype=torch.float64, device=device)
    logits[1] = torch.arange(8.0, dtype=torch.float64)
    target = torch.tensor([3, 5], device=device)
    loss, grad = run(logits, target, backend, a=2.0, b=0.5, reduction="none")
    one = torch.tensor(1.0, dtype=torch.float64)
    assert loss[0] == pytest.approx(F.softplus(one).item() / 2, rel=1e-12)
    g = torch.sigmoid(one).item()
    want = torch.full((8,), g / (8 * SIGMA_FLOOR), dtype=torch.float64)
    want[3] -= g / SIGMA_FLOOR
    assert_close(grad[0].cpu(), want, torch.float64, "floored gradient")
    # Row 0 against the closed form above only: the oracle differentiates sqrt at 0 there
    # (NaN gradient). Row 1 has a spread and goes to the oracle.
    want_loss, want_grad = oracle(spherical(a=2.0, b=0.5, reduction="none"), (logits, target))
    assert_close(loss.cpu(), want_loss, torch.float64, "loss")
    assert_close(grad[1].cpu(), want_grad[1], torch.float64, "grad")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), c=st.integers(2, 300),
       alpha=st.floats(1e-3, 1e3), beta=st.floats(-1e3, 1e3), a=st.floats(0.1, 10.0),
       b=st.floats(-3.0, 3.0))
def test_shift_and_scale_invariance(seed, n, c, alpha, beta, a, b):
    """loss(alpha o + beta) == loss(o) and grad(alpha o + beta) == grad(o) / alpha, alpha > 0,
    on the cpu backend in fp64."""
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(n, c, generator=gen, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=gen)
    kw = dict(a=a, b=b, reduction="none")
    loss, grad = run(o, target, "cpu", **kw)
    moved_loss, moved_grad = run(alpha * o + beta, target, "cpu", **kw)
    torch.testing.assert_close(moved_loss, loss, rtol=1e-8, atol=1e-12)
    # Entries are sums of terms of size ~1 / sigma that may cancel (for C = 2 the loss is
    # constant and the gradient is zero): the absolute tolerance is set against that size.
    term = float((1 / o.std(1, correction=0)).max())
    torch.testing.assert_close(moved_grad * alpha, grad, rtol=1e-7, atol=1e-9 * term)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), alpha=st.floats(1e-2, 1e2), shift=st.floats(-100.0, 100.0))
def test_shift_and_scale_invariance_fp32(seed, alpha, shift):
    """The same in fp32, with shifts up to 100 spreads: the loss moves by less than 1e-4."""
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(4, 257, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 257, (4,), generator=gen)
    loss, _ = run(o.float(), target, "cpu", reduction="none")
    moved, _ = run((alpha * (o + shift)).float(), target, "cpu", reduction="none")
    want, _ = oracle(spherical(reduction="none"), (o, target))
    assert ((loss.double() - want).abs() / want).max() < 1e-5
    assert ((moved.double() - want).abs() / want).max() < 1e-4


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend):
    logits = torch.randn(4, 9, dtype=torch.float64)
    target = torch.tensor([0, 3, -100, 8])
    for kw, reduction in itertools.product(({}, dict(a=3.0, b=1.0), dict(a=0.5, b=-2.0)),
                                           ("none", "mean")):
        assert_gradcheck(spherical(reduction=reduction, **kw), backend, (logits, target))


def test_int32_target_is_accepted():
    logits, target = make_inputs(5, 12, torch.float32)
    want = spherical_z_loss(logits, target)
    assert torch.equal(spherical_z_loss(logits, target.int()), want)


@pytest.mark.parametrize("backend,device", device_backends())
def test_convergence_matches_reference(backend, device):
    """A linear classifier on clustered data, 40 steps of SGD: the fused and reference loss
    curves agree and the loss falls."""
    classes, dim = 10, 16
    x, y = clustered_data(classes, dim, 64, centre_scale=3, noise=1, device=device)

    def train(backend_name):
        torch.manual_seed(1)
        net = torch.nn.Linear(dim, classes).double().to(device)
        return sgd_loss_curve(
            lambda: spherical_z_loss(net(x).float(), y, a=2.0, b=1.0, backend=backend_name),
            net.parameters(), lr=0.5, steps=40)

    assert_curves_agree(train(backend), train("reference"), tol=1e-3)


def _logits_and_target(n=2, c=3):
    return lambda: (torch.rand(n, c), torch.zeros(n, dtype=torch.long))


BAD_INPUTS = scores_and_target_bad_inputs("logits") + [
    # (id, args, kwargs, exception, message)
    ("one class", _logits_and_target(4, 1), {}, ValueError,
     r"needs C >= 2 classes \(the spread of one output is zero by definition\)"),
    ("no classes", _logits_and_target(4, 0), {}, ValueError, "needs C >= 2 classes"),
    ("target too large", lambda: (torch.rand(4, 3), torch.tensor([0, 1, 3, 2])), {}, ValueError,
     r"target\[2\] = 3 is outside \[0, 3\) and is not ignore_index \(-100\)"),
    ("zero a", _logits_and_target(), dict(a=0.0), ValueError, "a must be > 0"),
    ("negative a", _logits_and_target(), dict(a=-1.0), ValueError, "a must be > 0"),
    ("nan a", _logits_and_target(), dict(a=float("nan")), ValueError, "a must be a finite number"),
    ("infinite a", _logits_and_target(), dict(a=float("inf")), ValueError,
     "a must be a finite number"),
    ("infinite b", _logits_and_target(), dict(b=float("-inf")), ValueError,
     "b must be a finite number"),
    ("tensor a", _logits_and_target(), dict(a=torch.tensor(1.0)), ValueError,
     "a must be a finite number"),
]


@pytest.mark.parametrize("args,kwargs,exc,message", bad_input_params(BAD_INPUTS))
def test_bad_input_raises_clear_error(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        spherical_z_loss(*args(), **kwargs)


def test_cpu_kernel_checks_its_input_itself():
    """Under torch.compile the Python value checks are skipped; the C++ kernel still refuses."""
    op = torch.ops.fusedloss.spherical_z_loss
    with pytest.raises(ValueError, match=r"target\[1\] = 7 is outside \[0, 3\)"):
        op(torch.rand(2, 3), torch.tensor([0, 7]), 1.0, 0.0, -100, True)
    with pytest.raises(ValueError,
                       match=r"needs C >= 2 classes \(the spread of one output is zero"):
        op(torch.rand(2, 1), torch.tensor([0, 0]), 1.0, 0.0, -100, True)
    with pytest.raises(ValueError, match="a must be > 0"):
        op(torch.rand(2, 3), torch.tensor([0, 1]), 0.0, 0.0, -100, False)
    with pytest.raises(TypeError, match="target must be int64"):
        op(torch.rand(2, 3), torch.tensor([0, 1], dtype=torch.int32), 1.0, 0.0, -100, False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_rows(backend):
    logits, target = make_inputs(64, 100_003, torch.bfloat16, "cuda", ignore=(7,), mean=5.0)
    check_against_oracle(logits, target, backend, a=2.0, b=0.5)

