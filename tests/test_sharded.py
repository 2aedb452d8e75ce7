"""Sharded margin cross-entropy and PartialFC: equal to the single-process ops.

Two parts. Without process groups: every backend whose kernels exist, at world size 1 and
with a simulated split (the stats op run per shard in one process, combined with the same
function the collectives use). With process groups (marker `dist`): gloo on 127.0.0.1, one
spawn per world size (1, 2, 3, 4) that runs every check, uneven shards, and the error cases
timed against the group's timeout.
"""
import contextlib
import datetime
import importlib
import importlib.util
import time

import pytest
import torch
import torch.distributed as dist

import fusedloss
from fusedloss import distributed as fdist
from fusedloss import sharded
from fusedloss._ops import _KERNELS
from fusedloss.margin import MarginOptions

import gloo
from conftest import MARGIN_VARIANTS, assert_close
from gloo import GROUP_TIMEOUT_S

OPS = ("sharded_margin_stats", "sharded_margin_grad", "sharded_margin_linear_stats",
       "sharded_margin_linear_grad")

# The shared margin variants, a combined one with a SphereFace factor, and the sharded cases.
VARIANTS = {
    **{name: MARGIN_VARIANTS[name]
       for name in ("arcface", "cosface", "sphereface", "arcface_detached")},
    "combined": dict(m1=1.2, m2=0.3, m3=0.2),
    "smoothing_lse_square": dict(m2=0.5, label_smoothing=0.1, lse_square_scale=1e-3),
    "ignore_minus_one": dict(m3=0.35, ignore_index=-1),
}
ELASTIC = {"elastic_arc": dict(m2=0.5, m2_std=0.05), "elastic_cos": MARGIN_VARIANTS["elastic_cos"]}


def close(actual, expected, dtype, what):
    """conftest.assert_close on values (detached from the graphs that made them)."""
    assert_close(actual.detach(), expected.detach(), dtype, what)


def _has_triton_kernels() -> bool:
    try:
        module = importlib.import_module("fusedloss.triton_kernels.sharded")
    except ImportError:
        return False
    return all(hasattr(module, op) for op in OPS)


def _has_cpu_kernels() -> bool:
    return all("cpu" in _KERNELS.get(op, ()) for op in OPS)


def kernel_backends():
    """reference, cpu and triton (interpreted on CPU), each skipped with "no kernel" while its
    kernels are missing."""
    no_kernel = pytest.mark.skip(reason="no kernel")
    params = [pytest.param("reference", id="reference"),
              pytest.param("cpu", id="cpu", marks=() if _has_cpu_kernels() else no_kernel)]
    has_triton = importlib.util.find_spec("triton") is not None and _has_triton_kernels()
    params.append(pytest.param("triton", id="triton",
                               marks=[pytest.mark.triton] + ([] if has_triton else [no_kernel])))
    return params


