"""fusedloss.pml against pytorch-metric-learning itself: the same losses and gradients (fp64,
fp32 and bf16 against PML in fp64), the same miner outputs, PML's own code (with one warning per reason) wherever the
call is not one the kernels compute, PML's CrossBatchMemory over a wrapping ring, and a
20-step PML trainer loop with both."""
import warnings

import pytest
import torch

pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import (distances, losses, miners, reducers,  # noqa: E402
                                     regularizers, trainers)

from fusedloss import pml  # noqa: E402

from conftest import assert_close  # noqa: E402

COSINE_NO_NORM = dict(distance=distances.DotProductSimilarity(normalize_embeddings=False))
COSINE = dict(distance=distances.CosineSimilarity())


def _batch(n=24, d=8, classes=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _loss_and_grads(loss, miner, x, y, ref=None, ref_y=None):
    """loss (and the miner's indices) on leaf copies of x (and ref): (loss, grads)."""
    leaves = [x.clone().requires_grad_()]
    if ref is not None:
        leaves.append(ref.clone().requires_grad_())
    ref_leaf = leaves[1] if ref is not None else None
    indices = None if miner is None else miner(leaves[0], y, ref_leaf, ref_y)
    value = loss(leaves[0], y, indices, ref_leaf, ref_y)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)]


# (name, make(module) -> loss, make_miner(module) -> miner or None, batch options)
FUSED = [
    ("multi_similarity", lambda m: m.MultiSimilarityLoss(), None, {}),
    ("multi_similarity_params", lambda m: m.MultiSimilarityLoss(alpha=1.5, beta=20, base=0.3),
     None, {}),
    ("multi_similarity_mined", lambda m: m.MultiSimilarityLoss(),
     lambda m: m.MultiSimilarityMiner(epsilon=0.2), {}),
    ("multi_similarity_mined_dot", lambda m: m.MultiSimilarityLoss(**COSINE_NO_NORM),
     lambda m: m.MultiSimilarityMiner(**COSINE_NO_NORM), dict(scale=0.3)),
    ("supcon", lambda m: m.SupConLoss(temperature=0.2), None, {}),
    ("ntxent_views", lambda m: m.NTXentLoss(temperature=0.1), None, dict(views=True)),
    ("contrastive_lp", lambda m: m.ContrastiveLoss(), None, {}),
    ("contrastive_lp_margins", lambda m: m.ContrastiveLoss(pos_margin=0.2, neg_margin=1.2),
     None, {}),
    ("contrastive_cosine", lambda m: m.ContrastiveLoss(pos_margin=0.9, neg_margin=0.1, **COSINE),
     None, {}),
    ("contrastive_cosine_pml_defaults", lambda m: m.ContrastiveLoss(**COSINE), None, {}),
    ("triplet_batch_hard", lambda m: m.TripletMarginLoss(margin=0.3),
     lambda m: m.BatchHardMiner(), {}),
    ("triplet_batch_hard_cosine", lambda m: m.TripletMarginLoss(margin=0.2, **COSINE),
     lambda m: m.BatchHardMiner(**COSINE), {}),
]


def _inputs(opts, dtype, seed=0):
    x, y = _batch(dtype=dtype, seed=seed)
    if opts.get("views"):
        y = torch.arange(12).repeat(2)
    return x * opts.get("scale", 1.0), y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,make,make_miner,opts", FUSED, ids=[c[0] for c in FUSED])
def test_fused_equals_pml(name, make, make_miner, opts, dtype):
    x, y = _inputs(opts, dtype)
    ours_miner = make_miner(pml) if make_miner else None
    theirs_miner = make_miner(miners) if make_miner else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", pml.PMLFallbackWarning)
        loss, grads = _loss_and_grads(make(pml), ours_miner, x, y)
    expected, expected_grads = _loss_and_grads(make(losses), theirs_miner, x.double(), y)
    assert loss.dtype == dtype
    assert float(expected) != 0.0, "the case must exercise a non-zero loss"
    assert_close(loss, expected, dtype, f"{name} loss")
    assert_close(grads[0], expected_grads[0], dtype, f"{name} grad")


