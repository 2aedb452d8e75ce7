"""What is particular to the multi-label margin loss (fusedloss.multilabel_margin_cross_entropy
and its linear form): positives that dominate the row at scale 64 (where all-minus-positives
would cancel), duplicates and padding, the order of the targets, rows without positives,
gradchecks in fp64, per-row upstream weights on the linear form's recomputing backward. The
oracle comparisons over every sample, backend and bad input come from the specs."""
import pytest
import torch

import fusedloss

from conftest import assert_close, cpu_and_gpu_backends

BACKENDS = cpu_and_gpu_backends(gpu_backends=("triton",))
INTERPRETED = [pytest.param("triton", "cpu", id="triton-interpreted", marks=pytest.mark.triton)]


def _loss_and_grad(backend, cos, targets, **kw):
    cos = cos.detach().clone().requires_grad_()
    loss = fusedloss.multilabel_margin_cross_entropy(cos, targets, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), cos)
    return loss.detach(), grad


def _dominant(device, n=4, c=2000):
    """Three positives at cos 0.999, every negative at -0.5: at scale 64 the positives'
    exp(64 * 0.999) outweighs the negatives' sum exp(-32) * C by ~1e40."""
    cos = torch.full((n, c), -0.5, device=device)
    cos[:, :3] = 0.999
    return cos, torch.tensor([[0, 1, 2]] * n, device=device)


@pytest.mark.parametrize("backend,device", BACKENDS + INTERPRETED)
def test_positives_that_dominate_leave_the_negatives_exact(backend, device):
    """L_neg = log(1 + C' exp(-32)) ~ C' exp(-32): fp32 all-minus-positives would give 0 or
    noise of size exp(64) * 2^-24 instead. The fused rows agree with the fp64 oracle."""
    cos, targets = _dominant(device)
    loss, grad = _loss_and_grad(backend, cos, targets, reduction="none")
    want, want_grad = _loss_and_grad("reference", cos.double(), targets, reduction="none")
    assert_close(loss.cpu(), want.cpu(), torch.float32, "loss")
    assert_close(grad.cpu(), want_grad.cpu(), torch.float32, "grad")
    negatives = grad[:, 3:].double().cpu()
    expected = 64 * torch.exp(torch.tensor(-32.0, dtype=torch.float64))
    torch.testing.assert_close(negatives, torch.full_like(negatives, float(expected)),
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS + INTERPRETED)
def test_duplicates_count_once_and_order_does_not_matter(backend, device):
    g = torch.Generator().manual_seed(3)
    cos = (torch.rand(6, 150, generator=g, dtype=torch.float64) * 2 - 1).to(device)
    unique = torch.stack([torch.randperm(150, generator=g)[:5] for _ in range(6)]).to(device)
    repeated = torch.cat([unique, unique[:, :3]], dim=1)
    shuffled = repeated[:, torch.randperm(8, generator=g).to(device)]
    padded = torch.cat([shuffled, torch.full((6, 2), -100, device=device)], dim=1)
    base = _loss_and_grad(backend, cos, unique, m2=0.5, reduction="none")
    for other in (repeated, shuffled, padded):
        for a, b in zip(_loss_and_grad(backend, cos, other, m2=0.5, reduction="none"), base):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS + INTERPRETED)
def test_rows_without_positives_are_ignored(backend, device):
    g = torch.Generator().manual_seed(4)
    cos = (torch.rand(5, 40, generator=g) * 2 - 1).to(device)
    targets = torch.randint(0, 40, (5, 3), generator=g).to(device)
    targets[[1, 3]] = -100
    rows, grad = _loss_and_grad(backend, cos, targets, reduction="none")
    assert torch.all(rows[[1, 3]] == 0) and torch.all(grad[[1, 3]] == 0)
    mean = fusedloss.multilabel_margin_cross_entropy(cos, targets, backend=backend)
    torch.testing.assert_close(mean, rows[[0, 2, 4]].mean())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_fp64(backend, device):
    g = torch.Generator().manual_seed(5)
    cos = (torch.rand(4, 23, generator=g, dtype=torch.float64) * 1.8 - 0.9).to(device)
    targets = torch.randint(0, 23, (4, 3), generator=g).to(device)
    targets[2, 1] = -100
    for kw in (dict(scale=4.0, m2=0.3), dict(scale=8.0, m1=1.35, m3=0.1)):
        assert torch.autograd.gradcheck(
            lambda c: fusedloss.multilabel_margin_cross_entropy(c, targets, backend=backend,
                                                                reduction="sum", **kw),
            (cos.requires_grad_(),))


