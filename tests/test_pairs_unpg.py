"""unpg_negatives against a plain dense implementation of the authors' procedure (UNPG, Jung et
al. 2022: the negative pairs of the upper triangle, sorted, Tukey's fences at the sorted
values of index floor(L / 4) and floor(3 L / 4)), in fp64, with gradients; the blocked
implementation over several blocks; the edge cases (no negative pair, N < 2, NaN). The shared
tests compare it with the oracle fusedloss.reference.pairs.unpg_negatives."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import pairs

BACKENDS = ["reference", "cpu"]


def authors_negatives(features, labels, whisker):
    """The authors' steps, dense: the cosine matrix, the flattened upper-triangle negatives,
    torch.sort, the quartiles at int(0.25 L) and int(0.75 L), the fences."""
    normed = F.normalize(features)
    similarity = (normed @ normed.t()).view(-1)
    negative = (labels[:, None] != labels[None, :]).triu(diagonal=1).view(-1)
    values = torch.sort(similarity[negative])[0]
    count = values.size(0)
    lower, upper = values[int(0.25 * count)], values[int(0.75 * count)]
    spread = upper - lower
    return values[(values <= upper + whisker * spread) & (values >= lower - whisker * spread)]


def _batch(n, d, classes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return x, torch.randint(0, classes, (n,), generator=g)


def _values_and_grad(values, x):
    """The values and the gradient of a weighted sum (distinct weights, so that each position's
    pair gets its own share)."""
    weights = torch.linspace(0.5, 1.5, values.numel(), dtype=values.dtype)
    (grad,) = torch.autograd.grad((values * weights).sum(), x)
    return values.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("whisker", [1.5, 0.0, 0.3, 10.0])
def test_matches_the_authors_procedure(backend, whisker):
    x, labels = _batch(60, 12, 5)
    want = _values_and_grad(authors_negatives(x, labels, whisker), x)
    got = _values_and_grad(fusedloss.unpg_negatives(x, labels, whisker=whisker, backend=backend),
                           x)
    assert got[0].shape == want[0].shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_the_fences_drop_outliers():
    """A whisker of 0 keeps exactly the values between the two quartiles."""
    x, labels = _batch(40, 6, 4, seed=1)
    everything = fusedloss.unpg_negatives(x, labels, whisker=1e9)
    kept = fusedloss.unpg_negatives(x, labels, whisker=0.0)
    count = everything.numel()
    assert torch.equal(kept, everything[count // 4:(3 * count) // 4 + 1])


def test_blocks(monkeypatch):
    """Several row blocks (3 rows each) give the same values and gradient as one."""
    x, labels = _batch(20, 7, 3, seed=2)
    whole = _values_and_grad(fusedloss.unpg_negatives(x, labels, backend="cpu"), x)
    monkeypatch.setattr(pairs, "_MINER_BLOCK_ELEMENTS", 60)
    assert len(pairs._unpg_blocks(20)) == 7
    blocked = _values_and_grad(fusedloss.unpg_negatives(x, labels, backend="cpu"), x)
    for a, b in zip(blocked, whole):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_fp64(backend):
    x, labels = _batch(48, 32, 6, seed=3)
    want = _values_and_grad(authors_negatives(x, labels, 1.5), x)
    x32 = x.detach().float().requires_grad_()
    got = _values_and_grad(fusedloss.unpg_negatives(x32, labels, backend=backend), x32)
    assert got[0].dtype == torch.float32 and got[0].shape == want[0].shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,classes", [(0, 1), (1, 1), (5, 1)])
def test_no_negative_pair_gives_an_empty_tensor(backend, n, classes):
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(n, dtype=torch.long)
    values = fusedloss.unpg_negatives(x, labels, backend=backend)
    assert values.shape == (0,) and values.dtype == x.dtype
    (values.sum() + x.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_negative_pair_is_kept(backend):
    x = torch.randn(2, 4, dtype=torch.float64)
    values = fusedloss.unpg_negatives(x, torch.tensor([0, 1]), whisker=0.0, backend=backend)
    torch.testing.assert_close(values, F.cosine_similarity(x[:1], x[1:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_embedding_reaches_the_result(backend):
    x, labels = _batch(10, 4, 3, seed=4)
    x = x.detach().clone()
    x[3, 1] = float("nan")
    values = fusedloss.unpg_negatives(x, labels, backend=backend)
    assert values.isnan().any()
    assert not values[~values.isnan()].diff().lt(0).any()


def test_gradcheck():
    x, labels = _batch(12, 5, 3, seed=5)
    assert torch.autograd.gradcheck(
        lambda t: fusedloss.unpg_negatives(t, labels, whisker=0.5, backend="cpu"), (x,))


def test_triton_backend_is_refused_with_a_reason():
    x, labels = _batch(4, 3, 2)
    with pytest.raises(ValueError, match="no Triton kernel for unpg_negatives"):
        fusedloss.unpg_negatives(x, labels, backend="triton")
