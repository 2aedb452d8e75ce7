"""fusedloss.insightface against arcface_torch's PartialFC_V2 + CombinedMarginLoss.

arcface_torch is not a pip package, so `insightface_loss` below is a plain re-implementation
of what its documented forward computes (cosines of the normalised embeddings and class
centres clamped to [-1, 1]; inter-class filtering; the ArcFace margin applied under no_grad
or the CosFace margin; cross-entropy over the global batch), on one process with every class.
The drop-in must give that loss, the gradient of each rank's weight shard, and insightface's
embedding gradient (the exact one times the world size), at world sizes 1 and 2 over gloo;
its checkpoints must hold `weight` only and load back."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.insightface import CombinedMarginLoss, PartialFC_V2

import gloo
from conftest import assert_close

F64 = torch.float64
ARCFACE, COSFACE = (1.0, 0.5, 0.0), (1.0, 0.0, 0.4)


def insightface_loss(embeddings, weight, labels, s, m1, m2, m3, threshold=0.0, exact=False):
    """arcface_torch's loss on every class at once. With exact=True the ArcFace margin is
    differentiated (our margin_grad="exact"); arcface_torch applies it under no_grad."""
    cos = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    target = F.one_hot(labels, weight.shape[0]).bool()
    if threshold > 0:
        with torch.no_grad():
            keep = ~((cos > threshold) & ~target)
        cos = cos * keep
    if m1 == 1.0 and m3 == 0.0:
        if exact:
            cos = torch.where(target, torch.cos(torch.arccos(cos) + m2), cos)
        else:
            with torch.no_grad():
                shift = torch.where(target, torch.cos(torch.arccos(cos) + m2) - cos, 0.0)
            cos = cos + shift
    elif m3 > 0:
        cos = torch.where(target, cos - m3, cos)
    else:
        raise RuntimeError("arcface_torch raises here")
    return F.cross_entropy(s * cos, labels)


def _problem(n, c, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(c, d, generator=g, dtype=F64)
    y = torch.randint(0, c, (n,), generator=g)
    return x, w, y


def _head(margins, c, d=16, threshold=0.0, **kw):
    return PartialFC_V2(CombinedMarginLoss(64, *margins, threshold), d, c, dtype=F64, **kw)


def _below_pi(x, w, y, m2):
    cos_y = (F.normalize(x) * F.normalize(w)[y]).sum(1)
    return bool((cos_y > math.cos(math.pi - m2)).all())


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("margins", [ARCFACE, COSFACE, (1.0, 0.0, 0.0)],
                         ids=["arcface", "cosface", "softmax"])
def test_world_size_one_matches_insightface(margins, margin_grad):
    x, w, y = _problem(12, 10)
    assert _below_pi(x, w, y, margins[1])
    head = _head(margins, 10, margin_grad=margin_grad)
    assert head.margin_softmax.m2 == margins[1]
    head.weight.data.copy_(w)
    mine, theirs, w_ref = (x.clone().requires_grad_(), x.clone().requires_grad_(),
                           w.clone().requires_grad_())
    loss = head(mine, y.view(-1, 1))  # arcface_torch's labels may be [n, 1]
    expected = insightface_loss(theirs, w_ref, y, 64.0, *margins, exact=margin_grad == "exact")
    loss.backward()
    expected.backward()
    assert_close(loss, expected.detach(), F64, "loss")
    assert_close(mine.grad, theirs.grad, F64, "grad embeddings")
    assert_close(head.weight.grad, w_ref.grad, F64, "grad weight")


def test_margin_grad_detached_differs_from_exact():
    x, w, y = _problem(12, 10)
    grads = []
    for margin_grad in ("detached", "exact"):
        head = _head(ARCFACE, 10, margin_grad=margin_grad)
        head.weight.data.copy_(w)
        head(x, y).backward()
        grads.append(head.weight.grad)
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3)


def test_combined_config_trains_cosface_as_arcface_torch_does():
    """margin_list (1.0, 0.3, 0.2): arcface_torch takes its m3 > 0 branch and ignores m2."""
    x, w, y = _problem(12, 10)
    with pytest.warns(UserWarning, match="ignores m1 = 1.0 and m2 = 0.3"):
        head = _head((1.0, 0.3, 0.2), 10)
    head.weight.data.copy_(w)
    assert_close(head(x, y), insightface_loss(x, w, y, 64.0, 1.0, 0.0, 0.2), F64, "loss")
    assert head.margin_softmax.options()["m2"] == 0.0


def test_unsupported_margins_raise_at_construction():
    with pytest.raises(ValueError, match="ArcFace .* and CosFace"):
        CombinedMarginLoss(64, 1.35, 0.0, 0.0)
    with pytest.raises(TypeError, match="CombinedMarginLoss"):
        PartialFC_V2(torch.nn.Identity(), 16, 10)
    with pytest.raises(TypeError, match="configuration for PartialFC_V2"):
        CombinedMarginLoss(64, 1.0, 0.5, 0.0)(torch.zeros(2, 3), torch.zeros(2).long())


def test_continuation_past_pi():
    """Where theta_y + m2 > pi, arcface_torch's cos(theta + m2) turns back up; ours goes on
    as -2 - cos(theta + m2), the loss of fusedloss.margin_cross_entropy."""
    x, w, y = _problem(4, 6)
    w[y[0]] = -x[0] + 0.05 * w[y[0]]  # row 0: cos_y near -1, theta_y + 0.5 past pi
    assert not _below_pi(x[:1], w, y[:1], 0.5)
    head = _head(ARCFACE, 6)
    head.weight.data.copy_(w)
    cos = F.linear(F.normalize(x), F.normalize(w))
    ours = fusedloss.margin_cross_entropy(cos, y, scale=64.0, m2=0.5, backend="reference")
    assert_close(head(x, y), ours, F64, "loss")
    theta = torch.arccos(cos[0, y[0]])
    assert theta + 0.5 > math.pi
    psi = -2 - torch.cos(theta + 0.5)
    assert psi < torch.cos(theta + 0.5)  # insightface's target logit is the larger (wrong way)
    assert not torch.allclose(head(x, y), insightface_loss(x, w, y, 64.0, *ARCFACE))


def test_sampled_classes_match_insightface_on_them():
    """sample_rate < 1: the loss over the sampled classes (positives and negatives)."""
    x, w, y = _problem(8, 40)
    head = _head(ARCFACE, 40, sample_rate=0.3,
                 sample_generator=torch.Generator().manual_seed(5))
    head.weight.data.copy_(w)
    loss = head(x, y)
    sampled = head.sampled_classes
    assert len(sampled) == max(len(y.unique()), int(0.3 * 40))
    assert set(y.tolist()) <= set(sampled.tolist())
    remapped = (sampled.view(1, -1) == y.view(-1, 1)).long().argmax(1)
    assert_close(loss, insightface_loss(x, w[sampled], remapped, 64.0, *ARCFACE), F64, "loss")


@pytest.mark.parametrize("margins", [ARCFACE, COSFACE], ids=["arcface", "cosface"])
def test_interclass_filtering_threshold(margins):
    """Non-target cosines above the threshold count as 0 and get no gradient."""
    x, w, y = _problem(12, 10)
    head = _head(margins, 10, threshold=0.2)
    head.weight.data.copy_(w)
    mine, theirs, w_ref = (x.clone().requires_grad_(), x.clone().requires_grad_(),
                           w.clone().requires_grad_())
    loss = head(mine, y)
    expected = insightface_loss(theirs, w_ref, y, 64.0, *margins, threshold=0.2)
    loss.backward()
    expected.backward()
    cos = F.normalize(x) @ F.normalize(w).T
    assert ((cos > 0.2) & ~F.one_hot(y, 10).bool()).any(), "the case must filter something"
    assert_close(loss, expected.detach(), F64, "loss")
    assert_close(mine.grad, theirs.grad, F64, "grad embeddings")
    assert_close(head.weight.grad, w_ref.grad, F64, "grad weight")


def test_checkpoint_round_trip():
    """arcface_torch saves module_partial_fc.state_dict() per rank: `weight` only."""
    head = _head(ARCFACE, 10)
    assert list(head.state_dict()) == ["weight"]
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    fresh = _head(ARCFACE, 10)
    assert not torch.equal(fresh.weight, head.weight)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.weight, head.weight)
    x, _, y = _problem(6, 10)
    with torch.no_grad():
        assert_close(fresh(x, y), head(x, y), F64, "loss after loading")
    # an insightface checkpoint is the same dict; a shard of another size is refused
    fresh.load_state_dict({"weight": torch.zeros(10, 16, dtype=F64)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict({"weight": torch.zeros(5, 16, dtype=F64)})


# --- world size 2 over gloo ---------------------------------------------------------------

def _check_world(rank, world):
    c, n_local = 9, 5  # uneven shards: 5 and 4 classes
    for margins, threshold in ((ARCFACE, 0.0), (COSFACE, 0.0), (ARCFACE, 0.2)):
        head = _head(margins, c, threshold=threshold)
        start = c // world * rank + min(rank, c % world)  # arcface_torch's class_start
        num_local = c // world + int(rank < c % world)
        assert (head.class_start, head.num_local) == (start, num_local)
        assert (head.rank, head.world_size, head.num_sample) == (rank, world, num_local)
        assert head.weight.shape == (num_local, 16)
        x, w, y = _problem(world * n_local, c, seed=7)
        head.weight.data.copy_(w[start:start + num_local])
        rows = slice(rank * n_local, (rank + 1) * n_local)
        mine = x[rows].clone().requires_grad_()
        loss = head(mine, y[rows])
        loss.backward()
        theirs, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
        expected = insightface_loss(theirs, w_ref, y, 64.0, *margins, threshold=threshold)
        expected.backward()
        what = f"rank {rank} {margins} threshold {threshold}"
        assert_close(loss, expected.detach(), F64, f"{what} loss")
        assert_close(head.weight.grad, w_ref.grad[start:start + num_local], F64,
                     f"{what} grad weight shard")
        # insightface's AllGather backward: the exact gradient times the world size
        assert_close(mine.grad, world * theirs.grad[rows], F64, f"{what} grad embeddings")
        # this rank's checkpoint loads back into a fresh head of the same rank
        fresh = _head(margins, c, threshold=threshold)
        fresh.load_state_dict(head.state_dict())
        assert torch.equal(fresh.weight, head.weight)


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2])
def test_process_group(world):
    gloo.spawn(world, __name__, ["_check_world"], deadline_s=120)