def test_linear_form_row_weights_recompute_in_backward():
    """reduction="none" with per-row upstream weights takes the recomputing backward."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(11, 9, generator=g, dtype=torch.float64)
    w = torch.randn(37, 9, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 37, (11, 4), generator=g)
    targets[4] = -100
    up = torch.rand(11, generator=g, dtype=torch.float64)
    grads = []
    for backend in ("cpu", "reference"):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        rows = fusedloss.linear_multilabel_margin_cross_entropy(
            *leaves, targets, m2=0.5, reduction="none", block_size=3, backend=backend)
        grads.append((rows.detach(), *torch.autograd.grad((rows * up).sum(), leaves)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_k_64_distinct_positives():
    g = torch.Generator().manual_seed(7)
    cos = torch.rand(3, 500, generator=g, dtype=torch.float64) * 2 - 1
    targets = torch.stack([torch.randperm(500, generator=g)[:64] for _ in range(3)])
    got = _loss_and_grad("cpu", cos, targets, m3=0.2, reduction="none")
    want = _loss_and_grad("reference", cos, targets, m3=0.2, reduction="none")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_head_multilabel_is_the_linear_function():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 25, (6, 3), generator=g)
    head = fusedloss.nn.MarginSoftmaxHead(8, 25, "cosface", multilabel=True,
                                          dtype=torch.float64)
    want = fusedloss.linear_multilabel_margin_cross_entropy(x, head.weight, targets, scale=64.0,
                                                            m3=0.4, backend="reference")
    torch.testing.assert_close(head(x, targets), want)


@pytest.mark.parametrize("make,message", [
    (lambda: fusedloss.nn.MarginSoftmaxHead(8, 25, "elastic_arcface", multilabel=True),
     "['m2_std'] do not apply with multilabel=True"),
    (lambda: fusedloss.nn.MarginSoftmaxHead(8, 25, multilabel=True, label_smoothing=0.1),
     "['label_smoothing'] do not apply with multilabel=True"),
    (lambda: fusedloss.nn.MarginSoftmaxHead(8, 25, multilabel=True, unpg=True),
     "unpg=True does not apply with multilabel=True"),
    (lambda: fusedloss.nn.PartialFC(8, 25, multilabel=True, scale=0.0),
     "scale must be > 0, got 0.0"),
    (lambda: fusedloss.nn.PartialFC(8, 25, multilabel=True)(torch.randn(4, 8),
                                                            torch.zeros(4, 65).long()),
     "not integer tensors of shape [n, K] (1 <= K <= 64)"),
])
def test_module_multilabel_refuses_what_does_not_apply(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_triton_ops_equal_the_cpu_ops_on_a_shard(dtype):
    """multilabel_margin_stats and multilabel_margin_grad of the Triton launchers (under the
    interpreter) against the CPU kernels, on the shard [10, 43) of 60 classes, with targets
    inside and outside it, padding, a repeat, a row without positives and a zero-weight row."""
    from fusedloss.triton_kernels import multilabel as triton_ops
    g = torch.Generator().manual_seed(11)
    cos = (torch.rand(6, 33, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    targets = torch.randint(0, 60, (6, 5), generator=g)
    targets[0, :2] = torch.tensor([12, 12])
    targets[1] = -100
    targets[2, 4] = -100
    hyper = (16.0, 1.0, 0.3, 0.1, False, 10, 60, -100)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.ops.fusedloss.multilabel_margin_stats(cos, targets, *hyper)
    got = triton_ops.multilabel_margin_stats(cos, targets, *hyper)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    coef = torch.rand(6, 4, generator=g, dtype=acc)
    coef[:, 1], coef[:, 3] = want[:, 0], torch.where(torch.isfinite(want[:, 1]), want[:, 1], 0.0)
    coef[3, 0] = coef[3, 2] = 0.0
    want_grad = torch.ops.fusedloss.multilabel_margin_grad(cos, targets, coef, *hyper)
    got_grad = triton_ops.multilabel_margin_grad(cos, targets, coef, *hyper)
    assert_close(got_grad, want_grad.double(), dtype, "grad")
    assert torch.all(got_grad[3] == 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_convergence_matches_reference(backend, device):
    """A small MLP on clustered data, each point's class and the next as its positives, 50
    SGD steps through the fused linear head: the fused and reference loss curves agree."""
    from conftest import assert_curves_agree, clustered_data, sgd_loss_curve, small_mlp
    classes, dim = 10, 16
    x, y = clustered_data(classes, dim, 32, centre_scale=3, noise=1, device=device)
    targets = torch.stack([y, (y + 1) % classes], dim=1)

    def train(backend_name):
        torch.manual_seed(1)
        net = small_mlp(dim, 8, device)
        weight = torch.nn.Parameter(torch.randn(classes, 8, dtype=torch.float64).to(device))

        def step():
            return fusedloss.linear_multilabel_margin_cross_entropy(
                net(x).float(), weight.float(), targets, scale=16.0, m2=0.3, backend=backend_name)
        return sgd_loss_curve(step, list(net.parameters()) + [weight], lr=0.05, steps=50)

    assert_curves_agree(train(backend), train("reference"), tol=1e-3)
