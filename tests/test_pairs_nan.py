"""NaN in the pair losses: a NaN in an embedding that takes part in the loss gives a NaN loss,
on every backend as on the reference (issue 12), and the gradients are NaN where the
reference's are.

The rules behind it (python/fusedloss/pairs.py, csrc/include/fusedloss/pairs.h):
- pair_extrema: NaN is smaller than every key, as in torch.min. A NaN score wins with its
  first column, so a row with a NaN candidate has a NaN extremum, and a row whose candidates
  are all NaN ends with NaN and a real column, never with +-inf and -1.
- The euclidean distance max(d^2, 0) and the contrastive relu keep NaN, and the distance-1
  gradient coefficient a = w / d is NaN at a NaN d (0 only at d = 0).
- The AvgNonZero means (supcon, batch-hard triplet) count NaN entries, where PML's `> 0`
  drops them; a multi-similarity row with a NaN threshold (the miner's rule undecided) has a
  NaN loss.

Inputs: 20 rows, so that the Triton kernels (tiles of 16 under the interpreter) see two row
and column blocks, and the CPU op, with block_size 4, five (the symmetric path transposes
tiles when the batch is its own reference)."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.reference import pairs as ref_ops
from fusedloss.specs import pairs as pair_specs

from conftest import assert_close, device_backends, loss_and_grads, oracle

# The interpreter's NaN-dropping tl.min warns on an all-NaN tile before nan_min puts the NaN back.
pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")

N, D, M, CLASSES = 20, 8, 24, 3
NAN = float("nan")


def pair_backends():
    """(backend, device) params of device_backends() that have the pair kernels."""
    kernels = {b for spec in pair_specs.SPECS for b in spec.backends}
    return [p for p in device_backends() if p.values[0] in kernels]


def with_nan(x, where):
    """A copy of x with NaN at `where`: one entry of row 5, the whole row 13, whole rows 2 and
    17 (one in each Triton block: the first NaN column must win across blocks), every row."""
    x = x.clone()
    if where == "entry":
        x[5, 3] = NAN
    elif where == "row":
        x[13] = NAN
    elif where == "two rows":
        x[2] = NAN
        x[17] = NAN
    elif where == "all rows":
        x[:] = NAN
    else:
        raise ValueError(where)
    return x


NAN_PLACES = ["entry", "row", "two rows", "all rows"]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    labels = torch.randperm(N, generator=g) % CLASSES
    bank = torch.randn(M, D, generator=g)
    bank_labels = torch.randperm(M, generator=g) % CLASSES
    return x, labels, bank, bank_labels


# ---- the losses ------------------------------------------------------------------------------

# name: (function, options). Each is called as function(x, labels, [ref, ref_labels], ...);
# info_nce_loss takes the reference rows (N of them) as its keys instead.
LOSSES = {
    "multi_similarity": (fusedloss.multi_similarity_loss, {}),
    "multi_similarity_no_mining": (fusedloss.multi_similarity_loss, dict(mining=False)),
    "supcon": (fusedloss.supcon_loss, {}),
    "info_nce": (fusedloss.info_nce_loss, {}),
    "info_nce_symmetric": (fusedloss.info_nce_loss, dict(symmetric=True)),
    "contrastive_euclidean": (fusedloss.contrastive_loss, dict(distance="euclidean")),
    "contrastive_cosine": (fusedloss.contrastive_loss, dict(distance="cosine")),
    "batch_hard_triplet_euclidean": (fusedloss.batch_hard_triplet_loss,
                                     dict(distance="euclidean")),
    "batch_hard_triplet_cosine": (fusedloss.batch_hard_triplet_loss, dict(distance="cosine")),
}


def loss_call(name, **extra):
    """call(backend, x, labels, ref, ref_labels) of loss `name` (ref None: the batch itself)."""
    function, options = LOSSES[name]

    def call(backend, x, labels, ref, ref_labels):
        kwargs = dict(options, backend=backend, **extra)
        if function is fusedloss.info_nce_loss:
            return function(x, ref, **kwargs)
        if ref is None:
            return function(x, labels, **kwargs)
        return function(x, labels, ref, ref_labels, **kwargs)

    return call


def inputs_for(name, x, labels, bank, bank_labels, with_bank):
    """(x, labels, ref, ref_labels) for loss `name`: info_nce's keys are N finite rows (or
    the bank's first N, which may hold the NaN)."""
    if LOSSES[name][0] is fusedloss.info_nce_loss:
        return x, None, bank[:N], None
    if not with_bank:
        return x, labels, None, None
    return x, labels, bank, bank_labels