def make_problem(n, c, dtype=torch.float64, seed=0, ignore_index=-100, d=None):
    """Cosines [n, c] in (-1, 1) (or embeddings [n, d] and weights [c, d]) and targets with
    row 1 ignored, identical in every process that asks with the same seed."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    if n > 1:
        target[1] = ignore_index
    if d is None:
        return (torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1).to(dtype), target
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    return x, w, target


def backward_of(loss, reduction, seed=1):
    """Backward with per-row weights for reduction "none", so every r_i differs."""
    if reduction == "none":
        weights = torch.rand(loss.shape[0], generator=torch.Generator().manual_seed(seed),
                             dtype=loss.dtype)
        loss.backward(weights)
    else:
        loss.backward()


# --- without process groups ------------------------------------------------------------------

def test_shard_range_tiles_the_classes():
    for c, w in [(10, 3), (9, 2), (7, 4), (3, 4), (1, 1), (100, 7)]:
        ranges = [fdist.shard_range(c, w, r) for r in range(w)]
        assert [s for s, _ in ranges] == [r * (c // w) + min(r, c % w) for r in range(w)]
        assert [n for _, n in ranges] == [c // w + (1 if r < c % w else 0) for r in range(w)]
        assert fdist.tiling_errors([dict(class_start=s, num_local=n) for s, n in ranges], c) == []
        assert fdist.shard_starts(c, w) == [s for s, _ in ranges] + [c]


def test_tiling_errors_say_what_is_wrong():
    table = lambda *pairs: [dict(class_start=s, num_local=n) for s, n in pairs]  # noqa: E731
    assert "leaves classes [4, 5) to no rank" in fdist.tiling_errors(table((0, 4), (5, 5)), 10)[0]
    assert "overlaps" in fdist.tiling_errors(table((0, 5), (4, 6)), 10)[0]
    assert "[8, 10) belong to no rank" in fdist.tiling_errors(table((0, 4), (4, 4)), 10)[0]
    assert "leaves [0, 10)" in fdist.tiling_errors(table((0, 4), (4, 7)), 10)[0]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("variant", list(VARIANTS) + list(ELASTIC))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_world_size_one_equals_margin_cross_entropy(backend, variant, reduction):
    kw = dict(VARIANTS.get(variant) or ELASTIC[variant], scale=16.0, reduction=reduction)
    cos, target = make_problem(7, 11, ignore_index=kw.get("ignore_index", -100))
    mine, oracle = cos.clone().requires_grad_(), cos.clone().requires_grad_()
    loss = fusedloss.sharded_margin_cross_entropy(
        mine, target, class_start=0, num_classes=11, backend=backend,
        generator=torch.Generator().manual_seed(5), **kw)
    expected = fusedloss.margin_cross_entropy(oracle, target, backend="reference",
                                              generator=torch.Generator().manual_seed(5), **kw)
    backward_of(loss, reduction)
    backward_of(expected, reduction)
    close(loss, expected, torch.float64, "loss")
    close(mine.grad, oracle.grad, torch.float64, "grad")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    """fp16 / bf16 cosines: the loss in their dtype, the gradient written in it, both within
    its tolerance of the fp64 oracle on the same rounded inputs."""
    cos, target = make_problem(5, 9, dtype)
    mine, oracle = cos.clone().requires_grad_(), cos.double().requires_grad_()
    loss = fusedloss.sharded_margin_cross_entropy(mine, target, class_start=0, num_classes=9,
                                                  backend=backend, scale=16.0, m2=0.5)
    expected = fusedloss.margin_cross_entropy(oracle, target, backend="reference", scale=16.0,
                                              m2=0.5)
    loss.backward()
    expected.backward()
    assert loss.dtype == dtype and mine.grad.dtype == dtype
    close(loss, expected, dtype, "loss")
    close(mine.grad, oracle.grad, dtype, "grad")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", VARIANTS)
def test_simulated_split(backend, dtype, variant):
    """Shards [0, 4), [4, 7), [7, 11) in one process, combined as the collectives combine them."""
    opts = MarginOptions(**VARIANTS[variant], scale=16.0)
    cos, target = make_problem(6, 11, dtype, ignore_index=opts.ignore_index)
    shards = [(0, 4), (4, 3), (7, 4)]
    s, m1, m2, m3 = opts.scale, opts.m1, opts.m2, opts.m3
    stats = torch.stack([sharded.kernel(sharded.STATS, backend)(
        cos[:, a:a + n], target, None, None, s, m1, m2, m3, a, opts.ignore_index)
        for a, n in shards])
    rows = sharded.combine_partials(stats, lambda t: t.amax(0), lambda t: t.sum(0))
    valid = target != opts.ignore_index
    weights = torch.rand(6, dtype=torch.float64)
    coef = sharded.grad_coefficients(rows, weights, valid, opts, 11)
    grad = torch.cat([sharded.kernel(sharded.GRAD, backend)(
        cos[:, a:a + n], target, None, None, coef, s, m1, m2, m3, opts.margin_grad == "detached",
        a, opts.ignore_index) for a, n in shards], dim=1)
    oracle = cos.double().requires_grad_()
    kw = {k: v for k, v in VARIANTS[variant].items()}
    expected = fusedloss.margin_cross_entropy(oracle, target, backend="reference", scale=16.0,
                                              reduction="none", **kw)
    expected.backward(weights)
    close(sharded.row_losses(rows, valid, opts, 11), expected, dtype, "loss")
    assert grad.dtype == dtype
    close(grad, oracle.grad, dtype, "grad")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["arcface", "combined", "smoothing_lse_square"])
@pytest.mark.parametrize("normalize", [True, False])
def test_simulated_split_linear(backend, dtype, variant, normalize):
    """Without normalize the cosines are not cosines: no margin then, the language-model head."""
    kw = dict(VARIANTS[variant], scale=8.0) if normalize else dict(scale=1.0)
    opts = MarginOptions(**kw)
    x, w, target = make_problem(5, 10, dtype, d=6)
    shards = [(0, 4), (4, 3), (7, 3)]
    margins = (opts.scale, opts.m1, opts.m2, opts.m3)
    stats = torch.stack([sharded.kernel(sharded.LINEAR_STATS, backend)(
        x, w[a:a + n], target, None, None, *margins, normalize, a, opts.ignore_index, 0)
        for a, n in shards])
    rows = sharded.combine_partials(stats, lambda t: t.amax(0), lambda t: t.sum(0))
    valid = target != opts.ignore_index
    weights = torch.rand(5, dtype=torch.float64)
    coef = sharded.grad_coefficients(rows, weights, valid, opts, 10)
    parts = [sharded.kernel(sharded.LINEAR_GRAD, backend)(
        x, w[a:a + n], target, None, None, coef, *margins, opts.margin_grad == "detached",
        normalize, a, opts.ignore_index, 0) for a, n in shards]
    ox, ow = x.double().requires_grad_(), w.double().requires_grad_()
    expected = fusedloss.linear_margin_cross_entropy(
        ox, ow, target, normalize=normalize, backend="reference", reduction="none", **kw)
    expected.backward(weights)
    close(sharded.row_losses(rows, valid, opts, 10), expected, dtype, "loss")
    close(sum(p[0] for p in parts), ox.grad, dtype, "grad embeddings")
    close(torch.cat([p[1] for p in parts]), ow.grad, dtype, "grad weight")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_world_size_one(backend, reduction):
    x, w, target = make_problem(6, 9, d=5)
    mx, mw = x.clone().requires_grad_(), w.clone().requires_grad_()
    ox, ow = x.clone().requires_grad_(), w.clone().requires_grad_()
    kw = dict(scale=8.0, m2=0.3, m3=0.1, label_smoothing=0.05, reduction=reduction)
    loss = fusedloss.linear_sharded_margin_cross_entropy(mx, mw, target, class_start=0,
                                                         num_classes=9, backend=backend, **kw)
    expected = fusedloss.linear_margin_cross_entropy(ox, ow, target, backend="reference", **kw)
    backward_of(loss, reduction)
    backward_of(expected, reduction)
    close(loss, expected, torch.float64, "loss")
    close(mx.grad, ox.grad, torch.float64, "grad embeddings")
    close(mw.grad, ow.grad, torch.float64, "grad weight")


def test_bad_input_without_process_group():
    cos, target = make_problem(4, 6)
    call = fusedloss.sharded_margin_cross_entropy
    with pytest.raises(ValueError, match="not supported when sharded"):
        call(cos, target, class_start=0, num_classes=6, m2_std=0.1, elastic_plus=True)
    with pytest.raises(ValueError, match=r"target\[0\] = 6 is outside \[0, 6\)"):
        call(cos, torch.tensor([6, 0, 1, 2]), class_start=0, num_classes=6)
    with pytest.raises(ValueError, match="tile"):
        call(cos, target, class_start=1, num_classes=7)
    with pytest.raises(ValueError, match=r"classes \[5, 6\) belong to no rank"):
        call(cos[:, :5], target, class_start=0, num_classes=6)
    with pytest.raises(TypeError, match="unexpected keyword"):
        call(cos, target, class_start=0, num_classes=6, margin=0.5)
    with pytest.raises(RuntimeError, match="not initialised"):
        call(cos, target, class_start=0, num_classes=6, group=object())
    with pytest.raises(ValueError, match="sample_rate"):
        fusedloss.nn.PartialFC(4, 6, sample_rate=0.0)
    with pytest.raises(ValueError, match="not supported when sharded"):
        fusedloss.nn.PartialFC(4, 6, loss="elastic_arcface_plus")


def test_reshard_state_dicts_round_trip():
    weight = torch.randn(10, 3)
    two = [dict(weight=weight[s:s + n], class_range=torch.tensor([s, n, 10]))
           for s, n in (fdist.shard_range(10, 2, r) for r in range(2))]
    three = fusedloss.nn.PartialFC.reshard_state_dicts(two[::-1], 3)  # any order of ranks
    assert [sd["class_range"].tolist() for sd in three] == [[0, 4, 10], [4, 3, 10], [7, 3, 10]]
    torch.testing.assert_close(torch.cat([sd["weight"] for sd in three]), weight)
    back = fdist.reshard_state_dicts(three, 2)
    for a, b in zip(back, two):
        torch.testing.assert_close(a["weight"], b["weight"])
    with pytest.raises(ValueError, match="no rank"):
        fdist.reshard_state_dicts(two[:1], 3)


def _reference_head(weight, **kw):
    head = fusedloss.nn.MarginSoftmaxHead(weight.shape[1], weight.shape[0], dtype=torch.float64,
                                          backend="reference", **kw)
    head.weight.data.copy_(weight)
    return head


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("epilogue", [{}, dict(tau=1.7), dict(interclass_filtering_threshold=0.2)],
                         ids=["plain", "tau", "filtering"])
def test_partial_fc_world_size_one(backend, epilogue):
    x, w, target = make_problem(6, 9, d=5)
    head = fusedloss.nn.PartialFC(5, 9, loss="combined", dtype=torch.float64, backend=backend,
                                  **epilogue)
    head.weight.data.copy_(w)
    mine, oracle = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_head = _reference_head(w, loss="combined", **epilogue)
    loss, expected = head(mine, target), ref_head(oracle, target)
    loss.backward()
    expected.backward()
    close(loss, expected, torch.float64, "loss")
    close(mine.grad, oracle.grad, torch.float64, "grad embeddings (world size 1)")
    close(head.weight.grad, ref_head.weight.grad, torch.float64, "grad weight")
    assert head.state_dict()["class_range"].tolist() == [0, 9, 9]


# --- with process groups ----------------------------------------------------------------------

def _dist_backends():
    return ["reference"] + (["cpu"] if _has_cpu_kernels() else [])


def _num_classes(world):
    return {1: 7, 2: 9, 3: 10, 4: 10}[world]  # uneven shards from world size 2 on


def compare_logit_shard(cos, target, shard, backend, what, **kw):
    """sharded_margin_cross_entropy on this rank's columns of cos (shard = class_start,
    C_local, C) against margin_cross_entropy of the reference on all of cos in fp64: the loss
    and this shard's gradient, within the tolerance of cos's dtype. ElasticFace draws come
    from a generator seeded alike on every rank."""
    start, count, c = shard
    reduction = kw.get("reduction", "mean")
    mine = cos[:, start:start + count].clone().requires_grad_()
    oracle = cos.double().requires_grad_()
    loss = fusedloss.sharded_margin_cross_entropy(
        mine, target, class_start=start, num_classes=c, backend=backend,
        generator=torch.Generator().manual_seed(3), **kw)
    expected = fusedloss.margin_cross_entropy(
        oracle, target, backend="reference", generator=torch.Generator().manual_seed(3), **kw)
    backward_of(loss, reduction)
    backward_of(expected, reduction)
    close(loss, expected, cos.dtype, f"loss {what}")
    close(mine.grad, oracle.grad[:, start:start + count], cos.dtype, f"grad {what}")


def check_logit_level(rank, world):
    c = _num_classes(world)
    shard = (*fdist.shard_range(c, world, rank), c)
    for backend in _dist_backends():
        cases = [(v, kw, "none") for v, kw in {**VARIANTS, **ELASTIC}.items()]
        cases += [("arcface", VARIANTS["arcface"], r) for r in ("mean", "sum")]
        for variant, kw, reduction in cases:
            if backend != "reference" and variant not in ("combined", "smoothing_lse_square",
                                                          "elastic_arc", "arcface"):
                continue  # the kernels meet every variant in test_simulated_split
            kw = dict(kw, scale=16.0, reduction=reduction)
            cos, target = make_problem(6, c, ignore_index=kw.get("ignore_index", -100))
            compare_logit_shard(cos, target, shard, backend,
                                f"{backend} {variant} {reduction} rank {rank}/{world}", **kw)
        if backend != "reference":  # fp32 kernels against the fp64 oracle on the same inputs
            cos, target = make_problem(6, c, torch.float32)
            compare_logit_shard(cos, target, shard, backend, f"fp32 {backend}", m2=0.5)


def check_linear(rank, world):
    c = _num_classes(world)
    start, count = fdist.shard_range(c, world, rank)
    cases = [dict(m2=0.5), dict(m1=1.2, m2=0.3, m3=0.2, label_smoothing=0.1),
             dict(scale=1.0, normalize=False, lse_square_scale=1e-2)]
    for backend in _dist_backends():
        for kw in cases:
            for reduction in ("mean", "none"):
                kw = dict(kw, reduction=reduction)
                x, w, target = make_problem(5, c, d=6)
                mx, mw = x.clone().requires_grad_(), w[start:start + count].clone().requires_grad_()
                ox, ow = x.clone().requires_grad_(), w.clone().requires_grad_()
                loss = fusedloss.linear_sharded_margin_cross_entropy(
                    mx, mw, target, class_start=start, num_classes=c, backend=backend, **kw)
                expected = fusedloss.linear_margin_cross_entropy(ox, ow, target,
                                                                 backend="reference", **kw)
                backward_of(loss, reduction)
                backward_of(expected, reduction)
                what = f"{backend} {kw} rank {rank}/{world}"
                close(loss, expected, torch.float64, f"loss {what}")
                close(mx.grad, ox.grad, torch.float64, f"grad embeddings {what}")
                close(mw.grad, ow.grad[start:start + count], torch.float64,
                      f"grad weight {what}")


def _local_batch(rank, world, c, dtype=torch.float64, d=6):
    """Every rank's batch sizes (2, 3, 4, ...: all different), the gathered batch and this
    rank's rows of it."""
    sizes = [2 + r for r in range(world)]
    x, w, labels = make_problem(sum(sizes), c, dtype, seed=7, d=d)
    first = sum(sizes[:rank])
    return x, w, labels, slice(first, first + sizes[rank])


