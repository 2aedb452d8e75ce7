"""The pair losses across the ranks of a process group (``group=``): equal to the
single-process function on the concatenated global batch.

Marker `dist`: gloo on 127.0.0.1, one spawn per world size (1, 2, 3, 4) that runs every
check, with uneven local batches (rank r holds 2 + r rows; at world size 4 rank 2 holds
none). Every loss and every gradient of a rank's local inputs is compared with the fp64
oracle (backend "reference", no group) on the global batch, under both gradient conventions;
the miner's pairs must be the same tensors; bad input must raise on every rank, well before
the group's timeout.
"""

import pytest
import torch
import torch.distributed as dist

import fusedloss
from fusedloss import distributed as fdist
from fusedloss import pairs as fpairs

import gloo
from conftest import assert_close
from test_sharded import _dist_backends, _expect_error, recorded_collectives
from test_sharded import nccl_group  # noqa: F401  (the fixture of the NCCL test below)

DIM = 5


def _sizes(world, first=2):
    """Uneven local batches: first + r rows on rank r, none on rank 2 at world size 4."""
    sizes = [first + r for r in range(world)]
    if world == 4:
        sizes[2] = 0
    return sizes


def _global(world, seed=0, classes=3, first=2):
    """(embeddings [N, D] fp64, labels [N]) of the global batch, the same on every rank."""
    g = torch.Generator().manual_seed(seed + 10 * world)
    n = sum(_sizes(world, first))
    x = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g)


def _mine(t, rank, world, first=2):
    """This rank's rows of a global tensor."""
    sizes = _sizes(world, first)
    start = sum(sizes[:rank])
    return t[start: start + sizes[rank]]


# Every pair loss of the table, with keywords that tell its variants apart.
LOSSES = [
    ("multi_similarity_loss", {}),
    ("multi_similarity_loss", dict(mining=False, beta=10.0)),
    ("supcon_loss", dict(temperature=0.3)),
    ("contrastive_loss", {}),
    ("contrastive_loss", dict(distance="cosine", pos_margin=0.9, neg_margin=0.1)),
    ("batch_hard_triplet_loss", dict(margin=0.3)),
    ("batch_hard_triplet_loss", dict(distance="cosine", margin=0.2)),
]
if "group" in (getattr(getattr(fpairs, "orthogonal_projection_loss", None), "__kwdefaults__",
                       None) or {}):
    LOSSES.append(("orthogonal_projection_loss", dict(gamma=0.5)))


def _compare(what, expected, loss, pairs_of_grads, dtype=torch.float64):
    """The loss and each (name, gradient, oracle's gradient), within `dtype`'s tolerance."""
    assert_close(loss.detach(), expected.detach(), dtype, f"loss {what}")
    for name, mine, oracle in pairs_of_grads:
        assert_close(mine, oracle, dtype, f"grad {name} {what}")


def check_losses(rank, world):
    """Each loss on this rank's rows (the batch its own reference set) against the oracle on
    the global batch: the loss, and the local rows' gradient = W (ddp_grad_scale=True) or 1
    times their rows of the global gradient."""
    x, labels = _global(world)
    oracle_x = x.clone().requires_grad_()
    for name, kw in LOSSES:
        function = getattr(fpairs, name)
        oracle_x.grad = None
        expected = function(oracle_x, labels, **kw, backend="reference")
        expected.backward()
        for backend in _dist_backends():
            for ddp_grad_scale in (True, False):
                mine = _mine(x, rank, world).clone().requires_grad_()
                loss = function(mine, _mine(labels, rank, world), **kw, backend=backend,
                                group=dist.group.WORLD, ddp_grad_scale=ddp_grad_scale)
                loss.backward()
                scale = world if ddp_grad_scale else 1
                _compare(f"{name} {kw} {backend} ddp_grad_scale={ddp_grad_scale} rank "
                         f"{rank}/{world}", expected, loss,
                         [("x", mine.grad, scale * _mine(oracle_x.grad, rank, world))])


def check_reference_sets(rank, world):
    """Each rank's own reference set (of 1 + r rows): the global reference set is their
    concatenation, and both inputs get their rows' gradient."""
    x, labels = _global(world)
    ref, ref_labels = _global(world, seed=1, first=1)
    oracle = [x.clone().requires_grad_(), ref.clone().requires_grad_()]
    for name, kw in LOSSES:
        function = getattr(fpairs, name)
        for t in oracle:
            t.grad = None
        expected = function(oracle[0], labels, oracle[1], ref_labels, **kw, backend="reference")
        expected.backward()
        backend = _dist_backends()[-1]
        mine = [_mine(x, rank, world).clone().requires_grad_(),
                _mine(ref, rank, world, first=1).clone().requires_grad_()]
        loss = function(mine[0], _mine(labels, rank, world), mine[1],
                        _mine(ref_labels, rank, world, first=1), **kw, backend=backend,
                        group=dist.group.WORLD, ddp_grad_scale=False)
        loss.backward()
        _compare(f"{name} {kw} {backend} with reference sets rank {rank}/{world}", expected, loss,
                 [("x", mine[0].grad, _mine(oracle[0].grad, rank, world)),
                  ("ref", mine[1].grad, _mine(oracle[1].grad, rank, world, first=1))])


