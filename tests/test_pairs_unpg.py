"""unpg_negatives against a plain dense implementation of the authors' procedure (UNPG, Jung et
al. 2022: the negative pairs of the upper triangle, sorted, Tukey's fences at the sorted
values of index floor(L / 4) and floor(3 L / 4)), in fp64, with gradients; the blocked
implementation over several blocks; the edge cases (no negative pair, N < 2, NaN). The shared
tests compare it with the oracle fusedloss.reference.pairs.unpg_negatives.

The heads with unpg=True (nn.MarginSoftmaxHead, and nn.PartialFC over gloo at world sizes 1 to
4) against the authors' concatenation in fp64: the margin logits with the kept pair cosines
appended as columns to every row, scaled, then F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import pairs

import gloo

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


# ---- the heads: the authors' concatenation -----------------------------------------------------

def authors_unpg_head(x, weight, labels, scale, m2=0.0, m3=0.0, whisker=1.5):
    """The authors' UNPG head, dense: the ArcFace / CosFace logits of the normalised rows and
    class centres, the filtered negative-pair cosines (authors_negatives) appended as columns
    to every row, times the scale, cross-entropy."""
    cosine = F.normalize(x) @ F.normalize(weight).t()
    target_cos = cosine.gather(1, labels[:, None])
    margin = torch.cos(torch.acos(target_cos.clamp(-1, 1)) + m2) - m3 if m2 else target_cos - m3
    logits = cosine.scatter(1, labels[:, None], margin)
    negatives = authors_negatives(x, labels, whisker)
    joined = torch.cat([logits, negatives.expand(x.shape[0], -1)], dim=1)
    return F.cross_entropy(scale * joined, labels)


def _head_problem(n=24, d=16, c=40, classes=8, seed=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(c, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    return x, weight, labels


# Margins exactly representable in fp32 (0.375, 0.5): the margin ops take their scalars through
# fp32, so 0.4 would differ from the fp64 concatenation by scale * 6e-9, not from UNPG.
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("loss,margins", [("cosface", dict(m3=0.375)), ("arcface", dict(m2=0.5))])
@pytest.mark.parametrize("whisker", [1.5, 0.25])
def test_margin_softmax_head_matches_the_authors_concatenation(backend, loss, margins, whisker):
    x, weight, labels = _head_problem()
    head = fusedloss.nn.MarginSoftmaxHead(16, 40, loss=loss, unpg=True, unpg_whisker=whisker,
                                          dtype=torch.float64, backend=backend,
                                          margin_grad="exact", **margins)
    head.weight.data.copy_(weight)
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    w_theirs = weight.clone().requires_grad_()
    loss_value = head(mine, labels)
    want = authors_unpg_head(theirs, w_theirs, labels, 64.0, whisker=whisker, **margins)
    loss_value.backward()
    want.backward()
    torch.testing.assert_close(loss_value, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, w_theirs.grad, rtol=1e-10, atol=1e-12)


def test_head_leaves_ignored_rows_out_of_the_pairs():
    x, weight, labels = _head_problem(seed=7)
    labels[[2, 5]] = -100
    head = fusedloss.nn.MarginSoftmaxHead(16, 40, loss="cosface", m3=0.375, unpg=True,
                                          dtype=torch.float64)
    head.weight.data.copy_(weight)
    kept = labels != -100
    negatives = fusedloss.unpg_negatives(x[kept], labels[kept])
    want = fusedloss.linear_margin_cross_entropy(x, weight, labels, scale=64.0, m3=0.375,
                                                 extra_negatives=negatives)
    torch.testing.assert_close(head(x, labels), want, rtol=1e-13, atol=1e-13)


def test_head_unpg_options_are_checked():
    with pytest.raises(TypeError, match="unpg must be a bool, got int"):
        fusedloss.nn.MarginSoftmaxHead(4, 5, unpg=1)
    with pytest.raises(ValueError, match="unpg_whisker must be >= 0.0, got -1.0"):
        fusedloss.nn.MarginSoftmaxHead(4, 5, unpg=True, unpg_whisker=-1.0)
    with pytest.raises(ValueError, match="unpg_whisker must be >= 0.0, got -1.0"):
        fusedloss.nn.PartialFC(4, 5, unpg=True, unpg_whisker=-1.0)


def test_head_with_a_single_class_batch_is_plain_cross_entropy():
    """No negative pair: the extra columns are empty and the loss is the head's own."""
    x, weight, _ = _head_problem(seed=8)
    labels = torch.full((24,), 3)
    head = fusedloss.nn.MarginSoftmaxHead(16, 40, loss="cosface", m3=0.375, unpg=True,
                                          dtype=torch.float64)
    head.weight.data.copy_(weight)
    want = fusedloss.linear_margin_cross_entropy(x, weight, labels, scale=64.0, m3=0.375)
    torch.testing.assert_close(head(x, labels), want, rtol=1e-13, atol=1e-13)


# ---- nn.PartialFC(unpg=True) over gloo ----------------------------------------------------------

def check_partial_fc_unpg(rank, world):
    """Uneven local batches (rank r holds 5 + r rows; one ignored row), the classes split over
    the ranks; each rank's loss, its rows' gradient and its weight shard's gradient against the
    authors' concatenation on the whole batch, in fp64 (ddp_grad_scale=False: the exact
    derivative)."""
    sizes = [5 + r for r in range(world)]
    n, classes = sum(sizes), 11
    x, weight, labels = _head_problem(n=n, d=8, c=classes, classes=5, seed=9)
    labels[1] = -100
    head = fusedloss.nn.PartialFC(8, classes, loss="cosface", m3=0.375, unpg=True,
                                  unpg_whisker=0.5, ddp_grad_scale=False, dtype=torch.float64)
    start, count = head.class_start, head.weight.shape[0]
    head.weight.data.copy_(weight[start:start + count])
    first = sum(sizes[:rank])
    mine = x[first:first + sizes[rank]].clone().requires_grad_()
    loss = head(mine, labels[first:first + sizes[rank]])
    loss.backward()
    theirs, w_theirs = x.clone().requires_grad_(), weight.clone().requires_grad_()
    kept = labels != -100
    cosine = F.normalize(theirs) @ F.normalize(w_theirs).t()
    target = labels.clamp(min=0)[:, None]
    logits = cosine.scatter(1, target, cosine.gather(1, target) - 0.375)
    negatives = authors_negatives(theirs[kept], labels[kept], 0.5)
    joined = torch.cat([logits, negatives.expand(n, -1)], dim=1)
    want = F.cross_entropy(64.0 * joined, labels, ignore_index=-100)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.grad, theirs.grad[first:first + sizes[rank]], rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(head.weight.grad, w_theirs.grad[start:start + count], rtol=1e-10,
                               atol=1e-12)


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partial_fc_unpg_over_gloo(world):
    gloo.spawn(world, __name__, ["check_partial_fc_unpg"])
