"""spherical_z_loss: every backend against the fp64 reference oracle, forward and gradient;
shift and scale invariance; the cancellation test; bad input; opcheck and torch.compile."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fusedloss.spherical import OP, SIGMA_FLOOR, spherical_z_loss

from conftest import HAS_CUDA, assert_close, device_backends

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]
HYPER = {"default": {}, "sharp": dict(a=4.0, b=1.5), "soft": dict(a=0.25, b=-1.0)}


def make_inputs(n, c, dtype, device="cpu", ignore=(), mean=0.0, spread=1.0):
    """Logits mean + spread * N(0, 1) per row (drawn in fp64, then rounded to `dtype`), and
    targets in [0, C) with the rows in `ignore` set to -100."""
    logits = mean + spread * torch.randn(n, c, dtype=torch.float64)
    target = torch.randint(0, c, (n,))
    for row in ignore:
        target[row] = -100
    return logits.to(dtype).to(device), target.to(device)


def run(logits, target, backend, **kw):
    """Loss and d loss / d logits of one call, with an all-ones incoming gradient."""
    x = logits.detach().clone().requires_grad_()
    loss = spherical_z_loss(x, target, backend=backend, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), x.grad


def oracle(logits, target, **kw):
    """The reference on the same (rounded) values, in fp64, on the CPU."""
    return run(logits.double().cpu(), target.cpu(), "reference", **kw)


def check_against_oracle(logits, target, backend, **kw):
    loss, grad = run(logits, target, backend, **kw)
    want_loss, want_grad = oracle(logits, target, **kw)
    assert loss.dtype == logits.dtype and grad.dtype == logits.dtype
    assert_close(loss.cpu(), want_loss, logits.dtype, "loss")
    assert_close(grad.cpu(), want_grad, logits.dtype, "grad")


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("hyper", list(HYPER))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_oracle(backend, device, hyper, dtype):
    logits, target = make_inputs(7, 53, dtype, device, ignore=(5,), mean=0.3, spread=2.0)
    check_against_oracle(logits, target, backend, reduction="none", **HYPER[hyper])


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignored", [(), (1, 4), (0, 1, 2, 3, 4, 5)], ids=["none", "some", "all"])
def test_reductions_and_ignored_rows(backend, device, reduction, ignored):
    logits, target = make_inputs(6, 40, torch.float32, device, ignore=ignored)
    check_against_oracle(logits, target, backend, a=2.0, b=0.5, reduction=reduction)
    loss, grad = run(logits, target, backend, reduction=reduction)
    assert torch.all(grad[list(ignored)] == 0)
    if len(ignored) == 6:
        assert math.isnan(loss) if reduction == "mean" else torch.all(loss == 0)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("n,c", [(1, 2), (3, 2), (1, 5), (1, 1001), (2, 1000), (5, 129), (4, 2051),
                                 (64, 4099)])
def test_odd_shapes(backend, device, n, c):
    logits, target = make_inputs(n, c, torch.float32, device)
    check_against_oracle(logits, target, backend, a=1.5, b=0.3)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("layout", ["row_strided", "column_strided", "transposed"])
def test_non_contiguous_logits(backend, device, layout):
    base, target = make_inputs(6, 90, torch.float32, device)
    if layout == "row_strided":
        logits = torch.cat([base, base], dim=1)[:, :90]
    elif layout == "column_strided":
        logits = torch.stack([base, base], dim=2).reshape(6, 180)[:, ::2]
    else:
        logits = base.t().contiguous().t()
    assert not logits.is_contiguous()
    check_against_oracle(logits, target, backend, a=2.0, b=1.0)


@pytest.mark.parametrize("backend,device", device_backends())
def test_nan_propagates_only_from_rows_that_count(backend, device):
    logits, target = make_inputs(4, 30, torch.float32, device, ignore=(3,))
    logits[1, (target[1] + 1) % 30] = float("nan")  # a non-target column of a counted row
    logits[2, target[2]] = float("nan")  # the target column of a counted row
    logits[3, 0] = float("nan")  # an ignored row
    loss, grad = run(logits, target, backend, reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isfinite(loss[0]) and loss[3] == 0
    assert torch.isnan(grad[1]).all() and torch.isnan(grad[2]).all()
    assert torch.isfinite(grad[0]).all() and torch.all(grad[3] == 0)
    mean, _ = run(logits, target, backend)
    assert torch.isnan(mean)


@pytest.mark.parametrize("backend,device", device_backends())
def test_cancellation_mean_100x_spread(backend, device):
    """Rows whose mean is 100 times their spread (spreads from 1e-2 to 1e2): fp32 stays
    within 1e-4 relative of the fp64 oracle on the same fp32 values, loss and gradient.
    The textbook fp32 variance E[o^2] - mu^2 misses that bound on the same rows."""
    n, c = 8, 4099
    spread = torch.logspace(-2, 2, n, dtype=torch.float64)[:, None]
    logits = (100 * spread + spread * torch.randn(n, c, dtype=torch.float64)).float().to(device)
    target = torch.randint(0, c, (n,), device=device)
    kw = dict(a=1.0, b=0.0, reduction="none")
    loss, grad = run(logits, target, backend, **kw)
    want_loss, want_grad = oracle(logits, target, **kw)
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
    assert loss[0] == pytest.approx(F.softplus(torch.tensor(1.0, dtype=torch.float64)).item() / 2, rel=1e-12)
    g = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)).item()
    want = torch.full((8,), g / (8 * SIGMA_FLOOR), dtype=torch.float64)
    want[3] -= g / SIGMA_FLOOR
    assert_close(grad[0].cpu(), want, torch.float64, "floored gradient")
    # Row 0 against the closed form above only: the oracle differentiates sqrt at 0 there
    # (NaN gradient). Row 1 has a spread and goes to the oracle.
    want_loss, want_grad = oracle(logits, target, a=2.0, b=0.5, reduction="none")
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
    want, _ = oracle(o, target, reduction="none")
    assert ((loss.double() - want).abs() / want).max() < 1e-5
    assert ((moved.double() - want).abs() / want).max() < 1e-4


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend):
    logits = torch.randn(4, 9, dtype=torch.float64).requires_grad_()
    target = torch.tensor([0, 3, -100, 8])
    for kw in ({}, dict(a=3.0, b=1.0), dict(a=0.5, b=-2.0)):
        assert torch.autograd.gradcheck(
            lambda x: spherical_z_loss(x, target, backend=backend, reduction="none", **kw), (logits,))
        assert torch.autograd.gradcheck(
            lambda x: spherical_z_loss(x, target, backend=backend, **kw), (logits,))


@pytest.mark.parametrize("backend,device", device_backends())
def test_autocast_gives_fp32_loss(backend, device):
    logits, target = make_inputs(4, 40, torch.bfloat16, device)
    x = logits.clone().requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = spherical_z_loss(x, target, backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    want_loss, want_grad = oracle(logits, target)
    assert_close(loss.detach().cpu(), want_loss, torch.bfloat16, "loss")
    assert_close(x.grad.cpu(), want_grad, torch.bfloat16, "grad")


@pytest.mark.parametrize("backend,device", device_backends())
def test_no_gradient_path(backend, device):
    logits, target = make_inputs(4, 40, torch.float32, device)
    with torch.no_grad():
        loss = spherical_z_loss(logits, target, a=2.0, backend=backend)
    want, _ = oracle(logits, target, a=2.0)
    assert_close(loss.cpu(), want, torch.float32, "loss")


@pytest.mark.parametrize("backend,device", device_backends())
def test_second_backward_recomputes_the_spent_gradient(backend, device):
    logits, target = make_inputs(4, 40, torch.float32, device)
    x = logits.clone().requires_grad_()
    loss = spherical_z_loss(x, target, backend=backend, reduction="none")
    weights = torch.arange(1.0, 5.0, device=device)
    (first,) = torch.autograd.grad(loss, x, weights, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, weights * 3)
    assert_close(second, 3 * first, torch.float32, "second backward")


def test_auto_backend_picks_cpu_for_cpu_tensors():
    logits, target = make_inputs(3, 10, torch.float32)
    assert torch.equal(spherical_z_loss(logits, target), spherical_z_loss(logits, target, backend="cpu"))


def test_empty_batch_behaves_like_cross_entropy():
    logits = torch.rand(0, 5, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    assert spherical_z_loss(logits, target, reduction="sum") == 0
    assert torch.isnan(spherical_z_loss(logits, target, reduction="mean"))
    assert spherical_z_loss(logits, target, reduction="none").shape == (0,)


def test_int32_target_is_accepted():
    logits, target = make_inputs(5, 12, torch.float32)
    want = spherical_z_loss(logits, target)
    assert torch.equal(spherical_z_loss(logits, target.int()), want)


@pytest.mark.parametrize("backend,device", device_backends())
def test_convergence_matches_reference(backend, device):
    """A linear classifier on clustered data, 40 steps of SGD: the fused and reference loss
    curves agree and the loss falls."""
    gen = torch.Generator().manual_seed(0)
    classes, dim, n = 10, 16, 64
    centres = torch.randn(classes, dim, generator=gen) * 3
    labels = torch.randint(0, classes, (n,), generator=gen)
    data = centres[labels] + torch.randn(n, dim, generator=gen)

    def train(backend_name):
        torch.manual_seed(1)
        net = torch.nn.Linear(dim, classes).double().to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        x, y = data.double().to(device), labels.to(device)
        curve = []
        for _ in range(40):
            loss = spherical_z_loss(net(x).float(), y, a=2.0, b=1.0, backend=backend_name)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return torch.tensor(curve)

    fused, reference = train(backend), train("reference")
    assert fused[-1] < 0.5 * fused[0]
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-3)


def _long(n):
    return torch.zeros(n, dtype=torch.long)


BAD_INPUTS = [
    # (description, args, kwargs, exception, message)
    ("one class", lambda: (torch.rand(4, 1), _long(4)), {}, ValueError,
     r"needs C >= 2 classes \(the spread of one output is zero by definition\)"),
    ("no classes", lambda: (torch.rand(4, 0), _long(4)), {}, ValueError, "needs C >= 2 classes"),
    ("1-D logits", lambda: (torch.rand(5), _long(5)), {}, ValueError, "logits must be 2-D"),
    ("3-D logits", lambda: (torch.rand(2, 3, 4), _long(2)), {}, ValueError, "logits must be 2-D"),
    ("integer logits", lambda: (torch.ones(2, 3, dtype=torch.long), _long(2)), {}, TypeError,
     "logits must be float16, bfloat16, float32 or float64"),
    ("logits not a tensor", lambda: ([[0.1, 0.2]], _long(1)), {}, TypeError, "logits must be a tensor"),
    ("float target", lambda: (torch.rand(2, 3), torch.zeros(2)), {}, TypeError, "integer class indices"),
    ("bool target", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.bool)), {}, TypeError,
     "integer class indices"),
    ("2-D target", lambda: (torch.rand(2, 3), torch.zeros(2, 1, dtype=torch.long)), {}, ValueError,
     r"target must have shape \[2\]"),
    ("short target", lambda: (torch.rand(4, 3), _long(3)), {}, ValueError, r"target must have shape \[4\]"),
    ("target too large", lambda: (torch.rand(4, 3), torch.tensor([0, 1, 3, 2])), {}, ValueError,
     r"target\[2\] = 3 is outside \[0, 3\) and is not ignore_index \(-100\)"),
    ("negative target", lambda: (torch.rand(4, 3), torch.tensor([0, -1, 2, 2])), {}, ValueError,
     r"target\[1\] = -1 is outside \[0, 3\)"),
    ("zero a", lambda: (torch.rand(2, 3), _long(2)), dict(a=0.0), ValueError, "a must be > 0"),
    ("negative a", lambda: (torch.rand(2, 3), _long(2)), dict(a=-1.0), ValueError, "a must be > 0"),
    ("nan a", lambda: (torch.rand(2, 3), _long(2)), dict(a=float("nan")), ValueError,
     "a must be a finite number"),
    ("infinite a", lambda: (torch.rand(2, 3), _long(2)), dict(a=float("inf")), ValueError,
     "a must be a finite number"),
    ("infinite b", lambda: (torch.rand(2, 3), _long(2)), dict(b=float("-inf")), ValueError,
     "b must be a finite number"),
    ("tensor a", lambda: (torch.rand(2, 3), _long(2)), dict(a=torch.tensor(1.0)), ValueError,
     "a must be a finite number"),
    ("unknown reduction", lambda: (torch.rand(2, 3), _long(2)), dict(reduction="avg"), ValueError,
     "unknown reduction 'avg'"),
    ("unknown backend", lambda: (torch.rand(2, 3), _long(2)), dict(backend="tpu"), ValueError,
     "unknown backend 'tpu'"),
    ("float ignore_index", lambda: (torch.rand(2, 3), _long(2)), dict(ignore_index=-1.0), TypeError,
     "ignore_index must be an int"),
    ("meta target with cpu logits", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long, device="meta")),
     {}, RuntimeError, "must be on one device"),
]
if not HAS_CUDA:
    BAD_INPUTS.append(("cuda backend without CUDA", lambda: (torch.rand(2, 3), _long(2)),
                       dict(backend="cuda"), RuntimeError, "backend 'cuda' is not available"))
if HAS_CUDA:
    BAD_INPUTS.append(("cpu and cuda mixed", lambda: (torch.rand(2, 3), _long(2).cuda()), {},
                       RuntimeError, "must be on one device"))
    BAD_INPUTS.append(("cpu backend on cuda", lambda: (torch.rand(2, 3, device="cuda"), _long(2).cuda()),
                       dict(backend="cpu"), ValueError, "runs on cpu tensors"))


@pytest.mark.parametrize("args,kwargs,exc,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        spherical_z_loss(*args(), **kwargs)


def test_cpu_kernel_checks_its_input_itself():
    """Under torch.compile the Python value checks are skipped; the C++ kernel still refuses."""
    op = torch.ops.fusedloss.spherical_z_loss
    with pytest.raises(ValueError, match=r"target\[1\] = 7 is outside \[0, 3\)"):
        op(torch.rand(2, 3), torch.tensor([0, 7]), 1.0, 0.0, -100, True)
    with pytest.raises(ValueError, match=r"needs C >= 2 classes \(the spread of one output is zero"):
        op(torch.rand(2, 1), torch.tensor([0, 0]), 1.0, 0.0, -100, True)
    with pytest.raises(ValueError, match="a must be > 0"):
        op(torch.rand(2, 3), torch.tensor([0, 1]), 0.0, 0.0, -100, False)
    with pytest.raises(TypeError, match="target must be int64"):
        op(torch.rand(2, 3), torch.tensor([0, 1], dtype=torch.int32), 1.0, 0.0, -100, False)


# opcheck and torch.compile(fullgraph=True), as in tests/test_compile.py.

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


@pytest.mark.parametrize("sample", range(6))
def test_opcheck_cpu(sample):
    torch.library.opcheck(torch.ops.fusedloss.spherical_z_loss, spherical_samples("cpu")[sample])


def _step(backend):
    def step(logits, target):
        return spherical_z_loss(logits, target, a=2.0, b=0.5, backend=backend)
    return step


def _check_compiled(backend, device):
    logits = (torch.randn(8, 50, device=device) + 3).requires_grad_()
    target = torch.randint(0, 50, (8,), device=device)
    target[2] = -100
    loss = torch.compile(_step(backend), fullgraph=True)(logits, target)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    eager = _step(backend)(logits, target)
    eager.backward()
    assert_close(loss.detach(), eager.detach().double(), torch.float32, "loss")
    assert_close(grad, logits.grad.double(), torch.float32, "grad")


def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    _check_compiled("cpu", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compile_fullgraph_gpu(backend):
    torch._dynamo.reset()
    _check_compiled(backend, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("sample", range(6))
def test_opcheck_cuda(sample):
    torch.library.opcheck(torch.ops.fusedloss.spherical_z_loss, spherical_samples("cuda")[sample])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("sample", range(6))
def test_opcheck_triton(sample):
    OP.triton  # defines the Triton twin
    torch.library.opcheck(torch.ops.fusedloss.spherical_z_loss_triton, spherical_samples("cuda")[sample])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_rows(backend):
    logits, target = make_inputs(64, 100_003, torch.bfloat16, "cuda", ignore=(7,), mean=5.0)
    check_against_oracle(logits, target, backend, a=2.0, b=0.5)