def check_partial_fc(rank, world):
    c = _num_classes(world)
    start, count = fdist.shard_range(c, world, rank)
    for backend in _dist_backends():
        for loss_name, dtype in (("arcface", torch.float32), ("combined", torch.float64)):
            for ddp_grad_scale in (True, False):
                x, w, labels, mine_rows = _local_batch(rank, world, c, dtype)
                head = fusedloss.nn.PartialFC(6, c, loss=loss_name, ddp_grad_scale=ddp_grad_scale,
                                              backend=backend, dtype=dtype)
                assert tuple(head.weight.shape) == (count, 6)
                assert head.state_dict()["class_range"].tolist() == [start, count, c]
                head.weight.data.copy_(w[start:start + count])
                mine = x[mine_rows].clone().requires_grad_()
                loss = head(mine, labels[mine_rows])
                loss.backward()
                ref_head = _reference_head(w.double(), loss=loss_name)
                oracle = x.double().requires_grad_()
                expected = ref_head(oracle, labels)
                expected.backward()
                factor = world if ddp_grad_scale else 1
                what = f"{backend} {loss_name} ddp_grad_scale={ddp_grad_scale} rank {rank}/{world}"
                close(loss, expected, dtype, f"loss {what}")
                close(head.weight.grad, ref_head.weight.grad[start:start + count], dtype,
                      f"grad weight {what}")
                close(mine.grad, factor * oracle.grad[mine_rows], dtype,
                      f"grad embeddings {what}")


