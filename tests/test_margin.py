"""margin_cross_entropy: every backend against the fp64 reference oracle, forward and gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.reference import margin as ref

from conftest import HAS_CUDA, assert_close, device_backends

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]

VARIANTS = {
    "arcface": dict(m2=0.5),
    "cosface": dict(m3=0.35),
    "sphereface": dict(m1=1.35),
    "combined": dict(m1=1.0, m2=0.3, m3=0.2),
    "arcface_detached": dict(m2=0.5, margin_grad="detached"),
    "sphereface_detached": dict(m1=1.35, margin_grad="detached"),
    "elastic_arc": dict(m2=0.5, m2_std=0.05),
    "elastic_arc_plus": dict(m2=0.5, m2_std=0.0175, elastic_plus=True),
    "elastic_cos": dict(m3=0.35, m2_std=0.0, m3_std=0.05),
    "elastic_cos_plus": dict(m3=0.35, m3_std=0.02, elastic_plus=True),
    "smoothing": dict(m2=0.5, label_smoothing=0.1),
    "no_margin": dict(scale=1.0),
    "z_loss_term": dict(m2=0.5, lse_square_scale=1e-4),
    "z_loss_term_smoothing": dict(m3=0.35, label_smoothing=0.1, lse_square_scale=1e-2),
}


def make_inputs(n, c, dtype, device="cpu", ignore=(), edges=True):
    """Cosines in (-1, 1), with target cosines at the edges when `edges`: exactly 1 and -1,
    and -0.95, where theta + 0.5 passes pi."""
    cos = torch.rand(n, c, dtype=torch.float64) * 2 - 1
    target = torch.randint(0, c, (n,))
    if edges:
        for row, value in zip(range(n), (1.0, -1.0, -0.95, 0.999, -0.999)):
            cos[row, target[row]] = value
    for row in ignore:
        target[row] = -100
    return cos.to(dtype).to(device), target.to(device)


def run(cos, target, backend, **kw):
    """Loss and d loss / d cos of one call, with elastic draws from a fresh seeded generator."""
    x = cos.detach().clone().requires_grad_()
    gen = torch.Generator(device=cos.device).manual_seed(1234)
    loss = fusedloss.margin_cross_entropy(x, target, backend=backend, generator=gen, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), x.grad


def oracle(cos, target, **kw):
    """The reference on the same (rounded) values, in fp64, on the CPU."""
    return run(cos.double().cpu(), target.cpu(), "reference", **kw)


def check_against_oracle(cos, target, backend, **kw):
    loss, grad = run(cos, target, backend, **kw)
    want_loss, want_grad = oracle(cos, target, **kw)
    assert loss.dtype == cos.dtype and grad.dtype == cos.dtype
    assert_close(loss.cpu(), want_loss, cos.dtype, "loss")
    assert_close(grad.cpu(), want_grad, cos.dtype, "grad")


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variants_match_oracle(backend, device, variant, dtype):
    cos, target = make_inputs(7, 53, dtype, device, ignore=(5,))
    check_against_oracle(cos, target, backend, reduction="none", **VARIANTS[variant])


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignored", [(), (1, 4), (0, 1, 2, 3, 4, 5)], ids=["none", "some", "all"])
def test_reductions_and_ignored_rows(backend, device, reduction, ignored):
    cos, target = make_inputs(6, 40, torch.float32, device, ignore=ignored)
    check_against_oracle(cos, target, backend, m2=0.5, label_smoothing=0.05, reduction=reduction)
    loss, grad = run(cos, target, backend, m2=0.5, reduction=reduction)
    assert torch.all(grad[list(ignored)] == 0)
    if len(ignored) == 6:
        assert math.isnan(loss) if reduction == "mean" else torch.all(loss == 0)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("n,c", [(1, 1), (1, 5), (3, 1), (2, 1000), (5, 129), (4, 2051)])
def test_odd_shapes(backend, device, n, c):
    cos, target = make_inputs(n, c, torch.float32, device, edges=c > 1)
    check_against_oracle(cos, target, backend, m2=0.5, label_smoothing=0.1)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("layout", ["row_strided", "column_strided", "transposed"])
def test_non_contiguous_cos(backend, device, layout):
    base, target = make_inputs(6, 90, torch.float32, device)
    if layout == "row_strided":
        cos = torch.cat([base, base], dim=1)[:, :90]
    elif layout == "column_strided":
        cos = torch.stack([base, base], dim=2).reshape(6, 180)[:, ::2]
    else:
        cos = base.t().contiguous().t()
    assert not cos.is_contiguous()
    check_against_oracle(cos, target, backend, m1=1.0, m2=0.3, m3=0.2)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["arcface", "sphereface", "combined"])
def test_edges_are_finite_at_scale_64(backend, device, dtype, variant):
    """cos_y of exactly 1 and -1 and theta + m past pi: finite loss and gradient in 16 bits."""
    cos, target = make_inputs(5, 64, dtype, device)
    loss, grad = run(cos, target, backend, scale=64.0, reduction="none", **VARIANTS[variant])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want_loss, want_grad = oracle(cos, target, scale=64.0, reduction="none", **VARIANTS[variant])
    assert_close(loss.cpu(), want_loss, dtype, "loss")
    assert_close(grad.cpu(), want_grad, dtype, "grad")


@pytest.mark.parametrize("backend,device", device_backends())
def test_nan_propagates_only_from_rows_that_count(backend, device):
    cos, target = make_inputs(4, 30, torch.float32, device, ignore=(3,))
    cos[1, (target[1] + 1) % 30] = float("nan")  # a non-target column of a counted row
    cos[2, target[2]] = float("nan")  # the target column of a counted row
    cos[3, 0] = float("nan")  # an ignored row
    loss, grad = run(cos, target, backend, m2=0.5, reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isfinite(loss[0]) and loss[3] == 0
    assert torch.isfinite(grad[0]).all() and torch.all(grad[3] == 0)
    mean, _ = run(cos, target, backend, m2=0.5)
    assert torch.isnan(mean)


@pytest.mark.parametrize("backend,device", device_backends())
def test_large_logits_do_not_overflow(backend, device):
    """Logits of magnitude ~1e4 (scale 1e4): finite, and no further from the fp64 oracle than
    PyTorch's own fp32 cross_entropy, whose error there is ~ulp(1e4) in every logit."""
    cos, target = make_inputs(4, 50, torch.float32, device, edges=False)
    loss, grad = run(cos, target, backend, scale=1e4, m3=0.35, reduction="none")
    want_loss, want_grad = oracle(cos, target, scale=1e4, m3=0.35, reduction="none")
    peer_loss, peer_grad = run(cos.cpu(), target.cpu(), "reference", scale=1e4, m3=0.35, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    for ours, peer, want in ((loss, peer_loss, want_loss), (grad, peer_grad, want_grad)):
        peer_error = (peer.double() - want).abs().max()
        assert (ours.cpu().double() - want).abs().max() <= 4 * peer_error + 1e-6 * want.abs().max()


@pytest.mark.parametrize("backend,device", device_backends())
def test_exact_arcface_matches_autograd_baseline(backend, device):
    """Away from the clamp, the exact-gradient ArcFace equals the chain users run today."""
    cos = (torch.rand(16, 300, dtype=torch.float64) * 1.6 - 0.8).to(device)
    target = torch.randint(0, 300, (16,), device=device)
    x = cos.clone().requires_grad_()
    cy = x.gather(1, target[:, None])
    chain = F.cross_entropy(x.scatter(1, target[:, None], torch.cos(torch.acos(cy) + 0.5)) * 64, target)
    chain.backward()
    loss, grad = run(cos, target, backend, m2=0.5)
    assert_close(loss, chain.detach(), torch.float64, "loss")
    assert_close(grad, x.grad, torch.float64, "grad")


def test_target_logit_is_continuous_and_decreasing():
    """psi(m1 theta + m2) - m3 decreases strictly and without jumps over theta in [0, pi]."""
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (1.0, 0.3, 0.2), (4.0, 0.0, 0.0),
                       (1.0, 1.2, 0.0), (2.5, 0.7, 0.1)]:
        z = ref.target_logit(torch.cos(theta), scale=1.0, m1=m1, m2=m2, m3=m3, margin_grad="exact")
        steps = z[1:] - z[:-1]
        assert torch.all(steps < 0), (m1, m2, m3)
        assert steps.abs().max() < 4 * m1 * (theta[1] - theta[0]) + 1e-12, (m1, m2, m3)