def check_info_nce(rank, world):
    """InfoNCE, one way and symmetric: the positives on the diagonal of the global batch."""
    q, _ = _global(world)
    k, _ = _global(world, seed=2)
    oracle = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    for symmetric in (False, True):
        for t in oracle:
            t.grad = None
        expected = fusedloss.info_nce_loss(*oracle, temperature=0.2, symmetric=symmetric,
                                           backend="reference")
        expected.backward()
        for backend in _dist_backends():
            for ddp_grad_scale in (True, False):
                mine = [_mine(t, rank, world).clone().requires_grad_() for t in (q, k)]
                loss = fusedloss.info_nce_loss(*mine, temperature=0.2, symmetric=symmetric,
                                               backend=backend, group=dist.group.WORLD,
                                               ddp_grad_scale=ddp_grad_scale)
                loss.backward()
                scale = world if ddp_grad_scale else 1
                _compare(f"info_nce symmetric={symmetric} {backend} ddp_grad_scale="
                         f"{ddp_grad_scale} rank {rank}/{world}", expected, loss,
                         [(n, m.grad, scale * _mine(o.grad, rank, world))
                          for n, m, o in zip(("query", "key"), mine, oracle)])


def check_miner(rank, world):
    """The miner's pairs in global indices, the same tensors on every rank as the
    single-process miner's on the global batch (with and without reference sets)."""
    x, labels = _global(world, classes=2, first=4)
    ref, ref_labels = _global(world, seed=1, first=1)
    expected = fusedloss.multi_similarity_miner(x, labels, epsilon=0.3, backend="reference")
    with_ref = fusedloss.multi_similarity_miner(x, labels, ref, ref_labels, epsilon=0.3,
                                                backend="reference")
    assert expected[0].numel() > 0 and expected[2].numel() > 0
    for backend in _dist_backends():
        found = fusedloss.multi_similarity_miner(
            _mine(x, rank, world, 4), _mine(labels, rank, world, 4), epsilon=0.3,
            backend=backend, group=dist.group.WORLD)
        assert all(torch.equal(a, b) for a, b in zip(found, expected)), (backend, found, expected)
        found = fusedloss.multi_similarity_miner(
            _mine(x, rank, world, 4), _mine(labels, rank, world, 4),
            _mine(ref, rank, world, 1), _mine(ref_labels, rank, world, 1), epsilon=0.3,
            backend=backend, group=dist.group.WORLD)
        assert all(torch.equal(a, b) for a, b in zip(found, with_ref)), (backend, found, with_ref)


def check_backward_traffic(rank, world):
    """Backward moves the gathered rows' gradient once, as a reduce-scatter (gloo: one
    all_to_all of the W blocks padded to the largest batch): no all_reduce of N x D."""
    x, labels = _global(world)
    mine = _mine(x, rank, world).clone().requires_grad_()
    loss = fusedloss.supcon_loss(mine, _mine(labels, rank, world), group=dist.group.WORLD)
    with recorded_collectives() as calls:
        loss.backward()
    longest = max(_sizes(world))
    assert calls == [("all_to_all_single", fdist.EMBEDDING_GRAD, (world * longest, DIM))], calls


def check_memory(rank, world):
    """CrossBatchMemory(group=): every rank's bank holds the global batches, and each step's
    loss and gradient are those of the single-process module fed the global batches, over
    steps before and after the ring wraps (a memory of 2 N + 1 for a global batch of N: the
    third step wraps it)."""
    size = 2 * sum(_sizes(world)) + 1
    for loss_name, kw in (("multi_similarity", {}), ("supcon", dict(temperature=0.3)),
                          ("batch_hard_triplet", dict(margin=0.3))):
        single = fusedloss.nn.CrossBatchMemory(DIM, size, loss_name, dtype=torch.float64,
                                               backend="reference", **kw)
        ranked = fusedloss.nn.CrossBatchMemory(DIM, size, loss_name, dtype=torch.float64,
                                               group=dist.group.WORLD, **kw)
        for step in range(4):
            x, labels = _global(world, seed=100 + step)
            oracle = x.clone().requires_grad_()
            expected = single(oracle, labels)
            expected.backward()
            mine = _mine(x, rank, world).clone().requires_grad_()
            loss = ranked(mine, _mine(labels, rank, world))
            loss.backward()
            what = f"CrossBatchMemory {loss_name} step {step} rank {rank}/{world}"
            _compare(what, expected, loss,
                     [("x", mine.grad, world * _mine(oracle.grad, rank, world))])
            assert torch.equal(ranked.embedding_memory, single.embedding_memory), what
            assert torch.equal(ranked.label_memory, single.label_memory), what
            assert (ranked.queue_idx, ranked.has_been_filled) == \
                (single.queue_idx, single.has_been_filled), what
        assert single.has_been_filled