def assert_nan_loss_as_reference(call, backend, device, inputs):
    """The loss of `backend` is NaN, as the fp64 reference's, and its gradients agree with the
    reference's: NaN at the same entries, within fp32 tolerance elsewhere."""
    on_device = [t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs]
    got = loss_and_grads(call, backend, on_device)
    want = oracle(call, inputs)
    assert want[0].isnan(), f"reference loss {want[0]} is not NaN"
    assert got[0].isnan(), f"{backend} loss {got[0]} is not NaN"
    assert got[0].dtype == torch.float32
    grads = [g for g in got[1:] if g is not None]
    assert any(bool(g.isnan().any()) for g in grads), "a NaN loss with no NaN gradient"
    for k, (g, w) in enumerate(zip(got[1:], want[1:])):
        if w is None:
            assert g is None
            continue
        assert torch.equal(g.cpu().isnan(), w.isnan()), f"gradient {k}: NaN entries differ"
        assert_close(g.cpu(), w, torch.float32, f"gradient {k}")


@pytest.mark.parametrize("backend, device", pair_backends())
@pytest.mark.parametrize("where", NAN_PLACES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_embedding_gives_nan_loss(name, where, backend, device):
    x, labels, bank, bank_labels = batch()
    inputs = inputs_for(name, with_nan(x, where), labels, bank, bank_labels, with_bank=False)
    assert_nan_loss_as_reference(loss_call(name), backend, device, inputs)


@pytest.mark.parametrize("backend, device", pair_backends())
@pytest.mark.parametrize("side", ["query", "reference"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_against_a_reference_set(name, side, backend, device):
    """A NaN query row against a finite reference set (its other rows stay finite, and so
    do their gradients), or a NaN reference row that every query meets. With mining, the NaN
    query row's thresholds are NaN and every comparison with them false: the multi-similarity
    loss must be NaN all the same."""
    x, labels, bank, bank_labels = batch(1)
    if side == "query":
        x = with_nan(x, "row")
    else:
        bank = with_nan(bank, "row")
    inputs = inputs_for(name, x, labels, bank, bank_labels, with_bank=True)
    assert_nan_loss_as_reference(loss_call(name), backend, device, inputs)


@pytest.mark.parametrize("backend, device", pair_backends())
@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_without_normalization(name, backend, device):
    """One NaN entry, not spread over its row by F.normalize."""
    x, labels, bank, bank_labels = batch(2)
    inputs = inputs_for(name, with_nan(x, "entry"), labels, bank, bank_labels, with_bank=False)
    call = loss_call(name, normalize=False)
    assert_nan_loss_as_reference(call, backend, device, inputs)


@pytest.mark.parametrize("backend, device",
                         [pytest.param("reference", "cpu", id="reference")] + pair_backends())
def test_nan_distance_has_nan_gradient(backend, device):
    """Distance 1: a NaN distance gets the gradient coefficient a = w / d = NaN, not the 0 of
    d = 0, even where the pair's weight w is 0 (relu' of NaN), so every row that meets the
    NaN row at a NaN distance gets a NaN gradient in every entry, not only in the NaN entry's
    column (which 0 * NaN in the products would give)."""
    x, labels, _, _ = batch(3)
    x = with_nan(x, "entry").to(device).requires_grad_()
    loss = fusedloss.contrastive_loss(x, labels.to(device), normalize=False, backend=backend)
    loss.backward()
    assert loss.isnan()
    assert x.grad.isnan().all()


# ---- pair_extrema and the miner ----------------------------------------------------------------

def extrema_of(backend, x, labels, ref, ref_labels, distance, self_offset, block_size):
    if backend == "cpu":
        return torch.ops.fusedloss.pair_extrema(x, labels, ref, ref_labels, distance,
                                                self_offset, block_size)
    from fusedloss.triton_kernels import pairs as triton_pairs
    return triton_pairs.pair_extrema(x, labels, ref, ref_labels, distance, self_offset,
                                     block_size)


def first_nan_columns(scores, mask):
    """Per row, the first column of `mask` whose score is NaN, or -1."""
    hit = mask & scores.isnan()
    first = hit.to(torch.uint8).argmax(1)
    return torch.where(hit.any(1), first, -1)


@pytest.mark.parametrize("backend, device", pair_backends())
@pytest.mark.parametrize("block_size", [0, 4])
@pytest.mark.parametrize("own", [True, False], ids=["own reference", "reference set"])
@pytest.mark.parametrize("distance", [0, 1])
@pytest.mark.parametrize("where", NAN_PLACES)
def test_extrema_nan_values_and_indices(where, distance, own, block_size, backend, device):
    """Values (NaN included) and first indices as the reference's; a row with a NaN candidate
    has a NaN extremum at its first NaN column of that sign, and a row of NaN scores picks
    real columns."""
    x, labels, bank, bank_labels = batch(4)
    x = with_nan(x, where)
    if own:
        ref, ref_labels, offset = x, labels, 0
    else:
        ref, ref_labels, offset = with_nan(bank, "entry"), bank_labels, -1
    values, indices = extrema_of(backend, x.to(device), labels.to(device), ref.to(device),
                                 ref_labels.to(device), distance, offset, block_size)
    want_values, want_indices = ref_ops.pair_extrema(x.double(), labels, ref.double(),
                                                     ref_labels, distance, offset)
    assert torch.equal(indices.cpu(), want_indices), (indices, want_indices)
    assert torch.equal(values.cpu().isnan(), want_values.isnan())
    assert_close(values.cpu(), want_values, torch.float32, "extrema values")
    # The rule itself, on the reference: NaN candidates win with their first column.
    scores = ref_ops.scores(x.double(), ref.double(), distance)
    pos, neg = ref_ops.pair_masks(labels, ref_labels, offset)
    for k, mask in enumerate((pos, neg)):
        first_nan = first_nan_columns(scores, mask)
        has_nan = first_nan >= 0
        assert want_values[has_nan, k].isnan().all()
        assert torch.equal(want_indices[has_nan, k], first_nan[has_nan])
        assert (want_indices[mask.any(1), k] >= 0).all()


@pytest.mark.parametrize("backend, device", pair_backends())
@pytest.mark.parametrize("where", NAN_PLACES)
def test_miner_nan_as_reference(where, backend, device):
    """The multi-similarity miner takes its thresholds from pair_extrema: NaN ones (every row
    meets the NaN row, after F.normalize) keep no pair, on every backend as on the reference;
    the loss built on them is NaN (test_nan_embedding_gives_nan_loss)."""
    x, labels, _, _ = batch(5)
    x = with_nan(x, where)
    got = fusedloss.multi_similarity_miner(x.to(device), labels.to(device), backend=backend)
    want = fusedloss.multi_similarity_miner(x.double(), labels, backend="reference")
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    unit = F.normalize(x.double(), dim=1)
    values, _ = ref_ops.pair_extrema(unit, labels, unit, labels, 0, 0)
    assert values.isnan().any(1).all()
