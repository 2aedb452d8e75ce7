"""The epilogues of the margin engine on margin_cross_entropy and linear_margin_cross_entropy:
tau (the comp-sum family), extra_negatives (shared extra columns), return_lse, softcap and
the inter-class filtering, each against the plain oracle (fusedloss.reference.margin) in fp64
and, for tau, against the closed forms of its named members."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.reference import margin as ref

from conftest import assert_close, device_backends


def _problem(n=7, c=33, dtype=torch.float64, device="cpu", seed=0, ignored=(2,)):
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1
    target = torch.randint(0, c, (n,), generator=g)
    for row in ignored:
        target[row] = -100
    extra = torch.rand(5, generator=g, dtype=torch.float64) * 2 - 1
    return cos.to(dtype).to(device), target.to(device), extra.to(dtype).to(device)


def _run(fn, backend, leaves, target, lse_weight=0.0, **kw):
    """(loss, lse or None, grads of leaves) of fn(*leaves[:k], target, ...), backpropagated
    from a fixed upstream, plus lse_weight * sum(lse^2) when return_lse."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    head, extra = leaves[:-1], leaves[-1]
    out = fn(*head, target, extra_negatives=extra, backend=backend, **kw)
    loss, lse = out if isinstance(out, tuple) else (out, None)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    total = (loss * upstream.to(loss.device)).sum()
    if lse is not None:
        total = total + lse_weight * (lse * lse).sum()
    total.backward()
    return loss.detach(), lse, [None if t is None else t.grad for t in leaves]


def _oracle_leaves(leaves):
    return [None if t is None else t.detach().double().cpu() for t in leaves]


def _compare(fn, backend, leaves, target, dtype, **kw):
    got = _run(fn, backend, leaves, target, **kw)
    want = _run(fn, "reference", _oracle_leaves(leaves), target.cpu(), **kw)
    assert got[0].dtype == dtype
    assert_close(got[0].cpu(), want[0], dtype, "loss")
    if want[1] is not None:
        assert_close(got[1].detach().cpu(), want[1].detach(), dtype, "lse")
    for k, (g, w) in enumerate(zip(got[2], want[2])):
        if w is None:
            assert g is None
            continue
        assert g.dtype == dtype, k
        assert_close(g.cpu(), w, dtype, f"grad {k}")


