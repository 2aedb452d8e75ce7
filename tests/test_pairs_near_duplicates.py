"""Euclidean pair losses on near-duplicate and duplicate embeddings, every kernel backend
against the fp64 oracle: the ops (pair_extrema, pair_row_stats and its backward, distance 1)
and the functions that use them (contrastive_loss, batch_hard_triplet_loss).

Two augmentations of one image, or an item met again in a memory bank, give pairs at a
distance d far below |x| + |r|. The Gram form |x|^2 + |r|^2 - 2 x.r of d^2 then loses all
its digits to cancellation (pairs.h derives the bound and the kernels' fix), so these inputs
are built around such pairs: each base row meets a partner at distance `scale` and, under
another label, one at 2 * scale, so that the nearest negative is decided by that small
difference. scale 0 makes exact duplicates, whose distance must come out as exactly 0 (and
with it the zero gradient of torch.cdist and the count of non-zero contrastive terms)."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.reference import pairs as ref_ops

from conftest import HAS_TRITON, assert_close

SCALES = [0.0, 1e-2, 1e-3, 1e-4]
DTYPE = torch.float32
BASE_ROWS, DIM = 6, 24  # with the partners, 18 rows: several Triton tiles of 16, D over 2 chunks

# (kind, hyper) of pair_row_stats on distances: the contrastive loss the library runs, and the
# other kinds, which the oracle applies to d in place of S.
KINDS = {
    "ms": (0, [2.0, 10.0, 0.5, 0.1]),
    "supcon": (1, [0.5]),
    "contrastive": (2, [0.0, 1.0]),
}


def backends():
    params = [pytest.param("cpu", id="cpu")]
    if HAS_TRITON:
        params.append(pytest.param("triton", id="triton", marks=pytest.mark.triton))
    return params


def kernel_ops(backend):
    """The three pair ops of `backend`, all with the signatures of python/fusedloss/_schemas.py."""
    if backend == "cpu":
        return torch.ops.fusedloss
    from fusedloss.triton_kernels import pairs
    return pairs


def unit_partner(base, scale, generator):
    """Unit rows at distance ~scale from the unit rows `base`, along a random direction
    orthogonal to each; scale 0 gives exact copies."""
    if scale == 0.0:
        return base.clone()
    step = torch.randn(base.shape, dtype=torch.float64, generator=generator)
    step -= (step * base).sum(1, keepdim=True) * base
    return F.normalize(base + scale * F.normalize(step, dim=1), dim=1)


def near_duplicate_batch(scale, seed=0):
    """(x, labels): base rows, partners at `scale` with the same label (positives) and
    partners at 2 * scale with another label (negatives), in fp32."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(BASE_ROWS, DIM, dtype=torch.float64, generator=g), dim=1)
    x = torch.cat([base, unit_partner(base, scale, g), unit_partner(base, 2 * scale, g)])
    labels = torch.arange(BASE_ROWS).repeat(3)
    labels[2 * BASE_ROWS:] += BASE_ROWS
    return x.to(DTYPE), labels


def pair_setup(scale, bank):
    """(x, labels, ref, ref_labels, self_offset): the batch as its own reference, or the base
    rows as queries against a bank that holds the partners and other rows."""
    x, labels = near_duplicate_batch(scale)
    if not bank:
        return x, labels, x, labels, 0
    extra, extra_labels = near_duplicate_batch(0.3, seed=1)
    return (x[:BASE_ROWS], labels[:BASE_ROWS], torch.cat([x[BASE_ROWS:], extra]),
            torch.cat([labels[BASE_ROWS:], extra_labels]), -1)


def test_inputs_hold_pairs_at_the_intended_distance():
    # The rounded fp32 inputs keep their near pairs at about `scale` (the oracle's distance).
    for scale in SCALES:
        x, _ = near_duplicate_batch(scale)
        d = ref_ops.scores(x.double(), x.double(), ref_ops.EUCLIDEAN)
        near = d.diagonal(BASE_ROWS)[:BASE_ROWS]
        if scale == 0.0:
            assert torch.equal(near, torch.zeros_like(near))
        else:
            torch.testing.assert_close(near, torch.full_like(near, scale), rtol=0.01, atol=0)


def oracle_gradients(x, labels, r, ref_labels, kind, hyper, self_offset, grad_stats, own):
    """(stats, grad_x, grad_ref) of the fp64 oracle; grad_ref None when r is x (the whole
    gradient of the one tensor is then grad_x)."""
    x64 = x.double().requires_grad_()
    r64 = x64 if own else r.double().requires_grad_()
    stats = ref_ops.pair_row_stats(x64, labels, r64, ref_labels, None, kind, ref_ops.EUCLIDEAN,
                                   hyper, self_offset)
    wrt = (x64,) if own else (x64, r64)
    grads = torch.autograd.grad(stats, wrt, grad_stats.double())
    return stats.detach(), grads[0], None if own else grads[1]


