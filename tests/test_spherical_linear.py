"""linear_spherical_z_loss: the factored implementation against the fp64 materialising oracle
(loss and the gradients of hidden, weight and bias), the cancellation test, gradcheck, a check
that no N x C tensor is ever made, and bad input."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedloss import spherical_linear
from fusedloss.reference import spherical as reference
from fusedloss.spherical_linear import linear_spherical_z_loss

from conftest import (assert_close, assert_gradcheck, assert_matches_oracle,
                      loss_and_grads, oracle)

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[
               pytest.mark.gpu])]


def make_inputs(n, c, d, dtype=torch.float32, bias=True, ignore=(), device="cpu"):
    h = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(c, d, dtype=torch.float64) / d ** 0.5
    q = torch.randn(c, dtype=torch.float64) if bias else None
    target = torch.randint(0, c, (n,))
    for row in ignore:
        target[row] = -100
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(h), cast(w), target.to(device), cast(q)


def linear_spherical(**options):
    """call(backend, h, w, target, q) of linear_spherical_z_loss with `options`."""
    return lambda backend, h, w, target, q: linear_spherical_z_loss(h, w, target, q,
                                                                    backend=backend, **options)


def row_weights(loss):
    """Distinct incoming gradients on the rows for reduction "none" (1 for a reduced loss)."""
    if loss.dim():
        return torch.linspace(0.5, 2.0, loss.numel(), device=loss.device, dtype=loss.dtype)
    return torch.ones_like(loss)


def run(h, w, target, q, backend="auto", **kw):
    """Loss and gradients of (hidden, weight, bias)."""
    return loss_and_grads(linear_spherical(**kw), backend, (h, w, target, q), row_weights)


def fp64_oracle(h, w, target, q, **kw):
    return oracle(linear_spherical(**kw), (h, w, target, q), row_weights)


WHAT = ("loss", "grad hidden", "grad weight", "grad bias")


def check(h, w, target, q, **kw):
    assert_matches_oracle(linear_spherical(**kw), "auto", (h, w, target, q), WHAT, row_weights)


def rel_err(got, want):
    """max |got - want| / max |want|"""
    return float((got.double().cpu() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ab", [(1.0, 0.0), (3.5, 1.2), (0.25, -2.0)], ids=str)
def test_matches_oracle(device, bias, reduction, ab):
    h, w, target, q = make_inputs(11, 29, 7, bias=bias, ignore=(3,), device=device)
    check(h, w, target, q, a=ab[0], b=ab[1], reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dtypes(dtype, bias):
    h, w, target, q = make_inputs(9, 31, 12, dtype, bias=bias, ignore=(0,))
    check(h, w, target, q, reduction="none")
    check(h, w, target, q, reduction="mean")


@pytest.mark.parametrize("elements", [1, 16, 40, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocks(monkeypatch, elements, dtype):
    """The blocked passes over the rows of W (one row per block up to one block for all), and
    repeated targets, whose scatter is summed before it is rounded to a bf16 gradient."""
    monkeypatch.setattr(spherical_linear, "_BLOCK_ELEMENTS", elements)
    h, w, target, q = make_inputs(23, 37, 5, dtype, ignore=(4, 9))
    target[10:16] = 7
    check(h, w, target, q, reduction="sum")


@pytest.mark.parametrize("n,c,d", [(1, 2, 1), (1, 2, 4), (6, 2, 1), (1, 9, 1), (4, 3, 40),
                                   (33, 70, 3), (0, 5, 3)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_odd_shapes(n, c, d, bias):
    h, w, target, q = make_inputs(n, c, d, bias=bias)
    check(h, w, target, q, reduction="sum")


def test_non_contiguous_and_int32_target():
    h, w, target, q = make_inputs(8, 15, 6, ignore=(1,))
    h_t = h.t().contiguous().t()           # column-major
    w_s = torch.cat([w, w], 1)[:, ::2]     # strided view of equal values
    w_s.copy_(w)
    q_s = torch.stack([q, q], 1)[:, 0]
    assert not (h_t.is_contiguous() or w_s.is_contiguous() or q_s.is_contiguous())
    check(h_t, w_s, target.int(), q_s, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows(reduction):
    h, w, target, q = make_inputs(7, 12, 4, ignore=(0, 2, 6))
    check(h, w, target, q, reduction=reduction)
    # Ignored rows contribute nothing, whatever their hidden vector holds (even inf or NaN).
    loss, gh, gw, gq = run(h, w, target, q, reduction=reduction)
    h2 = h.clone()
    h2[0], h2[2], h2[6] = torch.randn(4) * 1e30, float("nan"), float("inf")
    loss2, gh2, gw2, gq2 = run(h2, w, target, q, reduction=reduction)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(gw2, gw)
    torch.testing.assert_close(gq2, gq)
    assert gh[[0, 2, 6]].abs().max() == 0 and gh2[[0, 2, 6]].abs().max() == 0


def test_all_rows_ignored():
    h, w, target, q = make_inputs(3, 6, 4, ignore=(0, 1, 2))
    loss, gh, gw, gq = run(h, w, target, q, reduction="mean")
    assert torch.isnan(loss)
    assert gh.abs().max() == 0 and gw.abs().max() == 0 and gq.abs().max() == 0
    loss, *_ = run(h, w, target, q, reduction="sum")
    assert loss == 0


def test_shift_and_scale_invariance():
    """o -> alpha o + beta_i (alpha > 0, a shift per row) leaves the loss unchanged: scale W and
    the bias, add a common vector to the rows of W and a constant to the bias."""
    h, w, target, q = make_inputs(10, 20, 6, torch.float64, ignore=(5,))
    loss = linear_spherical_z_loss(h, w, target, q, reduction="none")
    shifted = linear_spherical_z_loss(h, 3.0 * w + torch.randn(6, dtype=torch.float64), target,
                                      3.0 * q - 7.0, reduction="none")
    torch.testing.assert_close(shifted, loss, rtol=1e-10, atol=1e-12)


CANCELLATION = {
    # Each makes the mean of every row of outputs at least 100 times its spread.
    "weight": dict(weight_common=1.0, bias_common=0.0),
    "bias": dict(weight_common=0.0, bias_common=1.0),
    "both": dict(weight_common=0.6, bias_common=0.4),
}


def cancellation_inputs(source, ratio, n=16, c=300, d=24):
    """Rows of W = a large common vector along a feature that every hidden vector holds
    (like a bias feature) + small noise; bias = a large constant + small noise. The noise
    gives the spread; the common parts give a mean `ratio` times larger (at least)."""
    cfg = CANCELLATION[source]
    h = torch.randn(n, d, dtype=torch.float64)
    h[:, 0] = 1.0 + 0.1 * torch.rand(n, dtype=torch.float64)
    w = torch.randn(c, d, dtype=torch.float64) / d ** 0.5
    q = torch.randn(c, dtype=torch.float64)
    spread = float((h @ w.t() + q).std(1, unbiased=False).max())
    scale = 2 * ratio * spread
    w[:, 0] += cfg["weight_common"] * scale
    q += cfg["bias_common"] * scale
    target = torch.randint(0, c, (n,))
    h, w, q = h.float(), w.float(), q.float()
    o = h.double() @ w.double().t() + q.double()
    achieved = float((o.mean(1).abs() / o.std(1, unbiased=False)).min())
    assert achieved >= ratio, achieved
    return h, w, target, q


@pytest.mark.parametrize("source", list(CANCELLATION))
@pytest.mark.parametrize("ratio", [100, 10_000])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cancellation(source, ratio, reduction):
    """fp32 loss and all gradients within 1e-4 relative of the fp64 oracle (on the same fp32
    inputs) when the outputs' mean is 100 (and 10,000) times their spread."""
    h, w, target, q = cancellation_inputs(source, ratio)
    got = run(h, w, target, q, reduction=reduction)
    want = fp64_oracle(h, w, target, q, reduction=reduction)
    errors = {what: rel_err(g, e) for g, e, what in zip(got, want, WHAT)}
    assert max(errors.values()) < 1e-4, errors


