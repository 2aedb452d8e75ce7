"""margin_cross_entropy: every backend against the fp64 reference oracle, forward and gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.reference import margin as ref

from conftest import (DTYPES, MARGIN_VARIANTS, REDUCTIONS, ScoresLossContract, assert_close,
                      assert_curves_agree, assert_gradcheck, bad_input_params, clustered_data,
                      device_backends, loss_and_grads, nan_rows_loss_and_grad, oracle,
                      scores_and_target_bad_inputs, scores_drivers, sgd_loss_curve, small_mlp)


VARIANTS = {
    **MARGIN_VARIANTS,
    "sphereface_detached": dict(m1=1.35, margin_grad="detached"),
    "elastic_arc": dict(m2=0.5, m2_std=0.05),
    "elastic_cos_plus": dict(m3=0.35, m3_std=0.02, elastic_plus=True),
    "no_margin": dict(scale=1.0),
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


def margin(**options):
    """call(backend, cos, target) of margin_cross_entropy with `options`; elastic margins are
    drawn from a fresh generator with the same seed for every backend."""
    def call(backend, cos, target):
        gen = torch.Generator(device=cos.device).manual_seed(1234)
        return fusedloss.margin_cross_entropy(cos, target, backend=backend, generator=gen,
                                              **options)
    return call


run, check_against_oracle = scores_drivers(margin)


class TestScoresContract(ScoresLossContract):
    """The contract of every loss of [N, C] scores (tests/conftest.py), with the combined
    margin and label smoothing."""

    loss = staticmethod(margin)
    inputs = staticmethod(make_inputs)
    options = dict(m1=1.0, m2=0.3, m3=0.2, label_smoothing=0.05)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variants_match_oracle(backend, device, variant, dtype):
    cos, target = make_inputs(7, 53, dtype, device, ignore=(5,))
    check_against_oracle(cos, target, backend, reduction="none", **VARIANTS[variant])


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("n,c", [(1, 1), (1, 5), (3, 1), (2, 1000), (5, 129), (4, 2051)])
def test_odd_shapes(backend, device, n, c):
    cos, target = make_inputs(n, c, torch.float32, device, edges=c > 1)
    check_against_oracle(cos, target, backend, m2=0.5, label_smoothing=0.1)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["arcface", "sphereface", "combined"])
def test_edges_are_finite_at_scale_64(backend, device, dtype, variant):
    """cos_y of exactly 1 and -1 and theta + m past pi: finite loss and gradient in 16 bits."""
    cos, target = make_inputs(5, 64, dtype, device)
    call = margin(scale=64.0, reduction="none", **VARIANTS[variant])
    loss, grad = loss_and_grads(call, backend, (cos, target))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want_loss, want_grad = oracle(call, (cos, target))
    assert_close(loss.cpu(), want_loss, dtype, "loss")
    assert_close(grad.cpu(), want_grad, dtype, "grad")


@pytest.mark.parametrize("backend,device", device_backends())
def test_nan_propagates_only_from_rows_that_count(backend, device):
    cos, target = make_inputs(4, 30, torch.float32, device, ignore=(3,))
    nan_rows_loss_and_grad(lambda reduction: margin(m2=0.5, reduction=reduction), backend, cos,
                           target)


@pytest.mark.parametrize("backend,device", device_backends())
def test_large_logits_do_not_overflow(backend, device):
    """Logits of magnitude ~1e4 (scale 1e4): finite, and no further from the fp64 oracle than
    PyTorch's own fp32 cross_entropy, whose error there is ~ulp(1e4) in every logit."""
    cos, target = make_inputs(4, 50, torch.float32, device, edges=False)
    call = margin(scale=1e4, m3=0.35, reduction="none")
    loss, grad = loss_and_grads(call, backend, (cos, target))
    want_loss, want_grad = oracle(call, (cos, target))
    peer_loss, peer_grad = loss_and_grads(call, "reference", (cos.cpu(), target.cpu()))
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
    chain = F.cross_entropy(x.scatter(1, target[:, None], torch.cos(torch.acos(cy) + 0.5)) * 64,
                            target)
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
    draws, dealt = (elastic_margins(options, target, cos_y, torch.float32,
                                    torch.Generator().manual_seed(3))[0]
                    for options in (plain, plus))
    valid = target != -100
    assert torch.equal(dealt[valid].sort().values, draws[valid].sort().values)
    by_cos = dealt[valid][torch.argsort(cos_y()[valid])]
    assert torch.all(by_cos[:-1] >= by_cos[1:])
    assert dealt[6] == draws[6]