@contextlib.contextmanager
def recorded_collectives():
    """[(collective, traffic tag, shape of the tensor this rank hands it)] of every all_reduce,
    all_gather, all_to_all_single and reduce-scatter called through torch.distributed while
    inside; the tag is the one fusedloss.distributed issued the call under
    (fdist.current_traffic(); None for a call made outside its wrappers)."""
    where = {"all_reduce": 0, "all_gather": 1, "all_to_all_single": 1,
             "reduce_scatter_single": 1, "reduce_scatter_tensor": 1}
    calls, saved = [], {}

    def recording(name, original):
        def collective(*args, **kwargs):
            calls.append((name, fdist.current_traffic(), tuple(args[where[name]].shape)))
            return original(*args, **kwargs)
        return collective

    for name in where:
        if hasattr(dist, name):
            saved[name] = getattr(dist, name)
            setattr(dist, name, recording(name, saved[name]))
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


def check_partial_fc_backward_traffic(rank, world):
    """PartialFC's backward moves the gathered N x D embedding gradient once, as a
    reduce-scatter of its W blocks padded to the largest batch (on gloo, whose reduce_scatter
    is a whole all_reduce underneath, an all_to_all of the blocks): no all_reduce of N x D."""
    c = _num_classes(world)
    x, w, labels, mine_rows = _local_batch(rank, world, c)
    head = fusedloss.nn.PartialFC(6, c, dtype=torch.float64)
    loss = head(x[mine_rows].clone().requires_grad_(), labels[mine_rows])
    with recorded_collectives() as calls:
        loss.backward()
    longest = 1 + world  # the batch sizes are 2, 3, ..., world + 1
    assert calls == [("all_to_all_single", fdist.EMBEDDING_GRAD, (world * longest, 6))], calls