EPILOGUES = {
    "gce": dict(tau=1.7, m2=0.5),
    "sum-exp": dict(tau=0.0, scale=8.0),
    "mae z-term": dict(tau=2.0, m3=0.35, lse_square_scale=1e-3),
    "smoothing": dict(m2=0.5, label_smoothing=0.1),
    "plain": dict(scale=16.0),
    "softcap": dict(scale=16.0, softcap=5.0, label_smoothing=0.1),
    "filtering": dict(m2=0.5, interclass_filtering_threshold=0.3),
    "softcap filtering gce": dict(scale=16.0, softcap=8.0, interclass_filtering_threshold=0.2,
                                  tau=1.5),
}


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("variant", list(EPILOGUES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_extra", [False, True], ids=["no extra", "extra"])
def test_logits_match_the_oracle(backend, device, variant, reduction, dtype, with_extra):
    cos, target, extra = _problem(dtype=dtype, device=device)
    leaves = [cos, extra if with_extra else None]
    _compare(fusedloss.margin_cross_entropy, backend, leaves, target, dtype,
             reduction=reduction, return_lse=True, lse_weight=0.01, **EPILOGUES[variant])


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("variant", list(EPILOGUES))
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_the_oracle(backend, device, variant, normalize):
    _, target, extra = _problem(device=device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 12, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(33, 12, generator=g, dtype=torch.float64).to(device)
    kw = dict(EPILOGUES[variant])
    if not normalize:
        kw["scale"] = 1.0
    _compare(fusedloss.linear_margin_cross_entropy, backend, [x, w, extra], target,
             torch.float64, normalize=normalize, return_lse=True, lse_weight=0.01, **kw)


@pytest.mark.parametrize("backend,device", device_backends())
def test_tau_gives_the_named_losses(backend, device):
    """tau = 0: sum_{j != y} exp(z_j - z_y); 1 + q: (1 - p_y^q) / q; 2: 1 - p_y."""
    cos, target, _ = _problem(ignored=(), device=device)
    z = 4.0 * cos.cpu()
    p_y = F.softmax(z, 1).gather(1, target.cpu()[:, None]).squeeze(1)
    z_y = z.gather(1, target.cpu()[:, None])
    named = {0.0: (torch.exp(z - z_y).sum(1) - 1.0), 1.7: (1 - p_y ** 0.7) / 0.7, 2.0: 1 - p_y}
    for tau, expected in named.items():
        got = fusedloss.margin_cross_entropy(cos, target, scale=4.0, tau=tau, reduction="none",
                                             backend=backend)
        assert_close(got.cpu(), expected, torch.float64, f"tau={tau}")


@pytest.mark.parametrize("backend,device", device_backends())
def test_tau_one_is_cross_entropy_bit_for_bit(backend, device):
    cos, target, _ = _problem(dtype=torch.float32, device=device)
    plain = fusedloss.margin_cross_entropy(cos, target, m2=0.5, backend=backend)
    assert torch.equal(plain, fusedloss.margin_cross_entropy(cos, target, m2=0.5, tau=1.0,
                                                             backend=backend))


@pytest.mark.parametrize("backend,device", device_backends())
def test_tau_below_one_overflows_to_inf_not_nan(backend, device):
    """At scale 64 the sum-exponential loss of a row with cos_y = -1 and cos_j = 1 is
    exp(128) (C - 1), beyond fp32: inf, as the math says."""
    cos = torch.ones(2, 8, device=device)
    target = torch.tensor([0, 3], device=device)
    cos[0, 0] = -1.0
    rows = fusedloss.margin_cross_entropy(cos, target, tau=0.0, reduction="none",
                                          backend=backend)
    assert torch.isinf(rows[0]) and rows[0] > 0
    assert torch.isfinite(rows[1])


@pytest.mark.parametrize("backend,device", device_backends())
def test_empty_extra_negatives_change_nothing(backend, device):
    cos, target, extra = _problem(device=device)
    with_none = fusedloss.margin_cross_entropy(cos, target, m2=0.5, backend=backend)
    with_empty = fusedloss.margin_cross_entropy(cos, target, m2=0.5, backend=backend,
                                                extra_negatives=extra[:0])
    assert_close(with_empty, with_none, torch.float64, "loss")


def test_extra_negatives_gradient_needs_no_n_by_l_block():
    """The gradient of e is O(N + L): a batch of 64 rows with 20,000 shared columns matches
    the oracle's concatenation."""
    cos, target, _ = _problem(n=64, c=50, ignored=(3, 9))
    extra = torch.rand(20_000, dtype=torch.float64) * 2 - 1
    _compare(fusedloss.margin_cross_entropy, "cpu", [cos, extra], target, torch.float64,
             m2=0.5, label_smoothing=0.1)


def test_every_row_ignored_gives_zero_gradient_to_the_extra_columns():
    cos, target, extra = _problem(ignored=range(7))
    e = extra.clone().requires_grad_()
    loss = fusedloss.margin_cross_entropy(cos, target, extra_negatives=e, reduction="sum",
                                          backend="cpu")
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(e.grad, torch.zeros_like(e))


_BAD_EXTRA = [
    ("2-D", lambda e: e[None, :], ValueError, "extra_negatives must be 1-D"),
    ("integer", lambda e: e.long(), TypeError, "extra_negatives must be float16"),
    ("other dtype", lambda e: e.float(), TypeError, "extra_negatives must have the dtype of"),
    ("other device", lambda e: e.to("meta"), RuntimeError, "all tensors must be on one device"),
    ("not a tensor", lambda e: e.tolist(), TypeError, "extra_negatives must be a tensor"),
]


@pytest.mark.parametrize("fn", ["margin_cross_entropy", "linear_margin_cross_entropy",
                                "sharded_margin_cross_entropy",
                                "linear_sharded_margin_cross_entropy"])
@pytest.mark.parametrize("case", _BAD_EXTRA, ids=[c[0] for c in _BAD_EXTRA])
def test_bad_extra_negatives_raise(fn, case):
    _, change, exc, message = case
    cos, target, extra = _problem()
    x, w = torch.randn(7, 4, dtype=torch.float64), torch.randn(33, 4, dtype=torch.float64)
    inputs = (cos,) if "linear" not in fn else (x, w)
    kw = dict(class_start=0, num_classes=33) if "sharded" in fn else {}
    with pytest.raises(exc, match=message):
        getattr(fusedloss, fn)(*inputs, target, extra_negatives=change(extra), backend="cpu",
                               **kw)


def test_cuda_backend_refuses_the_engine_options():
    cos, target, _ = _problem()
    with pytest.raises(RuntimeError, match="no CUDA C\\+\\+ kernel"):
        fusedloss.margin_cross_entropy(cos, target, tau=1.5, backend="cuda")


@pytest.mark.parametrize("module", ["MarginCrossEntropy", "MarginSoftmaxHead"])
def test_modules_take_tau(module):
    cos, target, _ = _problem(ignored=())
    if module == "MarginCrossEntropy":
        m = fusedloss.nn.MarginCrossEntropy("cosface", tau=1.7)
        got, want = m(cos, target), ref.margin_cross_entropy(cos, target, scale=64.0, m3=0.4,
                                                            tau=1.7)
    else:
        m = fusedloss.nn.MarginSoftmaxHead(4, 33, "cosface", tau=1.7, dtype=torch.float64)
        x = torch.randn(7, 4, dtype=torch.float64)
        got = m(x, target)
        want = ref.linear_margin_cross_entropy(x, m.weight.detach(), target, scale=64.0, m3=0.4,
                                               tau=1.7)
    assert_close(got.detach(), want, torch.float64, module)


def test_softcap_is_gemma_capping_and_filtering_is_insightface_masking():
    """The oracle's options against their sources' formulas: Gemma 2's
    cap * tanh(logits / cap) before cross-entropy; insightface's CombinedMarginLoss mask
    (non-target cosines above the threshold multiplied by 0, under no_grad)."""
    cos, target, _ = _problem(ignored=())
    z = 16.0 * cos
    capped = F.cross_entropy(5.0 * torch.tanh(z / 5.0), target)
    got = fusedloss.margin_cross_entropy(cos, target, scale=16.0, softcap=5.0, backend="cpu")
    assert_close(got, capped, torch.float64, "softcap")
    c = cos.clone().requires_grad_()
    with torch.no_grad():
        dirty = (c > 0.3).double()
        dirty.scatter_(1, target[:, None], 0.0)
    masked = (1 - dirty) * c
    want = fusedloss.margin_cross_entropy(masked, target, m2=0.5, backend="reference")
    want.backward()
    mine = cos.clone().requires_grad_()
    got = fusedloss.margin_cross_entropy(mine, target, m2=0.5, interclass_filtering_threshold=0.3,
                                         backend="cpu")
    got.backward()
    assert_close(got.detach(), want.detach(), torch.float64, "filtered loss")
    assert_close(mine.grad, c.grad, torch.float64, "filtered grad")


# ---- inplace_backward ------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("kw", [dict(m2=0.5), dict(m3=0.35, label_smoothing=0.1, tau=1.0),
                                dict(scale=16.0, tau=1.7, reduction="sum")],
                         ids=["arcface", "cosface smoothing", "gce"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_inplace_backward_gives_the_gradient_in_cos_storage(backend, device, kw, sharded):
    """The gradient equals the default path's; for a cos produced in the graph it is handed
    to the producer in cos's own storage (a leaf's AccumulateGrad copies it, as for any
    gradient that aliases a live tensor)."""
    cos, target, _ = _problem(dtype=torch.float32, device=device)
    fn = fusedloss.margin_cross_entropy
    extra = {}
    if sharded:
        fn, extra = fusedloss.sharded_margin_cross_entropy, dict(class_start=0, num_classes=33)
    plain = cos.clone().requires_grad_()
    fn(plain, target, backend=backend, **extra, **kw).backward()
    leaf = cos.clone().requires_grad_()
    loss = fn(leaf, target, backend=backend, inplace_backward=True, **extra, **kw)
    loss.backward()
    assert_close(leaf.grad, plain.grad, torch.float32, "leaf")
    base = cos.clone().requires_grad_()
    produced = base * 1.0  # MulBackward saves the scalar only
    storage = []
    produced.register_hook(lambda g: storage.append(g.data_ptr()))
    fn(produced, target, backend=backend, inplace_backward=True, **extra, **kw).backward()
    assert storage == [produced.data_ptr()]
    assert_close(base.grad, plain.grad, torch.float32, "through the producer")


def test_inplace_backward_raises_when_cos_is_needed_elsewhere():
    cos, target, _ = _problem(dtype=torch.float32)
    base = cos.clone().requires_grad_()
    produced = torch.tanh(base)  # TanhBackward saves its output: cos itself
    loss = fusedloss.margin_cross_entropy(produced, target, scale=16.0, inplace_backward=True,
                                          backend="cpu")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_raises_on_a_second_backward():
    cos, target, _ = _problem(dtype=torch.float32)
    leaf = cos.clone().requires_grad_()
    loss = fusedloss.margin_cross_entropy(leaf, target, m2=0.5, inplace_backward=True,
                                          backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("change,message", [
    (lambda c: c, "needs cos that requires grad"),
    (lambda c: c.t().contiguous().t().requires_grad_(), "needs a contiguous cos"),
], ids=["no grad", "column-major"])
def test_inplace_backward_bad_inputs(change, message):
    cos, target, _ = _problem(dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        fusedloss.margin_cross_entropy(change(cos), target, inplace_backward=True, backend="cpu")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_on_the_engine_is_like_cross_entropy(reduction):
    """N = 0 with tau and extra columns: NaN for "mean", 0 for "sum", empty for "none", as
    F.cross_entropy; zero gradients for the extra columns."""
    cos = torch.empty(0, 5, requires_grad=True)
    target = torch.empty(0, dtype=torch.long)
    extra = torch.rand(3, requires_grad=True)
    loss = fusedloss.margin_cross_entropy(cos, target, tau=1.5, reduction=reduction,
                                          extra_negatives=extra, backend="cpu")
    want = F.cross_entropy(torch.empty(0, 5), target, reduction=reduction)
    assert loss.shape == want.shape
    assert torch.equal(loss.detach().isnan(), want.isnan())
    loss.sum().backward()
    assert torch.equal(extra.grad, torch.zeros(3))