def test_elastic_draws_follow_the_generator():
    cos, target = make_inputs(6, 30, torch.float64)
    a, b, c = (fusedloss.margin_cross_entropy(cos, target, m2=0.5, m2_std=0.05,
                                              generator=torch.Generator().manual_seed(seed))
               for seed in (5, 5, 6))
    assert a == b and a != c


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend):
    cos = torch.rand(4, 9, dtype=torch.float64) * 1.6 - 0.8
    target = torch.tensor([0, 3, -100, 8])
    for kw in (dict(m2=0.5), dict(m1=1.35, m3=0.1), dict(m3=0.35, label_smoothing=0.2),
               dict(m2=0.5, label_smoothing=0.1, lse_square_scale=0.05)):
        assert_gradcheck(margin(reduction="none", **kw), backend, (cos, target))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_memcheck_subset_elastic_margins(backend, dtype):
    """The per-row margins of ElasticFace+ under compute-sanitizer (the spec's memcheck
    samples cover the constant margins): tails, an ignored row."""
    cos, target = make_inputs(9, 1031, dtype, "cuda", ignore=(4,))
    check_against_oracle(cos, target, backend, m3=0.35, m3_std=0.05, elastic_plus=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_rows(backend):
    cos, target = make_inputs(64, 100_003, torch.bfloat16, "cuda", ignore=(7,))
    check_against_oracle(cos, target, backend, m2=0.5)


def _cos_and_target(n=2, c=3):
    return lambda: (torch.rand(n, c), torch.zeros(n, dtype=torch.long))


BAD_INPUTS = scores_and_target_bad_inputs("cos") + [
    # (id, args, kwargs, exception, message)
    ("target too large", lambda: (torch.rand(4, 3), torch.tensor([0, 1, 3, 2])), {}, ValueError,
     r"target\[2\] = 3 is outside \[0, 3\)"),
    ("no classes", _cos_and_target(4, 0), {}, ValueError, "C >= 1"),
    ("zero scale", _cos_and_target(), dict(scale=0.0), ValueError, "scale must be > 0"),
    ("negative scale", _cos_and_target(), dict(scale=-64.0), ValueError, "scale must be > 0"),
    ("nan scale", _cos_and_target(), dict(scale=float("nan")), ValueError,
     "scale must be a finite number"),
    ("m1 below 1", _cos_and_target(), dict(m1=0.5), ValueError, "m1 must be >= 1"),
    ("infinite m2", _cos_and_target(), dict(m2=float("inf")), ValueError,
     "m2 must be a finite number"),
    ("negative m2_std", _cos_and_target(), dict(m2_std=-0.1), ValueError, "m2_std must be >= 0"),
    ("negative m3_std", _cos_and_target(), dict(m3_std=-0.1), ValueError, "m3_std must be >= 0"),
    ("plus without std", _cos_and_target(), dict(elastic_plus=True), ValueError,
     "elastic_plus=True needs"),
    ("smoothing above 1", _cos_and_target(), dict(label_smoothing=1.5), ValueError,
     r"label_smoothing must lie in \[0.0, 1.0\]"),
    ("negative lse_square_scale", _cos_and_target(), dict(lse_square_scale=-1e-4), ValueError,
     "lse_square_scale must be >= 0"),
    ("nan lse_square_scale", _cos_and_target(), dict(lse_square_scale=float("nan")), ValueError,
     "lse_square_scale must be a finite number"),
    ("unknown margin_grad", _cos_and_target(), dict(margin_grad="approx"), ValueError,
     "unknown margin_grad 'approx'"),
]


@pytest.mark.parametrize("args,kwargs,exc,message", bad_input_params(BAD_INPUTS))
def test_bad_input_raises_clear_error(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        fusedloss.margin_cross_entropy(*args(), **kwargs)


def test_cpu_kernel_checks_targets_itself():
    """Under torch.compile the Python value checks are skipped; the C++ kernel still refuses."""
    op = torch.ops.fusedloss.margin_cross_entropy
    with pytest.raises(ValueError, match=r"target\[1\] = 7 is outside \[0, 3\)"):
        op(torch.rand(2, 3), torch.tensor([0, 7]), None, None, 64.0, 1.0, 0.5, 0.0, False, 0.0,
           0.0, -100, True)


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


@pytest.mark.parametrize("backend,device", device_backends())
def test_convergence_matches_reference(backend, device):
    """A small MLP on clustered data, 50 steps of SGD: the fused and reference loss curves agree."""
    classes, dim = 10, 16
    x, y = clustered_data(classes, dim, 32, centre_scale=3, noise=1, device=device)

    def train(backend_name):
        torch.manual_seed(1)
        net = small_mlp(dim, 8, device)
        weight = torch.nn.Parameter(torch.randn(classes, 8, dtype=torch.float64)).to(device)

        def step():
            cos = F.normalize(net(x)) @ F.normalize(weight).t()
            return fusedloss.margin_cross_entropy(cos.float(), y, scale=16.0, m2=0.3,
                                                  backend=backend_name)
        return sgd_loss_curve(step, list(net.parameters()) + [weight], lr=0.05, steps=50)

    assert_curves_agree(train(backend), train("reference"), tol=1e-3)
