"""Sharded multi-label margin loss (fusedloss.sharded_multilabel_margin_cross_entropy and its
linear form): equal to the single-process loss on the gathered classes. Without process
groups: world size 1. With process groups (marker `dist`): gloo on 127.0.0.1 at world sizes
1 to 4, uneven shards (and an empty one at 4), every backend with kernels, the loss and each
shard's gradient against the fp64 oracle; bad input on one rank raises on every rank."""
import time

import pytest
import torch

import fusedloss
from fusedloss import distributed as fdist

import gloo
from conftest import assert_close
from gloo import GROUP_TIMEOUT_S

VARIANTS = [dict(), dict(m2=0.5), dict(m1=1.35, m3=0.1, margin_grad="detached"),
            dict(m3=0.2, reduction="none")]


def _backends():
    return ["reference", "cpu"]


def problem(n, c, k=4, seed=0, d=None):
    """(cos [n, c] in fp64, targets [n, k] with padding, a repeat and an empty row), or with
    d the embeddings [n, d] and weight [c, d] instead of cos."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, c, (n, k), generator=g)
    targets[1] = -100
    targets[2, 1] = -100
    targets[3, 2] = targets[3, 0]
    if d is None:
        return torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1, targets
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(c, d, generator=g, dtype=torch.float64), targets)


def _upstream(loss, seed=9):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(loss.shape, generator=g, dtype=loss.dtype) if loss.dim() else \
        torch.ones_like(loss)


def compare_logits(start, count, c, backend, dtype=torch.float64, **kw):
    cos, targets = problem(7, c)
    full = cos.clone().requires_grad_()
    want = fusedloss.multilabel_margin_cross_entropy(full, targets, backend="reference", **kw)
    (want_grad,) = torch.autograd.grad(want, full, _upstream(want))
    local = cos[:, start:start + count].to(dtype).clone().requires_grad_()
    got = fusedloss.sharded_multilabel_margin_cross_entropy(
        local, targets, class_start=start, num_classes=c, backend=backend, **kw)
    (grad,) = torch.autograd.grad(got, local, _upstream(got))
    assert_close(got.detach(), want.detach(), dtype, f"{backend} loss")
    assert_close(grad, want_grad[:, start:start + count], dtype, f"{backend} grad")


def compare_linear(start, count, c, backend, **kw):
    x, w, targets = problem(9, c, d=6)
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    want = fusedloss.linear_multilabel_margin_cross_entropy(*leaves, targets,
                                                            backend="reference", **kw)
    want_grads = torch.autograd.grad(want, leaves, _upstream(want))
    shard = [x.clone().requires_grad_(), w[start:start + count].clone().requires_grad_()]
    got = fusedloss.linear_sharded_multilabel_margin_cross_entropy(
        *shard, targets, class_start=start, num_classes=c, backend=backend, block_size=4, **kw)
    grads = torch.autograd.grad(got, shard, _upstream(got))
    assert_close(got.detach(), want.detach(), torch.float64, f"{backend} loss")
    assert_close(grads[0], want_grads[0], torch.float64, f"{backend} grad embeddings")
    assert_close(grads[1], want_grads[1][start:start + count], torch.float64,
                 f"{backend} grad weight")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kw", VARIANTS, ids=str)
def test_world_size_one_equals_the_single_process_loss(backend, kw):
    compare_logits(0, 13, 13, backend, **kw)
    compare_linear(0, 13, 13, backend, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_world_size_one_low_precision(dtype):
    compare_logits(0, 40, 40, "cpu", dtype=dtype, m2=0.5)


def test_bad_input_without_process_group():
    cos, targets = problem(7, 13)
    fn = fusedloss.sharded_multilabel_margin_cross_entropy
    with pytest.raises(ValueError, match="targets must have 1 to 64 columns"):
        fn(cos, torch.zeros(7, 65, dtype=torch.long), class_start=0, num_classes=13)
    with pytest.raises(ValueError, match=r"target\[0\] = 13 is outside \[0, 13\)"):
        fn(cos, torch.full((7, 2), 13), class_start=0, num_classes=13)
    with pytest.raises(ValueError, match="classes \\[10, 13\\) belong to no rank"):
        fn(cos[:, :10], targets.clamp(max=9), class_start=0, num_classes=13)


# --- with process groups ----------------------------------------------------------------------

def _shard(rank, world):
    """(class_start, count, C): uneven shards from world size 2 on, an empty one at 4."""
    if world == 4:
        cuts = [0, 3, 3, 7, 10]
        return cuts[rank], cuts[rank + 1] - cuts[rank], 10
    c = {1: 7, 2: 9, 3: 10}[world]
    start, count = fdist.shard_range(c, world, rank)
    return start, count, c


def check_logits(rank, world):
    start, count, c = _shard(rank, world)
    for backend in _backends():
        for kw in VARIANTS:
            compare_logits(start, count, c, backend, **kw)


def check_linear(rank, world):
    start, count, c = _shard(rank, world)
    for backend in _backends():
        for kw in VARIANTS[:2] + VARIANTS[3:]:
            compare_linear(start, count, c, backend, **kw)


def _expect_error(call, *texts, error=ValueError):
    began = time.monotonic()
    with pytest.raises(error) as info:
        call()
    assert time.monotonic() - began < GROUP_TIMEOUT_S / 10
    for text in texts:
        assert text in str(info.value), (text, str(info.value))


def check_errors(rank, world):
    """A bad target on the last rank, targets that differ, K = 65 on rank 0: the same error
    on every rank (rank 0 its own for K = 65), no hang."""
    start, count, c = _shard(rank, world)
    cos, targets = problem(7, c)
    local = cos[:, start:start + count]
    fn = fusedloss.sharded_multilabel_margin_cross_entropy
    last = world - 1
    bad = targets.clone()
    if rank == last:
        bad[4, 0] = c
    _expect_error(lambda: fn(local, bad, class_start=start, num_classes=c),
                  f"on rank {last}, target[4] = {c} is outside [0, {c})")
    if world > 1:
        other = targets.clone()
        if rank == 0:
            other[0, 0] = (other[0, 0] + 1) % c
        _expect_error(lambda: fn(local, other, class_start=start, num_classes=c),
                      "targets (differs")
        wide = torch.zeros(7, 65, dtype=torch.long) if rank == 0 else targets
        _expect_error(lambda: fn(local, wide, class_start=start, num_classes=c),
                      "1 to 64 columns" if rank == 0 else "rank(s) [0] are invalid")


def check_partial_fc(rank, world):
    """PartialFC(multilabel=True) at sample_rate 1, uneven local batches, equals
    MarginSoftmaxHead(multilabel=True) on the gathered batch: the loss, each rank's embedding
    gradient (ddp_grad_scale=False: the exact one) and its weight shard's gradient. With
    sample_rate 0.5 every positive class of the gathered batch is sampled on its shard."""
    c, d = 11, 6
    sizes = [4 + r % 2 for r in range(world)]
    x, w, targets = problem(sum(sizes), c, d=d, seed=4)
    first = sum(sizes[:rank])
    rows = slice(first, first + sizes[rank])
    for backend in _backends():
        head = fusedloss.nn.MarginSoftmaxHead(d, c, multilabel=True, m2=0.3, backend=backend,
                                              dtype=torch.float64)
        part = fusedloss.nn.PartialFC(d, c, multilabel=True, m2=0.3, backend=backend,
                                      ddp_grad_scale=False, dtype=torch.float64)
        start, count = fdist.shard_range(c, world, rank)
        with torch.no_grad():
            head.weight.copy_(w)
            part.weight.copy_(w[start:start + count])
        full = x.clone().requires_grad_()
        want = head(full, targets)
        want.backward()
        local = x[rows].clone().requires_grad_()
        got = part(local, targets[rows])
        got.backward()
        assert_close(got.detach(), want.detach(), torch.float64, f"{backend} loss")
        assert_close(local.grad, full.grad[rows], torch.float64, f"{backend} grad embeddings")
        assert_close(part.weight.grad, head.weight.grad[start:start + count], torch.float64,
                     f"{backend} grad weight")
    sampled = fusedloss.nn.PartialFC(d, c, 0.5, multilabel=True, dtype=torch.float64)
    sampled(x[rows].clone(), targets[rows])
    ids = set(sampled.sampled_classes.tolist())
    start, count = fdist.shard_range(c, world, rank)
    positives = {int(v) for v in targets.reshape(-1) if start <= v < start + count}
    assert positives <= ids


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_process_group(world):
    gloo.spawn(world, __name__,
               ["check_logits", "check_linear", "check_errors", "check_partial_fc"])