def check_reduce_scatter_rows(rank, world):
    """Each rank gets the sum over ranks of its own rows, from reduce_scatter_rows and from
    both ways of summing the padded blocks: the backend's reduce-scatter (NCCL's path) and
    the all_to_all with a local sum (gloo's)."""
    sizes = [2 + r for r in range(world)]
    base = torch.arange(sum(sizes) * 3, dtype=torch.float64).view(-1, 3)
    first = sum(sizes[:rank])
    expected = base[first:first + sizes[rank]] * (world * (world + 1) // 2)
    rows = base * (rank + 1)
    assert torch.equal(fdist.reduce_scatter_rows(rows, sizes), expected)
    padded = fdist._padded_blocks(rows, sizes)
    for way in (fdist.reduce_scatter, fdist.exchange_and_sum):
        assert torch.equal(way(padded, world)[: sizes[rank]], expected), way.__name__


def check_sampling(rank, world):
    c = 7 * world + 1
    start, count = fdist.shard_range(c, world, rank)
    for sample_rate in (0.5, 0.01):
        x, w, labels, mine_rows = _local_batch(rank, world, c)
        head = fusedloss.nn.PartialFC(6, c, sample_rate=sample_rate, loss="cosface",
                                      dtype=torch.float64,
                                      sample_generator=torch.Generator().manual_seed(rank))
        head.weight.data.copy_(w[start:start + count])
        mine = x[mine_rows].clone().requires_grad_()
        loss = head(mine, labels[mine_rows])
        loss.backward()
        sampled = head.sampled_classes.tolist()
        positives = {int(y) for y in labels if start <= y < start + count}
        assert positives <= set(sampled), (positives, sampled)
        assert len(set(sampled)) == len(sampled) == max(len(positives), int(sample_rate * count))
        assert all(start <= s < start + count for s in sampled)
        unsampled = [j for j in range(count) if j + start not in set(sampled)]
        assert torch.equal(head.weight.grad[unsampled], torch.zeros(len(unsampled), 6,
                                                                    dtype=torch.float64))
        # The loss is the unsharded one over the union of the sampled classes, in rank order.
        every = [None] * world
        dist.all_gather_object(every, sampled)
        union = [cls for part in every for cls in part]
        place = {cls: i for i, cls in enumerate(union)}
        sub_labels = torch.tensor([place[int(y)] if y >= 0 else int(y) for y in labels])
        ref_w = w[union].clone().requires_grad_()
        oracle = x.clone().requires_grad_()
        expected = fusedloss.linear_margin_cross_entropy(oracle, ref_w, sub_labels,
                                                         backend="reference", **head.kwargs)
        expected.backward()
        close(loss, expected, torch.float64, f"sampled loss rate {sample_rate}")
        close(mine.grad, world * oracle.grad[mine_rows], torch.float64, "sampled grad x")
        mine_in_union = [place[s] for s in sampled]
        local_rows = [s - start for s in sampled]
        close(head.weight.grad[local_rows], ref_w.grad[mine_in_union], torch.float64,
              "sampled grad weight")


def check_empty_shards(rank, world):
    """C = 3 on 4 ranks: the last rank holds no class."""
    cos, target = make_problem(4, 3)
    compare_logit_shard(cos, target, (*fdist.shard_range(3, world, rank), 3), "reference",
                        "with an empty shard", m2=0.5)


def check_reshard_two_to_three(rank, world):
    c = _num_classes(world)
    x, w, labels, mine_rows = _local_batch(rank, world, c)
    saved = [dict(weight=w[s:s + n].clone(), class_range=torch.tensor([s, n, c]))
             for s, n in (fdist.shard_range(c, 2, r) for r in range(2))]
    resharded = fusedloss.nn.PartialFC.reshard_state_dicts(saved, world)
    head = fusedloss.nn.PartialFC(6, c, dtype=torch.float64)
    head.load_state_dict(resharded[rank])
    start, count = fdist.shard_range(c, world, rank)
    assert torch.equal(head.weight.detach(), w[start:start + count])
    loss = head(x[mine_rows], labels[mine_rows])
    close(loss, _reference_head(w)(x, labels), torch.float64, "loss after resharding")
    with pytest.raises(RuntimeError, match="reshard"):
        head.load_state_dict(resharded[(rank + 1) % world])


def _expect_error(call, *texts, error=ValueError):
    """call raises `error` mentioning every text, and well before the group's timeout."""
    began = time.monotonic()
    with pytest.raises(error) as info:
        call()
    elapsed = time.monotonic() - began
    assert elapsed < GROUP_TIMEOUT_S / 10, f"the error took {elapsed:.1f} s"
    for text in texts:
        assert text in str(info.value), (text, str(info.value))


def check_errors(rank, world):
    c = _num_classes(world)
    start, count = fdist.shard_range(c, world, rank)
    last = world - 1
    cos, target = make_problem(4, c)
    local = cos[:, start:start + count]

    def call(t=target, s=start, total=c, **kw):
        return fusedloss.sharded_margin_cross_entropy(local, t, class_start=s, num_classes=total,
                                                      m2=0.5, **kw)

    out_of_range = target.clone()
    if rank == last:
        out_of_range[2] = c + 3
    _expect_error(lambda: call(out_of_range), f"on rank {last}, target[2] = {c + 3} is outside")
    if world > 1:
        differing = target.clone()
        if rank == 0:
            differing[0] = (differing[0] + 1) % c
        _expect_error(lambda: call(differing), "target (differs: rank 0 vs")
        _expect_error(lambda: call(s=start + (rank == 0)), "tile [0, ")
        _expect_error(lambda: call(total=c + (rank == last)), "num_classes (")
        _expect_error(lambda: call(scale=32.0 if rank == 0 else 64.0),
                      "options (differs: rank 0 vs")
        # A check that fails on one rank alone: that rank raises its own error, the others
        # say which rank failed.
        float_target = target.double() if rank == 0 else target
        if rank == 0:
            _expect_error(lambda: call(float_target), "integer class indices", error=TypeError)
        else:
            _expect_error(lambda: call(float_target), "the inputs of rank(s) [0] are invalid")
        x, w, _ = make_problem(4, c, d=5)
        _expect_error(lambda: fusedloss.linear_sharded_margin_cross_entropy(
            x + (rank == 0), w[start:start + count], target, class_start=start, num_classes=c),
            "embeddings (differs: rank 0 vs")
    _expect_error(lambda: call(m2_std=0.1, generator=torch.Generator().manual_seed(rank))
                  if world > 1 else call(s=1), "elastic_m2_draws" if world > 1 else "tile")
    x, w, labels, mine_rows = _local_batch(rank, world, c)
    head = fusedloss.nn.PartialFC(6, c, dtype=torch.float64)
    bad_labels = labels[mine_rows].clone()
    if rank == last:
        bad_labels[1] = -5
    _expect_error(lambda: head(x[mine_rows], bad_labels),
                  f"on rank {last}, local_labels[1] = -5 is outside")
    _expect_error(lambda: head(x[mine_rows][:, : 6 - (rank == 0)], labels[mine_rows]),
                  "local_embeddings on rank(s) [0]")
    # Every rank raised at the same point, so the group is still in step.
    close(call(), fusedloss.margin_cross_entropy(cos, target, backend="reference", m2=0.5),
                 torch.float64, "loss after the errors")


def _epilogue_case(fn, shard_inputs, full_inputs, target, start, count, c, backend, **kw):
    """fn (a sharded form) on this rank's shard against the single-process oracle on the whole
    problem, with the same extra negative columns and a weighted lse^2 term: loss, lse, the
    gradient of every input (this shard's part of the weight or cosines) and of e."""
    extra = torch.linspace(-0.8, 0.9, 6, dtype=torch.float64)
    mine = [t.clone().requires_grad_() for t in (*shard_inputs, extra)]
    full = [t.clone().requires_grad_() for t in (*full_inputs, extra)]
    loss, lse = fn(*mine[:-1], target, class_start=start, num_classes=c, backend=backend,
                   extra_negatives=mine[-1], return_lse=True, **kw)
    oracle = (fusedloss.margin_cross_entropy if len(full_inputs) == 1
              else fusedloss.linear_margin_cross_entropy)
    want, want_lse = oracle(*full[:-1], target, backend="reference", extra_negatives=full[-1],
                            return_lse=True, **kw)
    for out, lse_out in ((loss, lse), (want, want_lse)):
        (out.sum() + 0.01 * (lse_out * lse_out).sum()).backward()
    close(loss, want, torch.float64, "loss")
    close(lse, want_lse, torch.float64, "lse")
    cols = slice(start, start + count)
    expected = [full[0].grad[:, cols]] if len(full_inputs) == 1 else [full[0].grad,
                                                                       full[1].grad[cols]]
    for got, exp in zip([t.grad for t in mine], expected + [full[-1].grad]):
        close(got, exp, torch.float64, "grad")


def check_epilogues(rank, world):
    """tau, softcap, the inter-class filtering, extra_negatives (the same e on every rank,
    counted once) and return_lse across
    ranks against the single-process oracle; e that differs across ranks is an error there."""
    c = _num_classes(world)
    start, count = fdist.shard_range(c, world, rank)
    cos, target = make_problem(6, c)
    x, w, _ = make_problem(6, c, d=5)
    for backend in _dist_backends():
        for kw in (dict(tau=1.7, m2=0.5, scale=16.0), dict(m3=0.35, label_smoothing=0.1,
                                                           reduction="none"),
                   dict(tau=0.0, scale=4.0, lse_square_scale=1e-3),
                   dict(scale=16.0, softcap=5.0, interclass_filtering_threshold=0.3)):
            _epilogue_case(fusedloss.sharded_margin_cross_entropy, (cos[:, start:start + count],),
                           (cos,), target, start, count, c, backend, **kw)
            _epilogue_case(fusedloss.linear_sharded_margin_cross_entropy,
                           (x, w[start:start + count]), (x, w), target, start, count, c, backend,
                           **kw)
    for backend in _dist_backends():  # inplace_backward: this shard's gradient in local_cos
        mine = cos[:, start:start + count].clone().requires_grad_()
        loss = fusedloss.sharded_margin_cross_entropy(mine * 1.0, target, class_start=start,
                                                      num_classes=c, backend=backend, m2=0.5,
                                                      tau=1.5, inplace_backward=True)
        full = cos.clone().requires_grad_()
        want = fusedloss.margin_cross_entropy(full, target, backend="reference", m2=0.5, tau=1.5)
        loss.backward()
        want.backward()
        close(loss, want, torch.float64, "inplace loss")
        close(mine.grad, full.grad[:, start:start + count], torch.float64, "inplace grad")
    if world > 1:
        e = torch.linspace(-0.5, 0.5, 4, dtype=torch.float64) + (rank == 0)
        _expect_error(lambda: fusedloss.sharded_margin_cross_entropy(
            cos[:, start:start + count], target, class_start=start, num_classes=c,
            extra_negatives=e), "extra_negatives (differs: rank 0 vs")


_CHECKS = ["check_logit_level", "check_linear", "check_partial_fc",
           "check_partial_fc_backward_traffic", "check_reduce_scatter_rows", "check_sampling",
           "check_errors", "check_epilogues"]


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_process_group(world):
    extra = {3: ["check_reshard_two_to_three"], 4: ["check_empty_shards"]}.get(world, [])
    gloo.spawn(world, __name__, _CHECKS + extra)


# --- over NCCL, one GPU -------------------------------------------------------------------------

def check_sharded_ops_over_the_default_group(form, dtype, device):
    """The sharded op of `form` ("logit": sharded_margin_cross_entropy on cos [N, C];
    "linear": linear_sharded_margin_cross_entropy on x [N, D] and w [C, D]) over the default
    process group, one rank holding all C classes, on `dtype` inputs on `device`, against
    the unsharded op's fp64 reference on the same (rounded) inputs: the loss and the
    gradient of every input."""
    n, c, d, kw = 512, 3000, 128, dict(scale=64.0, m2=0.5)
    g = torch.Generator(device=device).manual_seed(0)
    target = torch.randint(0, c, (n,), device=device, generator=g)
    target[1] = -100
    if form == "logit":
        inputs = (torch.empty(n, c, device=device).uniform_(-0.8, 0.8, generator=g),)
        op, oracle = fusedloss.sharded_margin_cross_entropy, fusedloss.margin_cross_entropy
    else:
        inputs = (torch.randn(n, d, device=device, generator=g),
                  torch.randn(c, d, device=device, generator=g))
        op = fusedloss.linear_sharded_margin_cross_entropy
        oracle = fusedloss.linear_margin_cross_entropy
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    loss = op(*leaves, target, class_start=0, num_classes=c, group=dist.group.WORLD, **kw)
    loss.backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    expected = oracle(*ref_leaves, target, backend="reference", **kw)
    expected.backward()
    what = f"{op.__name__} {dtype} over a 1-rank {dist.get_backend()} group"
    close(loss, expected, dtype, f"loss {what}")
    for i, (leaf, ref) in enumerate(zip(leaves, ref_leaves)):
        close(leaf.grad, ref.grad, dtype, f"grad of input {i} {what}")


@pytest.fixture
def nccl_group(tmp_path):
    """The default process group for the test: one NCCL rank on the current GPU, over a
    FileStore, with the group timeout of this file; destroyed after the test."""
    if not dist.is_nccl_available():
        pytest.skip("this build of torch has no NCCL")
    if dist.is_initialized():
        pytest.fail("a default process group exists already: the test would not own it")
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1, device_id=device,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        yield device
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["logit", "linear"])
def test_sharded_ops_over_a_one_rank_nccl_group(nccl_group, form, dtype):
    check_sharded_ops_over_the_default_group(form, dtype, nccl_group)
