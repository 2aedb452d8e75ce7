"""orthogonal_projection_loss against the authors' dense formula (Ranasinghe et al., ICCV 2021,
their loss.py), on every backend, in fp64: the defaults, the absolute variant, a reference set,
batches without negative or positive pairs, the empty batch, and the memory bank. The shared
tests (test_specs.py and the others) compare it with the oracle fusedloss.reference.pairs."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import device_backends

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def authors_opl(features, labels, gamma=0.5, absolute=False, ref=None, ref_labels=None):
    """The authors' formula as written in their loss.py, dense: masks of the same-label pairs
    off the diagonal and of the different-label pairs, the means of S over each (the count
    plus 1e-6), |S| on the negatives in the absolute variant. With a reference set every
    (row, reference) pair counts."""
    features = F.normalize(features, p=2, dim=1)
    if ref is None:
        ref, ref_labels = features, labels
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    else:
        ref = F.normalize(ref, p=2, dim=1)
        eye = torch.zeros(len(labels), len(ref_labels), dtype=torch.bool, device=labels.device)
    mask = labels[:, None] == ref_labels[None, :]
    mask_pos = mask.masked_fill(eye, False).to(features.dtype)
    mask_neg = (~mask).to(features.dtype)
    dot = features @ ref.t()
    pos_mean = (mask_pos * dot).sum() / (mask_pos.sum() + 1e-6)
    neg = mask_neg * dot
    neg_mean = (neg.abs() if absolute else neg).sum() / (mask_neg.sum() + 1e-6)
    return (1.0 - pos_mean) + gamma * neg_mean


def _batch(n, d, classes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    return x.to(device).requires_grad_(), labels.to(device)


def _loss_and_grads(loss, leaves):
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach()] + [g.detach() for g in grads]


def _assert_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


BACKENDS = [pytest.param("reference", "cpu", id="reference")] + device_backends()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("gamma,absolute", [(0.5, False), (0.5, True), (2.0, True), (0.0, False)])
def test_matches_the_authors_formula(backend, device, gamma, absolute):
    x, labels = _batch(37, 9, 4, device)
    want = _loss_and_grads(authors_opl(x, labels, gamma, absolute), [x])
    got = fusedloss.orthogonal_projection_loss(x, labels, gamma=gamma, absolute=absolute,
                                               backend=backend)
    _assert_close(_loss_and_grads(got, [x]), want)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("absolute", [False, True])
def test_reference_set_matches_the_authors_formula(backend, device, absolute):
    x, labels = _batch(21, 8, 3, device, seed=1)
    ref, ref_labels = _batch(34, 8, 3, device, seed=2)
    want = _loss_and_grads(authors_opl(x, labels, absolute=absolute, ref=ref,
                                       ref_labels=ref_labels), [x, ref])
    got = fusedloss.orthogonal_projection_loss(x, labels, ref, ref_labels, absolute=absolute,
                                               backend=backend)
    _assert_close(_loss_and_grads(got, [x, ref]), want)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("classes", [1, 40])
def test_no_negative_or_no_positive_pairs(backend, device, classes):
    """One class: no negative pair, d = 0. Every row its own class: no positive pair, s = 0.
    Finite, and equal to the authors' value."""
    x, _ = _batch(40, 6, 1, device, seed=3)
    labels = torch.arange(40, device=device) % classes
    got = fusedloss.orthogonal_projection_loss(x, labels, absolute=True, backend=backend)
    values = _loss_and_grads(got, [x])
    assert all(torch.isfinite(v).all() for v in values)
    _assert_close(values, _loss_and_grads(authors_opl(x, labels, absolute=True), [x]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch_is_one_with_zero_gradient(backend, device):
    x = torch.zeros(0, 5, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=device)
    loss = fusedloss.orthogonal_projection_loss(x, labels, backend=backend)
    assert loss.item() == 1.0 == authors_opl(x, labels).item()
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float32_matches_the_fp64_formula(backend, device):
    x, labels = _batch(70, 33, 5, device, seed=4)
    want = _loss_and_grads(authors_opl(x, labels, absolute=True), [x])
    x32 = x.detach().float().requires_grad_()
    got = fusedloss.orthogonal_projection_loss(x32, labels, absolute=True, backend=backend)
    for a, b in zip(_loss_and_grads(got, [x32]), want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_gradcheck_cpu():
    x, labels = _batch(9, 4, 3, "cpu", seed=5)
    for absolute in (False, True):
        assert torch.autograd.gradcheck(
            lambda t: fusedloss.orthogonal_projection_loss(t, labels, absolute=absolute,
                                                           backend="cpu"), (x,))


def test_cross_batch_memory():
    """nn.CrossBatchMemory(loss="orthogonal_projection"): the batch against the filled bank,
    its own slots dropped, the bank detached; the authors' formula on that set of pairs."""
    bank = fusedloss.nn.CrossBatchMemory(6, 32, loss="orthogonal_projection", gamma=1.0,
                                         absolute=True)
    first, first_labels = _batch(10, 6, 3, "cpu", seed=6)
    bank(first.float(), first_labels)
    x, labels = _batch(10, 6, 3, "cpu", seed=7)
    loss = bank(x.float(), labels)
    memory = torch.cat([first, x]).detach()
    memory_labels = torch.cat([first_labels, labels])
    eye = torch.zeros(10, 20, dtype=torch.bool)
    eye[torch.arange(10), 10 + torch.arange(10)] = True
    f, r = F.normalize(x, dim=1), F.normalize(memory, dim=1)
    same = labels[:, None] == memory_labels[None, :]
    pos, neg = (same & ~eye).double(), (~same & ~eye).double()
    dot = f @ r.t()
    want = ((1 - (pos * dot).sum() / (pos.sum() + 1e-6))
            + (neg * dot).abs().sum() / (neg.sum() + 1e-6))
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