def check_errors(rank, world):
    """Bad input on some ranks raises on every rank, never hangs; then the group still
    works."""
    x, labels = _global(world)
    mine, y = _mine(x, rank, world), _mine(labels, rank, world)
    group, first, last = dist.group.WORLD, rank == 0, rank == world - 1

    def supcon(e=mine, t=y, *ref, **kw):
        return fusedloss.supcon_loss(e, t, *ref, group=group, **kw)

    if world > 1:
        _expect_error(lambda: supcon(torch.randn(y.shape[0], DIM + first, dtype=x.dtype)),
                      "embedding_dim (rank 0: 6; ")
        _expect_error(lambda: supcon(mine.float() if first else mine),
                      "dtype (rank 0: torch.float32; ")
        ref, ref_labels = _global(world, seed=1)
        _expect_error(lambda: supcon(mine, y, *((ref, ref_labels) if first else ())),
                      "reference_set (rank 0: given; ")
        _expect_error(lambda: supcon(temperature=0.1 if first else 0.2),
                      "options (differs: rank 0 vs")
        _expect_error(lambda: supcon(mine.clone().requires_grad_(first)),
                      "requires_grad (rank 0: 1; ")
        _expect_error(lambda: fusedloss.info_nce_loss(mine, mine, group=group,
                                                      symmetric=first),
                      "options (differs: rank 0 vs")
    # A check that fails on one rank alone: that rank raises its own error, the others name it.
    no_labels = None if last else y  # labels on some ranks only
    temperature = -1.0 if last else 0.1
    if last:
        _expect_error(lambda: supcon(t=no_labels), "labels must be a tensor", error=TypeError)
        _expect_error(lambda: supcon(temperature=temperature), "temperature")
    else:
        failed = f"the inputs of rank(s) [{world - 1}] are invalid"
        _expect_error(lambda: supcon(t=no_labels), failed)
        _expect_error(lambda: supcon(temperature=temperature), failed)
    _expect_error(lambda: supcon(ddp_grad_scale=1), "ddp_grad_scale must be a bool",
                  error=TypeError)
    memory = fusedloss.nn.CrossBatchMemory(DIM, 4, group=group, dtype=x.dtype)
    big = torch.zeros(5 if last else 1, DIM, dtype=x.dtype)
    if last:
        _expect_error(lambda: memory(big, torch.zeros(5, dtype=torch.long)),
                      "a batch of 5 does not fit in a memory of 4")
    else:
        _expect_error(lambda: memory(big, torch.zeros(1, dtype=torch.long)),
                      f"the inputs of rank(s) [{world - 1}] are invalid")
    if world > 2:
        rows = torch.zeros(2, DIM, dtype=x.dtype)
        _expect_error(lambda: memory(rows, torch.zeros(2, dtype=torch.long)),
                      f"the global batch of {2 * world} does not fit in a memory of 4")
    # Every rank raised at the same point, so the group is still in step.
    assert_close(supcon().detach(), fusedloss.supcon_loss(x, labels, backend="reference"),
                 torch.float64, "loss after the errors")


_CHECKS = ["check_losses", "check_reference_sets", "check_info_nce", "check_miner",
           "check_backward_traffic", "check_memory", "check_errors"]


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_process_group(world):
    gloo.spawn(world, __name__, _CHECKS)


def test_without_process_group():
    """Without torch.distributed initialised, group=None runs as before and a group raises."""
    x, labels = _global(2)
    assert_close(fusedloss.supcon_loss(x, labels, group=None),
                 fusedloss.supcon_loss(x, labels, backend="reference"), torch.float64, "loss")
    with pytest.raises(RuntimeError, match="not initialised"):
        fusedloss.supcon_loss(x, labels, group=object())


# --- over NCCL, one GPU -------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.parametrize("name, kw", LOSSES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LOSSES)])
def test_pair_losses_over_a_one_rank_nccl_group(nccl_group, name, kw):
    """Each loss on fp32 CUDA tensors over a 1-rank NCCL group (the backend "auto" picks on
    the GPU) against the fp64 oracle without a group: the loss and the gradient (W = 1, so
    ddp_grad_scale changes nothing)."""
    x, labels = _global(3)
    mine = x.float().to(nccl_group).requires_grad_()
    function = getattr(fpairs, name)
    loss = function(mine, labels.to(nccl_group), **kw, group=dist.group.WORLD)
    loss.backward()
    oracle = x.clone().requires_grad_()
    expected = function(oracle, labels, **kw, backend="reference")
    expected.backward()
    _compare(f"{name} {kw} over a 1-rank NCCL group", expected, loss.double().cpu(),
             [("x", mine.grad.double().cpu(), oracle.grad)], torch.float32)