def test_cosface_never_calls_arccos(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("arccos called")

    monkeypatch.setattr(torch, "acos", fail)
    cos, target = make_inputs(3, 10, torch.float64)
    fusedloss.margin_cross_entropy(cos, target, m3=0.35, backend="reference")


def test_elastic_plus_gives_lowest_target_cosine_the_largest_margin():
    from fusedloss.margin import MarginOptions, elastic_margins, target_cosines

    cos = torch.rand(8, 20) * 2 - 1
    target = torch.randint(0, 20, (8,))
    target[6] = -100
    cos_y = lambda: target_cosines(cos, target, -100)  # noqa: E731
    plain, plus = (MarginOptions(m2=0.5, m2_std=0.1, elastic_plus=p) for p in (False, True))
    draws = elastic_margins(plain, target, cos_y, torch.float32, torch.Generator().manual_seed(3))[0]
    dealt = elastic_margins(plus, target, cos_y, torch.float32, torch.Generator().manual_seed(3))[0]
    valid = target != -100
    assert torch.equal(dealt[valid].sort().values, draws[valid].sort().values)
    by_cos = dealt[valid][torch.argsort(cos_y()[valid])]
    assert torch.all(by_cos[:-1] >= by_cos[1:])
    assert dealt[6] == draws[6]


def test_elastic_draws_follow_the_generator():
    cos, target = make_inputs(6, 30, torch.float64)
    a = fusedloss.margin_cross_entropy(cos, target, m2=0.5, m2_std=0.05,
                                       generator=torch.Generator().manual_seed(5))
    b = fusedloss.margin_cross_entropy(cos, target, m2=0.5, m2_std=0.05,
                                       generator=torch.Generator().manual_seed(5))
    c = fusedloss.margin_cross_entropy(cos, target, m2=0.5, m2_std=0.05,
                                       generator=torch.Generator().manual_seed(6))
    assert a == b and a != c


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend):
    cos = (torch.rand(4, 9, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    target = torch.tensor([0, 3, -100, 8])
    for kw in (dict(m2=0.5), dict(m1=1.35, m3=0.1), dict(m3=0.35, label_smoothing=0.2),
               dict(m2=0.5, label_smoothing=0.1, lse_square_scale=0.05)):
        assert torch.autograd.gradcheck(
            lambda x: fusedloss.margin_cross_entropy(x, target, backend=backend, reduction="none", **kw),
            (cos,))


@pytest.mark.parametrize("backend,device", device_backends())
def test_autocast_gives_fp32_loss(backend, device):
    cos, target = make_inputs(4, 40, torch.bfloat16, device)
    x = cos.clone().requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = fusedloss.margin_cross_entropy(x, target, m2=0.5, backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    want_loss, want_grad = oracle(cos, target, m2=0.5)
    assert_close(loss.detach().cpu(), want_loss, torch.bfloat16, "loss")
    assert_close(x.grad.cpu(), want_grad, torch.bfloat16, "grad")


@pytest.mark.parametrize("backend,device", device_backends())
def test_no_gradient_path(backend, device):
    cos, target = make_inputs(4, 40, torch.float32, device)
    with torch.no_grad():
        loss = fusedloss.margin_cross_entropy(cos, target, m2=0.5, backend=backend)
    want, _ = oracle(cos, target, m2=0.5)
    assert_close(loss.cpu(), want, torch.float32, "loss")


@pytest.mark.parametrize("backend,device", device_backends())
def test_second_backward_recomputes_the_spent_gradient(backend, device):
    cos, target = make_inputs(4, 40, torch.float32, device)
    x = cos.clone().requires_grad_()
    loss = fusedloss.margin_cross_entropy(x, target, m2=0.5, backend=backend, reduction="none")
    weights = torch.arange(1.0, 5.0, device=device)
    (first,) = torch.autograd.grad(loss, x, weights, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, weights * 3)
    assert_close(second, 3 * first, torch.float32, "second backward")


def test_auto_backend_picks_cpu_for_cpu_tensors():
    cos, target = make_inputs(3, 10, torch.float32)
    auto = fusedloss.margin_cross_entropy(cos, target, m2=0.5)
    cpu = fusedloss.margin_cross_entropy(cos, target, m2=0.5, backend="cpu")
    assert torch.equal(auto, cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_memcheck_subset_gpu_kernels(backend, dtype):
    """A small representative set for compute-sanitizer: tails, ignored rows, edges, strides."""
    cos, target = make_inputs(9, 1031, dtype, "cuda", ignore=(4,))
    check_against_oracle(cos[:, :1000], target.clamp(max=999), backend, m2=0.5, label_smoothing=0.1)
    check_against_oracle(cos, target, backend, m3=0.35, m3_std=0.05, elastic_plus=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_rows(backend):
    cos, target = make_inputs(64, 100_003, torch.bfloat16, "cuda", ignore=(7,))
    check_against_oracle(cos, target, backend, m2=0.5)


BAD_INPUTS = [
    # (description, args, kwargs, exception, message)
    ("1-D cos", lambda: (torch.rand(5), torch.zeros(5, dtype=torch.long)), {}, ValueError, "cos must be 2-D"),
    ("3-D cos", lambda: (torch.rand(2, 3, 4), torch.zeros(2, dtype=torch.long)), {}, ValueError, "cos must be 2-D"),
    ("integer cos", lambda: (torch.ones(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long)), {},
     TypeError, "cos must be float16, bfloat16, float32 or float64"),
    ("cos not a tensor", lambda: ([[0.1, 0.2]], torch.zeros(1, dtype=torch.long)), {}, TypeError,
     "cos must be a tensor"),
    ("float target", lambda: (torch.rand(2, 3), torch.zeros(2)), {}, TypeError, "integer class indices"),
    ("bool target", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.bool)), {}, TypeError,
     "integer class indices"),
    ("2-D target", lambda: (torch.rand(2, 3), torch.zeros(2, 1, dtype=torch.long)), {}, ValueError,
     r"target must have shape \[2\]"),
    ("short target", lambda: (torch.rand(4, 3), torch.zeros(3, dtype=torch.long)), {}, ValueError,
     r"target must have shape \[4\]"),
    ("target too large", lambda: (torch.rand(4, 3), torch.tensor([0, 1, 3, 2])), {}, ValueError,
     r"target\[2\] = 3 is outside \[0, 3\)"),
    ("negative target", lambda: (torch.rand(4, 3), torch.tensor([0, -1, 2, 2])), {}, ValueError,
     r"target\[1\] = -1 is outside \[0, 3\)"),
    ("no classes", lambda: (torch.rand(4, 0), torch.zeros(4, dtype=torch.long)), {}, ValueError, "C >= 1"),
    ("zero scale", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)), dict(scale=0.0),
     ValueError, "scale must be > 0"),
    ("negative scale", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)), dict(scale=-64.0),
     ValueError, "scale must be > 0"),
    ("nan scale", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)), dict(scale=float("nan")),
     ValueError, "scale must be a finite number"),
    ("m1 below 1", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)), dict(m1=0.5),
     ValueError, "m1 must be >= 1"),
    ("infinite m2", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)), dict(m2=float("inf")),
     ValueError, "m2 must be a finite number"),
    ("negative m2_std", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)), dict(m2_std=-0.1),
     ValueError, "m2_std must be >= 0"),
    ("negative m3_std", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)), dict(m3_std=-0.1),
     ValueError, "m3_std must be >= 0"),
    ("plus without std", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)),
     dict(elastic_plus=True), ValueError, "elastic_plus=True needs"),
    ("smoothing above 1", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)),
     dict(label_smoothing=1.5), ValueError, r"label_smoothing must lie in \[0.0, 1.0\]"),
    ("negative lse_square_scale", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)),
     dict(lse_square_scale=-1e-4), ValueError, "lse_square_scale must be >= 0"),
    ("nan lse_square_scale", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)),
     dict(lse_square_scale=float("nan")), ValueError, "lse_square_scale must be a finite number"),
    ("unknown reduction", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)),
     dict(reduction="avg"), ValueError, "unknown reduction 'avg'"),
    ("unknown margin_grad", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)),
     dict(margin_grad="approx"), ValueError, "unknown margin_grad 'approx'"),
    ("unknown backend", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)),
     dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
    ("float ignore_index", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)),
     dict(ignore_index=-1.0), TypeError, "ignore_index must be an int"),
    ("meta target with cpu cos", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long, device="meta")),
     {}, RuntimeError, "must be on one device"),
]
if not HAS_CUDA:
    BAD_INPUTS.append(("cuda backend without CUDA", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)),
                       dict(backend="cuda"), RuntimeError, "backend 'cuda' is not available"))