# Reference sets: (loss, miner, labels of the reference set)
WITH_REF = [
    ("multi_similarity", lambda m: m.MultiSimilarityLoss(), None),
    ("multi_similarity_mined", lambda m: m.MultiSimilarityLoss(),
     lambda m: m.MultiSimilarityMiner()),
    ("supcon", lambda m: m.SupConLoss(), None),
    ("contrastive", lambda m: m.ContrastiveLoss(), None),
    ("triplet_batch_hard", lambda m: m.TripletMarginLoss(margin=0.3), lambda m: m.BatchHardMiner()),
]


@pytest.mark.parametrize("name,make,make_miner", WITH_REF, ids=[c[0] for c in WITH_REF])
def test_reference_set_equals_pml(name, make, make_miner):
    x, y = _batch(n=10)
    ref, ref_y = _batch(n=30, seed=1)
    results = []
    for module, miner_module in ((pml, pml), (losses, miners)):
        miner = make_miner(miner_module) if make_miner else None
        with warnings.catch_warnings():
            warnings.simplefilter("error" if module is pml else "ignore", pml.PMLFallbackWarning)
            results.append(_loss_and_grads(make(module), miner, x, y, ref, ref_y))
    (loss, grads), (expected, expected_grads) = results
    assert_close(loss, expected, torch.float64, f"{name} loss")
    for g, e, what in zip(grads, expected_grads, ("grad", "grad ref")):
        assert_close(g, e, torch.float64, f"{name} {what}")


def test_ntxent_query_key_equals_pml_and_info_nce():
    """SimCLR / CLIP's form: NTXentLoss(q, arange, ref_emb=k, ref_labels=arange)."""
    q, _ = _batch(n=16)
    k, _ = _batch(n=16, seed=2)
    ids, key_ids = torch.arange(16), torch.arange(16)  # two tensors: PML reads `is` as self
    with warnings.catch_warnings():
        warnings.simplefilter("error", pml.PMLFallbackWarning)
        ours = pml.NTXentLoss(0.1)(q, ids, None, k, key_ids)
    theirs = losses.NTXentLoss(0.1)(q, ids, None, k, key_ids)
    assert_close(ours, theirs, torch.float64, "ntxent q/k")
    import fusedloss
    assert_close(ours, fusedloss.info_nce_loss(q, k, temperature=0.1, backend="reference"),
                 torch.float64, "ntxent = info_nce")


def test_miners_return_pml_pairs():
    x, y = _batch(n=40, classes=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pml.PMLFallbackWarning)
        ours = pml.MultiSimilarityMiner(epsilon=0.15)(x, y)
        hard = pml.BatchHardMiner()(x, y)
        hard_cos = pml.BatchHardMiner(**COSINE)(x, y)
    theirs = miners.MultiSimilarityMiner(epsilon=0.15)(x, y)
    assert isinstance(ours, tuple) and len(ours) == 4
    for k in (0, 2):  # the same pair sets (PML orders a row's pairs by score, ours by column)
        mine = set(zip(ours[k].tolist(), ours[k + 1].tolist()))
        assert mine == set(zip(theirs[k].tolist(), theirs[k + 1].tolist())) and mine
    for got, expected in ((hard, miners.BatchHardMiner()(x, y)),
                          (hard_cos, miners.BatchHardMiner(**COSINE)(x, y))):
        assert len(got) == 3
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def _reg():
    return dict(embedding_regularizer=regularizers.LpRegularizer())