def test_cancellation_test_has_teeth():
    """At mean = 100 x spread, sigma from the uncentred Gram matrix in fp32 (the formula that
    centring replaces) misses the 1e-4 bound by far: the test above can fail."""
    h, w, target, q = cancellation_inputs("weight", 100)
    num_classes = w.shape[0]
    col_sum = w.sum(0)
    mu = h @ col_sum / num_classes + q.mean()
    qw = w.t() @ q
    mean_sq = ((h @ (w.t() @ w)) * h).sum(1) + 2 * h @ qw + q.dot(q)
    sigma_naive = (mean_sq / num_classes - mu * mu).clamp_min(0).sqrt()
    o = h.double() @ w.double().t() + q.double()
    sigma = o.std(1, unbiased=False)
    assert rel_err(sigma_naive, sigma) > 1e-3


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck(bias, reduction):
    h, w, target, q = make_inputs(5, 7, 3, torch.float64, bias=bias, ignore=(2,))
    assert_gradcheck(linear_spherical(a=2.0, b=0.5, reduction=reduction), "auto",
                     (h, w, target, q))


def test_no_grad_and_partial_grads():
    h, w, target, q = make_inputs(6, 10, 4, ignore=(1,))
    with torch.no_grad():
        loss = linear_spherical_z_loss(h, w, target, q)
    want = fp64_oracle(h, w, target, q)
    assert_close(loss, want[0], torch.float32, "loss")
    # Only the weight needs a gradient.
    w_leaf = w.clone().requires_grad_()
    linear_spherical_z_loss(h, w_leaf, target, q).backward()
    assert_close(w_leaf.grad, want[2], torch.float32, "grad weight")
    # Only the bias.
    q_leaf = q.clone().requires_grad_()
    linear_spherical_z_loss(h, w, target, q_leaf).backward()
    assert_close(q_leaf.grad, want[3], torch.float32, "grad bias")


