"""The pair losses (multi-similarity loss and miner, SupCon, InfoNCE, contrastive, batch-hard
triplet, CrossBatchMemory): every kernel backend against the fp64 reference oracle, and the
reference and the kernels against pytorch-metric-learning (PML) itself, forward and gradient."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners

import fusedloss
from fusedloss import _ops

from conftest import assert_close, device_backends



def _kernel_missing(backend):
    """Why `backend` cannot run the pair ops here ("no kernel: ..."), or None when it can."""
    if backend == "triton":
        if importlib.util.find_spec("fusedloss.triton_kernels.pairs") is None:
            return "no kernel: fusedloss.triton_kernels.pairs does not exist"
        return None
    missing = [op for op in ("pair_extrema", "pair_row_stats", "pair_row_stats_backward")
               if backend not in _ops._KERNELS.get(op, frozenset())]
    return f"no kernel: no {backend} kernel for {', '.join(missing)}" if missing else None


def kernel_backends():
    """(backend, device) of every kernel backend; a missing kernel is a skip that says so.
    The pair ops have no CUDA kernel by design (auto picks Triton on CUDA tensors)."""
    params = []
    for p in device_backends():
        backend, device = p.values
        if backend == "cuda":
            continue
        marks = list(p.marks)
        why = _kernel_missing(backend)
        if why:
            marks.append(pytest.mark.skip(reason=why))
        params.append(pytest.param(backend, device, id=p.id, marks=marks))
    return params


def all_backends():
    """The reference and every kernel backend: the ones checked against PML."""
    return [pytest.param("reference", "cpu", id="reference")] + kernel_backends()


# name -> (function, keywords, PML loss maker, PML miner maker or None)
LOSSES = {
    "ms": (fusedloss.multi_similarity_loss, {},
           lambda: losses.MultiSimilarityLoss(), lambda: miners.MultiSimilarityMiner()),
    "ms_no_mining": (fusedloss.multi_similarity_loss, dict(mining=False),
                     lambda: losses.MultiSimilarityLoss(), None),
    "supcon": (fusedloss.supcon_loss, {}, lambda: losses.SupConLoss(), None),
    "contrastive": (fusedloss.contrastive_loss, {}, lambda: losses.ContrastiveLoss(), None),
    "contrastive_cosine": (fusedloss.contrastive_loss, dict(distance="cosine"),
                           lambda: losses.ContrastiveLoss(
                               pos_margin=1, neg_margin=0, distance=distances.CosineSimilarity()),
                           None),
    "triplet": (fusedloss.batch_hard_triplet_loss, {}, lambda: losses.TripletMarginLoss(),
                lambda: miners.BatchHardMiner()),
    "triplet_cosine": (fusedloss.batch_hard_triplet_loss, dict(distance="cosine"),
                       lambda: losses.TripletMarginLoss(distance=distances.CosineSimilarity()),
                       lambda: miners.BatchHardMiner(distance=distances.CosineSimilarity())),
}
MEMORY_LOSSES = {"ms": "multi_similarity", "ms_no_mining": "multi_similarity",
                 "supcon": "supcon", "contrastive": "contrastive",
                 "contrastive_cosine": "contrastive", "triplet": "batch_hard_triplet",
                 "triplet_cosine": "batch_hard_triplet"}


def make_batch(n, m, d, dtype, device="cpu", classes=3, bank=False):
    """(x, labels, ref, ref_labels); ref is None without a bank."""
    x = torch.randn(n, d, dtype=torch.float64).to(dtype).to(device)
    labels = torch.randint(0, classes, (n,), device=device)
    if not bank:
        return x, labels, None, None
    ref = torch.randn(m, d, dtype=torch.float64).to(dtype).to(device)
    return x, labels, ref, torch.randint(0, classes, (m,), device=device)


def grads_of(loss, tensors):
    """d loss / d each tensor (zeros where the loss does not depend on it)."""
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in tensors]
    found = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, found)]


def leaves(x, ref):
    x = x.detach().clone().requires_grad_()
    return x, (None if ref is None else ref.detach().clone().requires_grad_())


def run_ours(name, x, labels, ref, ref_labels, backend, **extra):
    fn, kw, _, _ = LOSSES[name]
    x, ref = leaves(x, ref)
    bank = () if ref is None else (ref, ref_labels)
    loss = fn(x, labels, *bank, backend=backend, **kw, **extra)
    return loss.detach(), grads_of(loss, [x] + ([ref] if ref is not None else []))


def run_pml(name, x, labels, ref, ref_labels):
    _, _, make_loss, make_miner = LOSSES[name]
    x, ref = leaves(x, ref)
    bank = {} if ref is None else dict(ref_emb=ref, ref_labels=ref_labels)
    mined = None
    if make_miner is not None:
        mined = make_miner()(x, labels, *(() if ref is None else (ref, ref_labels)))
    loss = make_loss()(x, labels, mined, **bank)
    return loss.detach(), grads_of(loss, [x] + ([ref] if ref is not None else []))


def assert_same(actual, expected, dtype, what):
    assert_close(actual[0], expected[0], dtype, f"{what}: loss")
    for k, (a, e) in enumerate(zip(actual[1], expected[1])):
        assert_close(a, e, dtype, f"{what}: grad {('x', 'ref')[k]}")


# ---- every kernel backend against the reference ----------------------------------------

@pytest.mark.parametrize("backend, device", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bank", [False, True], ids=["batch", "bank"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_backend_matches_reference(name, bank, dtype, backend, device):
    x, labels, ref, ref_labels = make_batch(11, 19, 6, dtype, device, bank=bank)
    got = run_ours(name, x, labels, ref, ref_labels, backend)
    cpu = lambda t: None if t is None else t.cpu().double()  # noqa: E731
    want = run_ours(name, cpu(x), labels.cpu(), cpu(ref), None if ref_labels is None else
                    ref_labels.cpu(), "reference")
    assert_same(got, want, dtype, f"{name} {backend}")


@pytest.mark.parametrize("backend, device", kernel_backends())
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_backend_matches_reference(symmetric, backend, device):
    q = torch.randn(9, 5, device=device)
    k = torch.randn(9, 5, device=device)
    got = run_info_nce(q, k, backend, symmetric=symmetric)
    want = run_info_nce(q.cpu().double(), k.cpu().double(), "reference", symmetric=symmetric)
    assert_same(got, want, torch.float32, "info_nce")


@pytest.mark.parametrize("backend, device", kernel_backends())
@pytest.mark.parametrize("name", ["ms", "supcon", "contrastive", "triplet"])
def test_non_contiguous_inputs(name, backend, device):
    x = torch.randn(10, 12, dtype=torch.float64, device=device)[:, ::2]
    ref = torch.randn(12, 6, dtype=torch.float64, device=device)[::2]
    labels = torch.randint(0, 3, (20,), device=device)[::2]
    ref_labels = torch.randint(0, 3, (6,), device=device)
    got = run_ours(name, x, labels, ref, ref_labels, backend)
    want = run_ours(name, x.contiguous().cpu(), labels.cpu(), ref.contiguous().cpu(),
                    ref_labels.cpu(), "reference")
    assert_same(got, want, torch.float64, f"{name} {backend} non-contiguous")


@pytest.mark.parametrize("backend, device", kernel_backends())
@pytest.mark.parametrize("name", ["ms", "ms_no_mining", "supcon", "contrastive"])
def test_gradcheck(name, backend, device):
    fn, kw, _, _ = LOSSES[name]
    x = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 0], device=device)
    assert torch.autograd.gradcheck(lambda t: fn(t, labels, backend=backend, **kw), (x,))


@pytest.mark.parametrize("backend, device", all_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mining", [True, False])
def test_half_precision_large_beta_is_finite(mining, dtype, backend, device):
    x = (torch.randn(12, 8, device=device) * 30).to(dtype)
    labels = torch.randint(0, 3, (12,), device=device)
    got = run_ours("ms" if mining else "ms_no_mining", x, labels, None, None, backend, beta=50.0)
    assert got[0].dtype == dtype
    assert torch.isfinite(got[0]) and torch.isfinite(got[1][0]).all()
    want = run_ours("ms" if mining else "ms_no_mining", x.cpu(), labels.cpu(), None, None,
                    "reference", beta=50.0)
    assert_same(got, want, dtype, f"{dtype} beta=50")


# ---- against PML ----------------------------------------------------------------------

@pytest.mark.parametrize("backend, device", all_backends())
@pytest.mark.parametrize("bank", [False, True], ids=["batch", "bank"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_matches_pml(name, bank, backend, device):
    x, labels, ref, ref_labels = make_batch(12, 17, 5, torch.float64, bank=bank)
    expected = run_pml(name, x, labels, ref, ref_labels)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = run_ours(name, to(x), to(labels), to(ref), to(ref_labels), backend)
    assert expected[0] > 0  # a batch where the loss is not trivially zero
    assert_same(got, expected, torch.float64, f"{name} vs PML")


@pytest.mark.parametrize("backend, device", all_backends())
@pytest.mark.parametrize("bank", [False, True], ids=["batch", "bank"])
def test_miner_matches_pml(bank, backend, device):
    x, labels, ref, ref_labels = make_batch(14, 23, 5, torch.float64, bank=bank)
    extra = () if ref is None else (ref, ref_labels)
    expected = miners.MultiSimilarityMiner(epsilon=0.1)(x, labels, *extra)
    got = fusedloss.multi_similarity_miner(
        x.to(device), labels.to(device), *(t.to(device) for t in extra), epsilon=0.1,
        backend=backend)
    assert all(t.dtype == torch.long for t in got)
    for k, sign in ((0, "positive"), (2, "negative")):
        want = sorted(zip(expected[k].tolist(), expected[k + 1].tolist()))
        have = sorted(zip(got[k].tolist(), got[k + 1].tolist()))
        assert want, f"no {sign} pairs mined: a trivial test"
        assert have == want, f"{sign} pairs differ from PML's"


def run_info_nce(q, k, backend, **kw):
    q, k = leaves(q, k)
    loss = fusedloss.info_nce_loss(q, k, backend=backend, **kw)
    return loss.detach(), grads_of(loss, [q, k])


@pytest.mark.parametrize("backend, device", all_backends())
@pytest.mark.parametrize("n", [1, 7])
def test_info_nce_matches_pml_and_cross_entropy(n, backend, device):
    q = torch.randn(n, 5, dtype=torch.float64)
    k = torch.randn(n, 5, dtype=torch.float64)
    qq, kk = leaves(q, k)
    ntxent = losses.NTXentLoss(temperature=0.07)(qq, torch.arange(n), ref_emb=kk,
                                                   ref_labels=torch.arange(n))
    expected = ntxent.detach(), grads_of(ntxent, [qq, kk])
    got = run_info_nce(q.to(device), k.to(device), backend, temperature=0.07)
    assert_same(got, expected, torch.float64, "info_nce vs NTXentLoss")

    qq, kk = leaves(q, k)
    logits = F.normalize(qq, dim=1) @ F.normalize(kk, dim=1).T / 0.07
    target = torch.arange(n)
    both = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    expected = both.detach(), grads_of(both, [qq, kk])
    got = run_info_nce(q.to(device), k.to(device), backend, temperature=0.07, symmetric=True)
    assert_same(got, expected, torch.float64, "symmetric info_nce vs cross_entropy")


def edge_batch(case):
    """(x, labels, ref, ref_labels) of the named edge case, fp64."""
    eye = torch.eye(4, dtype=torch.float64)
    if case == "one_per_class":
        return torch.randn(6, 4, dtype=torch.float64), torch.arange(6), None, None
    if case == "one_class":
        return torch.randn(6, 4, dtype=torch.float64), torch.zeros(6, dtype=torch.long), None, None
    if case == "single":
        return torch.randn(1, 4, dtype=torch.float64), torch.tensor([3]), None, None
    if case == "duplicates":  # S exactly 1 within a class, exactly 0 across
        return eye[[0, 0, 1, 1, 2, 2]] * 3, torch.tensor([0, 0, 1, 1, 2, 2]), None, None
    if case == "duplicates_across_classes":  # S exactly 1 for negatives too
        return eye[[0, 0, 0, 1, 1, 1]], torch.tensor([0, 1, 0, 1, 0, 1]), None, None
    if case == "one_pair_of_each":  # one query, a bank of one positive and one negative
        return (torch.randn(1, 4, dtype=torch.float64), torch.tensor([1]),
                torch.randn(2, 4, dtype=torch.float64), torch.tensor([1, 2]))
    raise ValueError(case)


EDGE_CASES = ["one_per_class", "one_class", "single", "duplicates", "duplicates_across_classes",
              "one_pair_of_each"]


@pytest.mark.parametrize("backend, device", all_backends())
@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_edge_cases_match_pml(name, case, backend, device):
    x, labels, ref, ref_labels = edge_batch(case)
    expected = run_pml(name, x, labels, ref, ref_labels)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = run_ours(name, to(x), to(labels), to(ref), to(ref_labels), backend)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1])
    assert_same(got, expected, torch.float64, f"{name} on {case} vs PML")


@pytest.mark.parametrize("backend, device", all_backends())
@pytest.mark.parametrize("name", ["ms", "supcon", "triplet", "triplet_cosine"])
def test_no_positive_pairs_gives_zero_with_zero_gradient(name, backend, device):
    x = torch.randn(5, 4, device=device)
    loss, grads = run_ours(name, x, torch.arange(5, device=device), None, None, backend)
    assert loss.item() == 0.0
    assert torch.equal(grads[0], torch.zeros_like(x))


# ---- CrossBatchMemory ---------------------------------------------------------------------------

def pml_memory(name, dim, size):
    _, kw, make_loss, make_miner = LOSSES[name]
    miner = make_miner() if make_miner is not None and kw.get("mining", True) else None
    return losses.CrossBatchMemory(make_loss(), dim, memory_size=size, miner=miner)


@pytest.mark.parametrize("backend, device", all_backends())
@pytest.mark.parametrize("name", list(LOSSES))
def test_cross_batch_memory_matches_pml(name, backend, device):
    dim, size, batch = 5, 20, 7  # fills after 3 steps, then wraps
    ours = fusedloss.nn.CrossBatchMemory(dim, size, MEMORY_LOSSES[name], backend=backend,
                                         dtype=torch.float64, device=device, **LOSSES[name][1])
    theirs = pml_memory(name, dim, size)
    for step in range(6):
        x = torch.randn(batch, dim, dtype=torch.float64)
        labels = torch.randint(0, 3, (batch,))
        xx, _ = leaves(x, None)
        loss = theirs(xx, labels)
        expected = loss.detach(), grads_of(loss, [xx])
        xx, _ = leaves(x.to(device), None)
        mine = ours(xx, labels.to(device))
        got = mine.detach(), grads_of(mine, [xx])
        assert_same(got, expected, torch.float64, f"{name} memory, step {step}")
    assert ours.has_been_filled and ours.queue_idx == theirs.queue_idx
    assert torch.equal(ours.label_memory.cpu(), theirs.label_memory)


def test_cross_batch_memory_state_and_errors():
    memory = fusedloss.nn.CrossBatchMemory(4, 8, "supcon", backend="reference")
    memory(torch.randn(3, 4), torch.tensor([0, 1, 0]))
    copy = fusedloss.nn.CrossBatchMemory(4, 8, "supcon", backend="reference")
    copy.load_state_dict(memory.state_dict())
    assert copy.queue_idx == 3 and torch.equal(copy.embedding_memory, memory.embedding_memory)
    with pytest.raises(ValueError, match="does not fit in a memory of 8"):
        memory(torch.randn(9, 4), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown loss 'arcface'"):
        fusedloss.nn.CrossBatchMemory(4, 8, "arcface")
    with pytest.raises(TypeError, match=r"supcon takes no keyword\(s\) \['alpha'\]"):
        fusedloss.nn.CrossBatchMemory(4, 8, "supcon", alpha=2.0)
    with pytest.raises(ValueError, match=r"embeddings must have shape \[B, 4\]"):
        memory(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


# ---- bad input --------------------------------------------------------------------------------

X, Y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
R, RY = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
BAD_INPUTS = {
    "mismatched_lengths": (lambda: fusedloss.multi_similarity_loss(X, Y[:5]), ValueError,
                           "labels has 5 entries but embeddings has 6 rows"),
    "mismatched_ref_lengths": (lambda: fusedloss.supcon_loss(X, Y, R, RY[:4]), ValueError,
                               "ref_labels has 4 entries but ref_embeddings has 5 rows"),
    "embeddings_rank": (lambda: fusedloss.contrastive_loss(X[0], Y), ValueError,
                        r"embeddings must be 2-D, got shape \(4,\)"),
    "labels_rank": (lambda: fusedloss.multi_similarity_loss(X, Y[:, None]), ValueError,
                    "labels must be 1-D"),
    "float_labels": (lambda: fusedloss.batch_hard_triplet_loss(X, Y.float()), TypeError,
                     "labels must hold integer class labels, got torch.float32"),
    "float_ref_labels": (lambda: fusedloss.multi_similarity_loss(X, Y, R, RY.double()), TypeError,
                         "ref_labels must hold integer class labels"),
    "ref_without_labels": (lambda: fusedloss.multi_similarity_loss(X, Y, R), ValueError,
                           "a reference set needs its labels"),
    "ref_labels_without_ref": (lambda: fusedloss.supcon_loss(X, Y, ref_labels=RY), ValueError,
                               "ref_embeddings and ref_labels go together"),
    "ref_dim": (lambda: fusedloss.multi_similarity_loss(X, Y, R[:, :3], RY), ValueError,
                "must share D"),
    "ref_dtype": (lambda: fusedloss.multi_similarity_loss(X, Y, R.double(), RY), TypeError,
                  "must share a dtype"),
    "query_key_shapes": (lambda: fusedloss.info_nce_loss(X, R), ValueError,
                         r"query and key must have the same shape \[N, D\], "
                         r"got \(6, 4\) and \(5, 4\)"),
    "query_rank": (lambda: fusedloss.info_nce_loss(X[None], X[None]), ValueError,
                   "query must be 2-D"),
    "temperature": (lambda: fusedloss.supcon_loss(X, Y, temperature=0.0), ValueError,
                    "temperature must be > 0, got 0.0"),
    "info_nce_temperature": (lambda: fusedloss.info_nce_loss(X, X, temperature=-1.0), ValueError,
                             "temperature must be > 0"),
    "alpha": (lambda: fusedloss.multi_similarity_loss(X, Y, alpha=0.0), ValueError,
              "alpha must be > 0"),
    "beta": (lambda: fusedloss.multi_similarity_loss(X, Y, beta=-50.0), ValueError,
             "beta must be > 0"),
    "distance": (lambda: fusedloss.contrastive_loss(X, Y, distance="manhattan"), ValueError,
                 "unknown distance 'manhattan'"),
    "backend": (lambda: fusedloss.supcon_loss(X, Y, backend="gpu"), ValueError,
                "unknown backend 'gpu'"),
    "integer_embeddings": (lambda: fusedloss.multi_similarity_miner(Y[:, None], Y), TypeError,
                           "embeddings must be float16, bfloat16, float32 or float64"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call()


# ---- convergence --------------------------------------------------------------------------------

def train_embedding_net(loss_fn, steps=50):
    """Losses of a small embedding net trained with SGD on fixed clustered data."""
    gen = torch.Generator().manual_seed(7)
    centres = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    labels = torch.arange(16) % 4
    data = centres[labels] + 0.8 * torch.randn(16, 8, generator=gen, dtype=torch.float64)
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    net = net.double()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(net(data), labels)
        loss.backward()
        opt.step()
        history.append(loss.item())
    return torch.tensor(history, dtype=torch.float64)


@pytest.mark.parametrize("backend, device", all_backends())
def test_training_matches_pml(backend, device):
    miner, criterion = miners.MultiSimilarityMiner(), losses.MultiSimilarityLoss()
    theirs = train_embedding_net(lambda e, y: criterion(e, y, miner(e, y)))
    ours = train_embedding_net(
        lambda e, y: fusedloss.multi_similarity_loss(e.to(device), y.to(device), backend=backend))
    assert theirs[-1] < 0.5 * theirs[0], "the net did not learn: a trivial comparison"
    assert_close(ours, theirs, torch.float64, "losses over 50 steps")


# ---- torch.compile ------------------------------------------------------------------------------

@pytest.mark.skipif(_kernel_missing("cpu") is not None, reason=str(_kernel_missing("cpu")))
@pytest.mark.parametrize("mining", [True, False])
def test_compiled_multi_similarity_matches_eager(mining):
    x = torch.randn(12, 6)
    labels = torch.randint(0, 3, (12,))
    eager = run_ours("ms" if mining else "ms_no_mining", x, labels, None, None, "cpu")
    fn = torch.compile(fusedloss.multi_similarity_loss, fullgraph=True)
    leaf, _ = leaves(x, None)
    loss = fn(leaf, labels, mining=mining, backend="cpu")
    assert_same((loss.detach(), grads_of(loss, [leaf])), eager, torch.float32, "compiled")