# Calls the kernels do not compute: PML's result, and a PMLFallbackWarning naming the reason.
FALLBACKS = [
    ("reducer", lambda m: m.SupConLoss(reducer=reducers.MeanReducer()), None, "reducer"),
    ("regularizer", lambda m: m.ContrastiveLoss(**_reg()), None, "embedding_regularizer"),
    ("distance", lambda m: m.MultiSimilarityLoss(distance=distances.LpDistance()), None,
     "distance"),
    ("lp_power", lambda m: m.ContrastiveLoss(distance=distances.LpDistance(power=2)), None,
     "distance"),
    ("foreign_miner", lambda m: m.MultiSimilarityLoss(),
     lambda m: miners.PairMarginMiner(), "indices_tuple"),
    ("all_triplets", lambda m: m.TripletMarginLoss(), None, "every triplet"),
    ("triplet_wrong_miner", lambda m: m.TripletMarginLoss(), lambda m: m.MultiSimilarityMiner(),
     "BatchHardMiner"),
    ("triplet_swap", lambda m: m.TripletMarginLoss(swap=True),
     lambda m: m.BatchHardMiner(), "swap"),
    ("ntxent_many_positives", lambda m: m.NTXentLoss(), None, "several positives"),
    ("supcon_mined", lambda m: m.SupConLoss(), lambda m: m.MultiSimilarityMiner(),
     "indices_tuple"),
    ("collect_stats", lambda m: m.SupConLoss(collect_stats=True), None, "collect_stats"),
]


@pytest.mark.parametrize("name,make,make_miner,reason", FALLBACKS, ids=[c[0] for c in FALLBACKS])
def test_uncovered_calls_run_pml_with_a_warning(name, make, make_miner, reason):
    x, y = _batch()
    pml._WARNED.clear()
    with pytest.warns(pml.PMLFallbackWarning, match=reason):
        loss, grads = _loss_and_grads(make(pml), make_miner(pml) if make_miner else None, x, y)
    with warnings.catch_warnings(record=True) as seen:  # once per reason
        warnings.simplefilter("always")
        _loss_and_grads(make(pml), make_miner(pml) if make_miner else None, x, y)
    assert not [w for w in seen if issubclass(w.category, pml.PMLFallbackWarning)
                and reason in str(w.message)]
    theirs_miner = make_miner(miners) if make_miner else None
    expected, expected_grads = _loss_and_grads(make(losses), theirs_miner, x, y)
    assert_close(loss, expected, torch.float64, f"{name} loss")
    assert_close(grads[0], expected_grads[0], torch.float64, f"{name} grad")


def test_miner_falls_back_outside_its_cover():
    x, y = _batch()
    pml._WARNED.clear()
    with pytest.warns(pml.PMLFallbackWarning, match="allowed_pos_range"):
        ours = pml.BatchHardMiner(allowed_pos_range=(0.5, 3.0))(x, y)
    theirs = miners.BatchHardMiner(allowed_pos_range=(0.5, 3.0))(x, y)
    assert not isinstance(ours, pml.MinedTuple)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_indices_from_other_tensors_are_not_fused():
    """Indices mined from one batch and handed to the loss with another are PML's business."""
    x, y = _batch()
    other = x.clone()
    indices = pml.MultiSimilarityMiner()(x, y)
    pml._WARNED.clear()
    with pytest.warns(pml.PMLFallbackWarning, match="indices_tuple"):
        loss = pml.MultiSimilarityLoss()(other, y, indices)
    torch.testing.assert_close(loss, losses.MultiSimilarityLoss()(other, y, indices))


def test_pml_modules_with_the_drop_ins():
    """`from fusedloss.pml import losses, miners` replaces PML's import: ours where we have
    one, PML's own class for every other name."""
    from fusedloss.pml.losses import SupConLoss

    assert SupConLoss is pml.SupConLoss and pml.losses.CrossBatchMemory is pml.CrossBatchMemory
    assert pml.miners.BatchHardMiner is pml.BatchHardMiner
    assert pml.losses.ArcFaceLoss is losses.ArcFaceLoss
    assert pml.miners.TripletMarginMiner is miners.TripletMarginMiner
    public = {k for k in vars(losses) if not k.startswith("_")}
    assert public <= set(vars(pml.losses))