if HAS_CUDA:
    BAD_INPUTS.append(("cpu and cuda mixed", lambda: (torch.rand(2, 3), torch.zeros(2, dtype=torch.long, device="cuda")),
                       {}, RuntimeError, "must be on one device"))
    BAD_INPUTS.append(("cpu backend on cuda", lambda: (torch.rand(2, 3, device="cuda"),
                                                       torch.zeros(2, dtype=torch.long, device="cuda")),
                       dict(backend="cpu"), ValueError, "runs on cpu tensors"))


@pytest.mark.parametrize("args,kwargs,exc,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        fusedloss.margin_cross_entropy(*args(), **kwargs)


def test_cpu_kernel_checks_targets_itself():
    """Under torch.compile the Python value checks are skipped; the C++ kernel still refuses."""
    op = torch.ops.fusedloss.margin_cross_entropy
    with pytest.raises(ValueError, match=r"target\[1\] = 7 is outside \[0, 3\)"):
        op(torch.rand(2, 3), torch.tensor([0, 7]), None, None, 64.0, 1.0, 0.5, 0.0, False, 0.0, 0.0, -100,
           True)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_lse_square_term_is_palm_z_loss(backend, device, reduction):
    """lse_square_scale adds lambda * logsumexp(z)^2 on the rows that count, and nothing on
    ignored rows; with margins it is the log-sum-exp of the margin-adjusted logits."""
    cos, target = make_inputs(6, 40, torch.float64, device, ignore=(2,), edges=False)
    lam = 1e-3
    plain = fusedloss.margin_cross_entropy(cos, target, m3=0.35, reduction="none", backend=backend)
    with_term = fusedloss.margin_cross_entropy(cos, target, m3=0.35, lse_square_scale=lam,
                                               reduction="none", backend=backend)
    valid = target != -100
    safe = torch.where(valid, target, torch.zeros_like(target))
    z = 64.0 * cos.clone()
    z[torch.arange(6), safe] -= 64.0 * 0.35
    lse = torch.logsumexp(z, 1)
    want = torch.where(valid, lam * lse * lse, torch.zeros_like(lse))
    torch.testing.assert_close(with_term - plain, want, rtol=1e-9, atol=1e-9)
    check_against_oracle(cos, target, backend, m2=0.5, lse_square_scale=lam, reduction=reduction)


def test_empty_batch_behaves_like_cross_entropy():
    cos = torch.rand(0, 5, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    assert fusedloss.margin_cross_entropy(cos, target, reduction="sum") == 0
    assert torch.isnan(fusedloss.margin_cross_entropy(cos, target, reduction="mean"))
    assert fusedloss.margin_cross_entropy(cos, target, reduction="none").shape == (0,)


@pytest.mark.parametrize("backend,device", device_backends())
def test_convergence_matches_reference(backend, device):
    """A small MLP on clustered data, 50 steps of SGD: the fused and reference loss curves agree."""
    gen = torch.Generator().manual_seed(0)
    classes, dim, n = 10, 16, 32
    centres = torch.randn(classes, dim, generator=gen) * 3
    labels = torch.randint(0, classes, (n,), generator=gen)
    data = centres[labels] + torch.randn(n, dim, generator=gen)

    def train(backend_name, dev):
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).double()
        weight = torch.nn.Parameter(torch.randn(classes, 8, dtype=torch.float64))
        net, weight = net.to(dev), weight.to(dev)
        opt = torch.optim.SGD(list(net.parameters()) + [weight], lr=0.05)
        x, y = data.double().to(dev), labels.to(dev)
        curve = []
        for _ in range(50):
            emb = F.normalize(net(x))
            cos = emb @ F.normalize(weight).t()
            loss = fusedloss.margin_cross_entropy(cos.float(), y, scale=16.0, m2=0.3, backend=backend_name)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return torch.tensor(curve)

    fused = train(backend, device)
    reference = train("reference", device)
    assert fused[-1] < 0.5 * fused[0]
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-3)