def test_autocast_keeps_fp32_accuracy():
    """Under CPU autocast the products stay in fp32 (the loss is fp32, as cross_entropy's)."""
    h, w, target, q = make_inputs(8, 25, 6, ignore=(2,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(h, w, target, q, reduction="none")
    want = fp64_oracle(h, w, target, q, reduction="none")
    for g, e, what in zip(got, want, WHAT):
        assert g.dtype == torch.float32, what
        assert_close(g, e, torch.float32, what)


class _Sizes(TorchDispatchMode):
    """Records the number of elements of every tensor that an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func)))
        return out


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_no_n_by_c_tensor(backend):
    """No op makes a tensor of N x C elements, in forward or backward. N, C and d are chosen
    so that every tensor the factored method needs (C (d + 2) for a block of [W | bias | 1],
    N d, d^2, N, C) is much smaller than N C; the reference, which forms the outputs, is the
    control that the check sees them, and the backward's scatter that it sees the backward."""
    n, c, d = 64, 97, 7
    h, w, target, q = make_inputs(n, c, d, ignore=(3,))
    h, w, q = (t.requires_grad_() for t in (h, w, q))
    with _Sizes() as sizes:
        loss = linear_spherical_z_loss(h, w, target, q, backend=backend)
        loss.backward()
    largest = max(sizes.sizes)
    if backend == "reference":
        assert largest[0] >= n * c
    else:
        assert largest[0] <= c * (d + 2) < n * c, largest
        assert any("index_add_" in op for _, op in sizes.sizes)


BAD = [
    (dict(hidden=torch.randn(4)), ValueError, "hidden must be 2-D"),
    (dict(weight=torch.randn(6, 3, 1)), ValueError, "weight must be 2-D"),
    (dict(weight=torch.randn(6, 5)), ValueError, "must share d"),
    (dict(weight=torch.randn(1, 3), bias=torch.randn(1)), ValueError, "at least 2 classes"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \[C\] = \[6\]"),
    (dict(bias=torch.randn(6, 1)), ValueError, "bias must be 1-D"),
    (dict(weight=torch.randn(6, 3).double()), TypeError, "must share a dtype"),
    (dict(bias=torch.randn(6).half()), TypeError, "must share a dtype"),
    (dict(hidden=torch.randint(0, 3, (4, 3))), TypeError, "hidden must be float16"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, r"target must have shape \[4\]"),
    (dict(target=torch.tensor([0.0, 1, 2, 3])), TypeError, "integer class indices"),
    (dict(target=torch.tensor([0, 1, 6, 2])), ValueError, r"target\[2\] = 6 is outside \[0, 6\)"),
    (dict(target=torch.tensor([0, -1, 2, 3])), ValueError, r"target\[1\] = -1"),
    (dict(a=0.0), ValueError, "a must be > 0"),
    (dict(a=-1.0), ValueError, "a must be > 0"),
    (dict(a=float("inf")), ValueError, "a must be a finite number"),
    (dict(b=float("nan")), ValueError, "b must be a finite number"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(reduction="avg"), ValueError, "unknown reduction"),
    (dict(backend="tpu"), ValueError, "unknown backend"),
    (dict(backend="triton"), ValueError, "no Triton kernel for linear_spherical_z_loss"),
    (dict(backend="cuda"), ValueError, "backend 'cuda' runs on cuda tensors"),
    (dict(hidden=[[1.0]]), TypeError, "hidden must be a tensor"),
]


@pytest.mark.parametrize("bad,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(bad, exc, match):
    args = dict(hidden=torch.randn(4, 3), weight=torch.randn(6, 3),
                target=torch.tensor([0, 1, 5, -100]), bias=torch.randn(6))
    kwargs = {k: bad.pop(k) for k in list(bad) if k not in args}
    args.update(bad)
    with pytest.raises(exc, match=match):
        linear_spherical_z_loss(args["hidden"], args["weight"], args["target"], args["bias"],
                                **kwargs)


def test_backends_agree():
    h, w, target, q = make_inputs(5, 9, 4, torch.float64, ignore=(1,))
    want = linear_spherical_z_loss(h, w, target, q, backend="reference")
    for backend in ("auto", "cpu"):
        got = linear_spherical_z_loss(h, w, target, q, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        want, reference.spherical_z_loss(h @ w.t() + q, target), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph(dtype):
    h, w, target, q = make_inputs(9, 13, 5, dtype, ignore=(1,))
    fn = torch.compile(lambda *args: linear_spherical_z_loss(*args, a=2.0, b=0.5), fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (h, w, q)]
    loss = fn(leaves[0], leaves[1], target, leaves[2])
    loss.backward()
    want = fp64_oracle(h, w, target, q, a=2.0, b=0.5)
    for got, expected, what in zip([loss.detach()] + [t.grad for t in leaves], want, WHAT):
        assert_close(got, expected, dtype, what)