def test_classes_are_pml_classes():
    assert isinstance(pml.MultiSimilarityLoss(), losses.MultiSimilarityLoss)
    assert isinstance(pml.CrossBatchMemory(pml.SupConLoss(), 8), losses.CrossBatchMemory)
    assert isinstance(pml.BatchHardMiner(), miners.BatchHardMiner)
    assert pml.SupConLoss(temperature=0.3, backend="reference").temperature == 0.3


BANKS = [
    ("multi_similarity_mined", lambda m: m.MultiSimilarityLoss(),
     lambda m: m.MultiSimilarityMiner()),
    ("multi_similarity", lambda m: m.MultiSimilarityLoss(), None),
    ("supcon", lambda m: m.SupConLoss(), None),
    ("contrastive", lambda m: m.ContrastiveLoss(), None),
    ("triplet_batch_hard", lambda m: m.TripletMarginLoss(margin=0.3), lambda m: m.BatchHardMiner()),
]


def _both_memories(make, make_miner, memory_size):
    """(ours, theirs): CrossBatchMemory of embedding size 8 from fusedloss's pml and from PML,
    around the loss make(module) and the miner make_miner(module) (None: no miner)."""
    ours = pml.CrossBatchMemory(make(pml), 8, memory_size=memory_size,
                                miner=make_miner(pml) if make_miner else None)
    theirs = losses.CrossBatchMemory(make(losses), 8, memory_size=memory_size,
                                     miner=make_miner(miners) if make_miner else None)
    return ours, theirs