@pytest.mark.parametrize("bank", [False, True], ids=["self", "bank"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", backends())
def test_extrema(backend, scale, bank):
    x, labels, r, ref_labels, offset = pair_setup(scale, bank)
    values, index = kernel_ops(backend).pair_extrema(x, labels, r, ref_labels, 1, offset, 16)
    want_values, want_index = ref_ops.pair_extrema(x.double(), labels, r.double(), ref_labels,
                                                   1, offset)
    assert_close(values, want_values, DTYPE, f"scale {scale}: extrema values")
    assert torch.equal(index, want_index), f"scale {scale}: {index} != {want_index}"
    if scale == 0.0:  # a base row's nearest negative is its exact copy
        assert torch.equal(values[:BASE_ROWS, 1], torch.zeros(BASE_ROWS))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bank", [False, True], ids=["self", "bank"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", backends())
def test_row_stats_and_gradients(backend, scale, bank, kind):
    x, labels, r, ref_labels, offset = pair_setup(scale, bank)
    k, hyper = KINDS[kind]
    ops = kernel_ops(backend)
    stats = ops.pair_row_stats(x, labels, r, ref_labels, None, k, 1, hyper, offset, 16)
    grad_stats = torch.randn(stats.shape, generator=torch.Generator().manual_seed(3))
    want, want_x, want_r = oracle_gradients(x, labels, r, ref_labels, k, hyper, offset,
                                            grad_stats, not bank)
    assert_close(stats, want, DTYPE, f"scale {scale}: stats")
    grad_x, grad_r = ops.pair_row_stats_backward(grad_stats, stats, x, labels, r, ref_labels,
                                                 None, k, 1, hyper, offset, 16, True, True)
    if bank:
        assert_close(grad_x, want_x, DTYPE, f"scale {scale}: grad x")
        assert_close(grad_r, want_r, DTYPE, f"scale {scale}: grad ref")
    else:
        assert_close(grad_x + grad_r, want_x, DTYPE, f"scale {scale}: grad")


@pytest.mark.parametrize("backend", backends())
def test_exact_duplicates_count_no_contrastive_term(backend):
    # Every positive pair is an exact copy: relu(d - 0) = 0 for each, none counted, and the
    # zero gradient of d at d = 0 for the positives' statistic.
    x, labels = near_duplicate_batch(0.0)
    x, labels = x[:2 * BASE_ROWS], labels[:2 * BASE_ROWS]
    ops = kernel_ops(backend)
    stats = ops.pair_row_stats(x, labels, x, labels, None, 2, 1, [0.0, 1.0], 0, 16)
    assert torch.equal(stats[:, :2], torch.zeros(2 * BASE_ROWS, 2))
    grad_stats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(stats.shape).contiguous()
    grads = ops.pair_row_stats_backward(grad_stats, stats, x, labels, x, labels, None, 2, 1,
                                        [0.0, 1.0], 0, 16, True, True)
    assert all(torch.equal(g, torch.zeros_like(x)) for g in grads)


def loss_and_grads(fn, x, labels, bank, backend, dtype):
    """The loss of fn on x (in dtype) and its gradients with respect to x and the bank. The
    rows are unit already and stay as they are: F.normalize in fp32 moves each row by ~1e-7,
    which is itself a relative error of 1e-3 in a distance of 1e-4."""
    x = x.detach().to(dtype).requires_grad_()
    args = (x, labels)
    if bank is not None:
        args += (bank[0].detach().to(dtype).requires_grad_(), bank[1])
    loss = fn(*args, normalize=False, backend=backend)
    wrt = [args[0]] + ([args[2]] if bank is not None else [])
    return loss.detach(), torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("fn", [fusedloss.contrastive_loss, fusedloss.batch_hard_triplet_loss],
                         ids=["contrastive", "triplet"])
@pytest.mark.parametrize("bank", [False, True], ids=["self", "bank"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", backends())
def test_losses(backend, scale, bank, fn):
    x, labels, r, ref_labels, _ = pair_setup(scale, bank)
    memory = (r, ref_labels) if bank else None
    loss, grads = loss_and_grads(fn, x, labels, memory, backend, DTYPE)
    want, want_grads = loss_and_grads(fn, x, labels, memory, "reference", torch.float64)
    assert_close(loss, want, DTYPE, f"scale {scale}: loss")
    for got, expected, name in zip(grads, want_grads, ("x", "ref")):
        assert_close(got, expected, DTYPE, f"scale {scale}: grad {name}")


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("bank", [False, True], ids=["self", "bank"])
def test_triton_gradients_deterministic_with_near_pairs(bank):
    # The backward's second pass over the flagged tiles adds the near pairs' terms in a fixed
    # order: two runs agree bit for bit, and the flags of one run do not leak into the next.
    x, labels, r, ref_labels, offset = pair_setup(1e-3, bank)
    ops = kernel_ops("triton")
    stats = ops.pair_row_stats(x, labels, r, ref_labels, None, 2, 1, [0.0, 1.0], offset, 16)
    grad_stats = torch.randn(stats.shape, generator=torch.Generator().manual_seed(5))
    runs = [ops.pair_row_stats_backward(grad_stats, stats, x, labels, r, ref_labels, None, 2, 1,
                                        [0.0, 1.0], offset, 16, True, True) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