def _step_both(ours, theirs, x, y, **kw):
    """One step of both memories on (x, y) with keywords kw: ((loss, grads) of ours,
    (loss, grads) of PML's); ours raises if it falls back to PML."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pml.PMLFallbackWarning)
        got = _loss_and_grads(lambda e, l, *_: ours(e, l, **kw), None, x, y)
    return got, _loss_and_grads(lambda e, l, *_: theirs(e, l, **kw), None, x, y)


@pytest.mark.parametrize("name,make,make_miner", BANKS, ids=[c[0] for c in BANKS])
def test_cross_batch_memory_equals_pml(name, make, make_miner):
    """Five batches of 12 through a memory of 32: filling, wrapping, the state after."""
    ours, theirs = _both_memories(make, make_miner, memory_size=32)
    for step in range(5):
        x, y = _batch(n=12, classes=4, seed=step)
        (loss, grads), (expected, expected_grads) = _step_both(ours, theirs, x, y)
        assert_close(loss, expected, torch.float64, f"{name} step {step} loss")
        assert_close(grads[0], expected_grads[0], torch.float64, f"{name} step {step} grad")
        assert ours.queue_idx == theirs.queue_idx
        assert ours.has_been_filled == theirs.has_been_filled
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)
    assert ours.has_been_filled


def _moco_batch(step, n=6):
    """PML's MoCo recipe: queries then keys, two views of n samples, labels unique per batch
    (offset by the step), the keys enqueued."""
    x, _ = _batch(n=2 * n, seed=10 + step)
    y = torch.arange(n).repeat(2) + n * step
    return x, y, torch.arange(2 * n) >= n


MASKED = BANKS + [("ntxent", lambda m: m.NTXentLoss(temperature=0.1), None)]


@pytest.mark.parametrize("name,make,make_miner", MASKED, ids=[c[0] for c in MASKED])
def test_cross_batch_memory_enqueue_mask_equals_pml(name, make, make_miner):
    """Keys enqueued, queries against the bank: five steps through a memory of 16 (wraps)."""
    ours, theirs = _both_memories(make, make_miner, memory_size=16)
    for step in range(5):
        x, y, mask = _moco_batch(step)
        if name != "ntxent":
            y = y % 3  # several positives a row in the bank
        (loss, grads), (expected, expected_grads) = _step_both(ours, theirs, x, y,
                                                               enqueue_mask=mask)
        assert_close(loss, expected, torch.float64, f"{name} step {step} loss")
        assert_close(grads[0], expected_grads[0], torch.float64, f"{name} step {step} grad")
        assert (ours.queue_idx, ours.has_been_filled) == (theirs.queue_idx,
                                                          theirs.has_been_filled)
    assert float(expected) != 0.0 and ours.has_been_filled


def test_cross_batch_memory_ntxent_two_views_in_the_bank():
    """NT-Xent with the batch enqueued: each label twice in the bank, its own slot dropped."""
    ours = pml.CrossBatchMemory(pml.NTXentLoss(0.1), 8, memory_size=20)
    theirs = losses.CrossBatchMemory(losses.NTXentLoss(0.1), 8, memory_size=20)
    for step in range(4):
        x, y, _ = _moco_batch(step)
        with warnings.catch_warnings():
            warnings.simplefilter("error", pml.PMLFallbackWarning)
            loss, grads = _loss_and_grads(lambda e, l, *_: ours(e, l), None, x, y)
        expected, expected_grads = _loss_and_grads(lambda e, l, *_: theirs(e, l), None, x, y)
        assert_close(loss, expected, torch.float64, f"step {step} loss")
        assert_close(grads[0], expected_grads[0], torch.float64, f"step {step} grad")


@pytest.mark.parametrize("case", ["labels_repeat", "enqueue_nothing", "indices_tuple",
                                  "foreign_loss"])
def test_cross_batch_memory_falls_back(case):
    make = {"foreign_loss": lambda m: m.CircleLoss()}.get(case, lambda m: m.NTXentLoss(0.1))
    ours = pml.CrossBatchMemory(make(pml.losses), 8, memory_size=32)
    theirs = losses.CrossBatchMemory(make(losses), 8, memory_size=32)
    x, y, mask = _moco_batch(0)
    kwargs, reason = {}, "labels|loss"
    if case == "labels_repeat":  # the same labels every batch: more than two of a label
        ours(x, y), theirs(x, y)
        reason = "several positives"
    elif case == "enqueue_nothing":
        kwargs, reason = dict(enqueue_mask=torch.zeros_like(mask)), "enqueue_mask"
    elif case == "indices_tuple":
        kwargs, reason = dict(indices_tuple=miners.MultiSimilarityMiner()(x, y)), "indices_tuple"
    else:
        reason = "CircleLoss"
    pml._WARNED.clear()
    with pytest.warns(pml.PMLFallbackWarning, match=reason):
        loss = ours(x, y, **kwargs)
    torch.testing.assert_close(loss, theirs(x, y, **kwargs))


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.labels = torch.arange(8).repeat_interleave(16)
        centres = torch.randn(8, 16, generator=g)
        self.x = centres[self.labels] + 0.8 * torch.randn(len(self.labels), 16, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], self.labels[i]


def _train(module, miner_module, steps=20):
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.SGD(trunk.parameters(), lr=0.05)
    seen = []
    loss = module.MultiSimilarityLoss()
    original = loss.forward

    def recorded(*args, **kwargs):
        value = original(*args, **kwargs)
        seen.append(value.item())
        return value

    loss.forward = recorded
    data = _Data()
    sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(1))
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": torch.nn.Identity()},
        optimizers={"trunk_optimizer": optimizer}, batch_size=32,
        loss_funcs={"metric_loss": loss},
        mining_funcs={"tuple_miner": miner_module.MultiSimilarityMiner(epsilon=0.1)},
        dataset=data, sampler=sampler, iterations_per_epoch=steps, dataloader_num_workers=0)
    trainer.train(num_epochs=1)
    return seen, trunk


def test_pml_trainer_loop_matches_pml():
    """PML's MetricLossOnly trainer, 20 steps, MultiSimilarityMiner + MultiSimilarityLoss:
    with fusedloss.pml's classes, the same loss curve and weights as with PML's."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pml.PMLFallbackWarning)
        ours, ours_trunk = _train(pml, pml)
    theirs, theirs_trunk = _train(losses, miners)
    assert len(ours) == len(theirs) == 20
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-5)
    assert ours[-1] < ours[0]
    for a, b in zip(ours_trunk.parameters(), theirs_trunk.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
