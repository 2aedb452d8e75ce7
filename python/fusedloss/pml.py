"""Drop-ins for pytorch-metric-learning (PML): change the import, keep the script.

    from fusedloss.pml import losses, miners  # was: from pytorch_metric_learning import ...

``fusedloss.pml.losses`` and ``fusedloss.pml.miners`` hold every public name of PML's
modules of the same name, with the classes below in place of PML's (any other loss or miner
is PML's own). Each class subclasses PML's own class of the same name (so PML's trainers,
wrappers and ``isinstance`` checks take it), keeps its constructor and call signature, and adds one
keyword-only argument, ``backend="auto"`` (that of the fusedloss functions). A call runs the
tiled kernels of fusedloss.pairs when PML's result is exactly one of their losses:

    MultiSimilarityLoss()(emb, y)                       multi_similarity_loss(mining=False)
    MultiSimilarityLoss()(emb, y, MultiSimilarityMiner(eps)(emb, y))
                                                        multi_similarity_loss(epsilon=eps)
    SupConLoss(t)(emb, y)                               supcon_loss(temperature=t)
    NTXentLoss(t)(emb, y), each row with at most one positive (SimCLR's two views a label)
                                                        SupCon's rows, averaged over positive pairs
    ContrastiveLoss(pm, nm)(emb, y)                     contrastive_loss(pos_margin=pm,
                                                                         neg_margin=nm)
    TripletMarginLoss(m)(emb, y, BatchHardMiner()(emb, y))
                                                        batch_hard_triplet_loss(margin=m)
    CrossBatchMemory(loss, d, size, miner)(emb, y[, enqueue_mask=m])
                                                        the loss of the queries against the bank

with ``ref_emb`` / ``ref_labels`` as the functions' reference set, PML's default distance
(CosineSimilarity; LpDistance(p=2) for the contrastive and triplet losses), or
DotProductSimilarity (``normalize=False``), and PML's default reducer. The miners run the
fused extrema kernel and return PML's pairs (the same sets; ours in row-major order, PML's
sorted by score within a row) as a tuple that remembers what it was mined from, so that the
loss given it can run the fused miner + loss pipeline instead of PML's dense one.

Everything else (another distance or reducer, an embedding regulariser, ``collect_stats``,
an ``indices_tuple`` not mined here from the same tensors, ``TripletMarginLoss`` without
``BatchHardMiner``, ``swap`` or ``smooth_loss``, NT-Xent with several positives per row, an
``enqueue_mask`` that enqueues nothing) runs PML's own code, with a
:class:`PMLFallbackWarning` once per class and reason: a call never returns a number PML
would not. Checking NT-Xent's labels reads one integer on the host.
"""
import sys
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

try:
    from pytorch_metric_learning import losses as _pml_losses
    from pytorch_metric_learning import miners as _pml_miners
    from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
    from pytorch_metric_learning.reducers import MultipleReducers
except ImportError as error:  # pragma: no cover - the extra is installed with the tests
    raise ImportError("fusedloss.pml needs pytorch-metric-learning: pip install "
                      "'fusedloss[pml]' (or pip install pytorch-metric-learning)") from error

from . import pairs as _pairs
from .reference.pairs import EUCLIDEAN, SIMILARITY, SUPCON

__all__ = ["BatchHardMiner", "ContrastiveLoss", "CrossBatchMemory", "MultiSimilarityLoss",
           "MultiSimilarityMiner", "NTXentLoss", "PMLFallbackWarning", "SupConLoss",
           "TripletMarginLoss", "losses", "miners"]


class PMLFallbackWarning(UserWarning):
    """A fusedloss.pml call that runs PML's own implementation; the message says why."""


_WARNED = set()


def _fall_back(owner, reason: str) -> None:
    key = (type(owner).__name__, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"fusedloss.pml.{key[0]}: {reason}; running pytorch-metric-learning's own "
                      "implementation (this warning is shown once per reason)",
                      PMLFallbackWarning, stacklevel=4)


# ---- what a call is: distance, reducer, mined indices ----------------------------------------

Plan = Tuple[str, dict]  # (a key of fusedloss.pairs.MEMORY_BANK_LOSSES or "ntxent", its options)


def _distance(distance) -> Optional[Tuple[str, bool]]:
    """(our `distance` option, `normalize`) of a PML distance the kernels compute, else None:
    CosineSimilarity and DotProductSimilarity are "cosine" (S = x . r, on normalised rows or
    not), LpDistance(p=2) is "euclidean"; all with power 1 and PML's L2 normalisation."""
    if distance.power != 1 or distance.p != 2:
        return None
    if type(distance) in (CosineSimilarity, DotProductSimilarity):
        return "cosine", bool(distance.normalize_embeddings)
    if type(distance) is LpDistance:
        return "euclidean", bool(distance.normalize_embeddings)
    return None


def _default_reducer(loss) -> bool:
    default = type(loss.get_default_reducer())
    reducer = loss.reducer
    if isinstance(reducer, MultipleReducers):
        return all(type(r) is default for r in reducer.reducers.values())
    return type(reducer) is default


def _integer_labels(labels) -> bool:
    return (torch.is_tensor(labels) and not labels.dtype.is_floating_point
            and not labels.dtype.is_complex and labels.dtype != torch.bool)


def _ref_reason(embeddings, labels, ref_emb, ref_labels) -> Optional[str]:
    """PML pairs a batch with itself (no self pairs) when ref_emb is None, and with a reference
    set (every pair) otherwise; a reference set that is the batch's own tensors is neither."""
    if ref_emb is None and ref_labels is None:
        return None
    if ref_emb is None or ref_labels is None:
        return "ref_emb without ref_labels (or the reverse)"
    if ref_emb is embeddings or ref_labels is labels:
        return "ref_emb / ref_labels that are the batch's own tensors"
    if not _integer_labels(ref_labels):
        return "ref_labels that are not integer class labels"
    return None


@dataclass(frozen=True)
class _Mining:
    """What one of our miners computes: its kind ("multi_similarity" or "batch_hard"), our
    distance and normalize, and its epsilon (multi-similarity)."""

    kind: str
    distance: Tuple[str, bool]
    epsilon: float = 0.0


class MinedTuple(tuple):
    """The indices a fusedloss.pml miner returns (a plain tuple to PML: ``(a1, p, a2, n)`` or
    ``(a, p, n)``), remembering (weakly) the tensors it was mined from, so that a loss given
    it for the same tensors runs the fused pipeline."""

    def __new__(cls, indices, mining: Optional[_Mining] = None, *tensors):
        self = super().__new__(cls, indices)
        self.mining = mining
        self._sources = tuple(None if t is None else weakref.ref(t) for t in tensors)
        return self

    def mined_from(self, *tensors) -> bool:
        return self.mining is not None and len(tensors) == len(self._sources) and all(
            (t is None and s is None) or (s is not None and s() is t)
            for t, s in zip(tensors, self._sources))


def _mining_of(indices_tuple, embeddings, labels, ref_emb, ref_labels) -> Union[None, str, _Mining]:
    """None (no indices), our miner's record, or why the indices are not ours."""
    if indices_tuple is None:
        return None
    if isinstance(indices_tuple, MinedTuple) and indices_tuple.mined_from(
            embeddings, labels, ref_emb, ref_labels):
        return indices_tuple.mining
    return "an indices_tuple not mined by a fusedloss.pml miner from the same tensors"


# ---- the losses --------------------------------------------------------------------------------

class _FusedLoss:
    """The part every drop-in loss shares: the checks common to all fused calls, then the
    loss's own `_plan`, then either the fused function or PML's forward."""

    DISTANCES = ("cosine",)  # our distances that the loss accepts

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def _common_reason(self, labels) -> Optional[str]:
        if self.embedding_regularizer is not None:
            return "an embedding_regularizer"
        if not _default_reducer(self):
            return f"reducer {type(self.reducer).__name__} (not the loss's default)"
        if self.collect_stats:
            return "collect_stats=True (PML's statistics are recorded by PML's code)"
        if not _integer_labels(labels):
            return "labels that are not an integer tensor"
        distance = _distance(self.distance)
        if distance is None or distance[0] not in self.DISTANCES:
            return f"distance {type(self.distance).__name__}(p={self.distance.p}, " \
                   f"power={self.distance.power})"
        return None

    def plan(self, labels, mining: Union[None, str, _Mining], ref_labels=None,
             ref_holds_batch: bool = False) -> Union[str, Plan]:
        """(loss, options) of the fused call, or the reason to run PML's code."""
        reason = self._common_reason(labels)
        if reason is None and isinstance(mining, str):
            reason = mining
        if reason is not None:
            return reason
        distance, normalize = _distance(self.distance)
        return self._plan(labels, mining, distance, normalize, ref_labels, ref_holds_batch)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None):
        reason = _ref_reason(embeddings, labels, ref_emb, ref_labels)
        plan = reason or self.plan(labels, _mining_of(indices_tuple, embeddings, labels, ref_emb,
                                                       ref_labels), ref_labels)
        if isinstance(plan, str):
            _fall_back(self, plan)
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.reset_stats()
        labels = labels.to(embeddings.device)  # as PML moves them
        if ref_labels is not None:
            ref_labels = ref_labels.to(ref_emb.device)
        loss, options = plan
        if loss == "ntxent":
            return _ntxent(embeddings, labels, ref_emb, ref_labels, backend=self.backend,
                           **options)
        function = _pairs.MEMORY_BANK_LOSSES[loss].function
        return function(embeddings, labels, ref_emb, ref_labels, backend=self.backend, **options)


class MultiSimilarityLoss(_FusedLoss, _pml_losses.MultiSimilarityLoss):
    """PML's ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5)``; fused alone (every pair) or
    after :class:`MultiSimilarityMiner` (its epsilon, mined on the same tensors)."""

    def _plan(self, labels, mining, distance, normalize, ref_labels, ref_holds_batch):
        options = dict(alpha=self.alpha, beta=self.beta, base=self.base, normalize=normalize)
        if mining is None:
            return "multi_similarity", dict(options, mining=False)
        if mining.kind != "multi_similarity" or mining.distance != (distance, normalize):
            return "indices from a miner other than MultiSimilarityMiner with the loss's distance"
        return "multi_similarity", dict(options, mining=True, epsilon=mining.epsilon)


class SupConLoss(_FusedLoss, _pml_losses.SupConLoss):
    """PML's ``SupConLoss(temperature=0.1)``, fused without an indices_tuple."""

    def _plan(self, labels, mining, distance, normalize, ref_labels, ref_holds_batch):
        if mining is not None:
            return "an indices_tuple (SupCon over mined pairs)"
        return "supcon", dict(temperature=self.temperature, normalize=normalize)


class NTXentLoss(_FusedLoss, _pml_losses.NTXentLoss):
    """PML's ``NTXentLoss(temperature=0.07)``, fused without an indices_tuple when every row
    has at most one positive: per positive pair (i, p) PML's term is
    ``-log(e^{S_ip/t} / (e^{S_ip/t} + sum_{n neg of i} e^{S_in/t}))``, which is SupCon's row
    ``lse_{j paired with i} S_ij/t - S_ip/t`` when p is i's only positive; PML averages the
    terms over the positive pairs (MeanReducer)."""

    def _plan(self, labels, mining, distance, normalize, ref_labels, ref_holds_batch):
        if mining is not None:
            return "an indices_tuple (NT-Xent over mined pairs)"
        # At most one positive per row: no label twice in the reference set, or at most twice
        # in a batch that is its own reference or in a bank that holds the batch (the row's
        # own slot is not a pair).
        pool, limit = (labels, 2) if ref_labels is None else (ref_labels, 1)
        limit = 2 if ref_holds_batch else limit
        if pool.numel() and int(torch.unique(pool, return_counts=True)[1].max()) > limit:
            return "rows with several positives (NT-Xent's per-pair terms are not SupCon's rows)"
        return "ntxent", dict(temperature=self.temperature, normalize=normalize)


def _ntxent(embeddings, labels, ref_emb, ref_labels, *, temperature, normalize, backend,
            self_offset=None):
    fn = "fusedloss.pml.NTXentLoss"
    _pairs._check_supcon(fn, temperature=temperature)
    pairs = _pairs._prepare(fn, embeddings, labels, ref_emb, ref_labels, normalize, backend,
                            _pairs.STATS.name, self_offset)
    stats = pairs.row_stats(None, SUPCON, SIMILARITY, (temperature,))
    has_pos = stats[:, 2].detach() == 1
    rows = torch.where(has_pos, stats[:, 0] - stats[:, 1], 0.0)
    total_pos = has_pos.sum()
    total_neg = pairs.num_pairs - total_pos
    # PML's zeros: no positive or no negative pair, or at most one of each (GenericPairLoss).
    no_loss = (total_pos == 0) | (total_neg == 0) | ((total_pos <= 1) & (total_neg <= 1))
    loss = rows.sum() / total_pos.clamp(min=1)
    return _pairs._finish(torch.where(no_loss, pairs.zero(), loss), embeddings)


class ContrastiveLoss(_FusedLoss, _pml_losses.ContrastiveLoss):
    """PML's ``ContrastiveLoss(pos_margin=0, neg_margin=1)`` (LpDistance, or a similarity),
    fused without an indices_tuple. The margins are passed as given: PML's defaults are
    (0, 1) for every distance, where ``fusedloss.contrastive_loss`` picks (1, 0) for cosine."""

    DISTANCES = ("cosine", "euclidean")

    def _plan(self, labels, mining, distance, normalize, ref_labels, ref_holds_batch):
        if mining is not None:
            return "an indices_tuple (contrastive over mined pairs)"
        return "contrastive", dict(pos_margin=float(self.pos_margin),
                                   neg_margin=float(self.neg_margin), distance=distance,
                                   normalize=normalize)


class TripletMarginLoss(_FusedLoss, _pml_losses.TripletMarginLoss):
    """PML's ``TripletMarginLoss(margin=0.05)``, fused after :class:`BatchHardMiner` (the same
    distance, mined on the same tensors); without ``swap`` and ``smooth_loss``."""

    DISTANCES = ("cosine", "euclidean")

    def _plan(self, labels, mining, distance, normalize, ref_labels, ref_holds_batch):
        if self.swap or self.smooth_loss:
            return "swap or smooth_loss"
        if mining is None:
            return "no indices_tuple (every triplet of the batch, not batch-hard)"
        if mining.kind != "batch_hard" or mining.distance != (distance, normalize):
            return "indices from a miner other than BatchHardMiner with the loss's distance"
        return "batch_hard_triplet", dict(margin=float(self.margin), distance=distance,
                                          normalize=normalize)


# ---- the miners --------------------------------------------------------------------------------

class _FusedMiner:
    """The part both drop-in miners share: `mining()` (our record, or the reason to run PML's
    code), then the fused indices or PML's forward."""

    DISTANCES = ("cosine",)

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def mining(self) -> Union[str, _Mining]:
        if self.collect_stats:
            return "collect_stats=True (PML's statistics are recorded by PML's code)"
        distance = _distance(self.distance)
        if distance is None or distance[0] not in self.DISTANCES:
            return f"distance {type(self.distance).__name__}(p={self.distance.p}, " \
                   f"power={self.distance.power})"
        return self._mining(distance)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        mining = _ref_reason(embeddings, labels, ref_emb, ref_labels) or self.mining()
        if isinstance(mining, str) or not _integer_labels(labels):
            _fall_back(self, mining if isinstance(mining, str) else "labels that are not an "
                       "integer tensor")
            return super().forward(embeddings, labels, ref_emb, ref_labels)
        self.reset_stats()
        with torch.no_grad():
            indices = self._mine(mining, embeddings.detach(), labels.to(embeddings.device),
                                 ref_emb, None if ref_labels is None else
                                 ref_labels.to(ref_emb.device))
        self.output_assertion(indices)
        return MinedTuple(indices, mining, embeddings, labels, ref_emb, ref_labels)


class MultiSimilarityMiner(_FusedMiner, _pml_miners.MultiSimilarityMiner):
    """PML's ``MultiSimilarityMiner(epsilon=0.1)`` through :func:`fusedloss.multi_similarity_miner`
    (CosineSimilarity or DotProductSimilarity)."""

    def _mining(self, distance):
        return _Mining("multi_similarity", distance, float(self.epsilon))

    def _mine(self, mining, embeddings, labels, ref_emb, ref_labels):
        ref_emb = None if ref_emb is None else ref_emb.detach()
        return _pairs.multi_similarity_miner(embeddings, labels, ref_emb, ref_labels,
                                             epsilon=mining.epsilon,
                                             normalize=mining.distance[1], backend=self.backend)


class BatchHardMiner(_FusedMiner, _pml_miners.BatchHardMiner):
    """PML's ``BatchHardMiner()``: ``(a, p, n)``, each anchor with its hardest positive and
    negative (LpDistance: the farthest positive, the nearest negative; a similarity: the least
    and the most similar), anchors without both left out, ties to the first column; from the
    tiled extrema kernel. Without ``allowed_pos_range`` / ``allowed_neg_range``."""

    DISTANCES = ("cosine", "euclidean")

    def _mining(self, distance):
        if self.allowed_pos_range is not None or self.allowed_neg_range is not None:
            return "allowed_pos_range or allowed_neg_range"
        return _Mining("batch_hard", distance)

    def _mine(self, mining, embeddings, labels, ref_emb, ref_labels):
        distance, normalize = mining.distance
        ref_emb = None if ref_emb is None else ref_emb.detach()
        pairs = _pairs._prepare("fusedloss.pml.BatchHardMiner", embeddings, labels, ref_emb,
                                ref_labels, normalize, self.backend, _pairs.EXTREMA.name)
        _, index = pairs.extrema(SIMILARITY if distance == "cosine" else EUCLIDEAN)
        anchors = (index >= 0).all(1).nonzero().flatten()
        return anchors, index[anchors, 0], index[anchors, 1]


# ---- the memory bank -----------------------------------------------------------------------------

class CrossBatchMemory(_pml_losses.CrossBatchMemory):
    """PML's ``CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)``, with PML's
    own ring buffer and state. Fused when ``loss`` is one of this module's losses in a fused
    configuration, ``miner`` is None or its matching miner (MultiSimilarityMiner for
    MultiSimilarityLoss, BatchHardMiner for TripletMarginLoss) and no ``indices_tuple`` is
    given. As in PML, without ``enqueue_mask`` the batch is enqueued and then paired with the
    whole bank, a row's pairs with its own slot dropped after mining
    (fusedloss.pairs.memory_bank_loss); with it (MoCo: the keys enqueued, the queries not) the
    rows of ``enqueue_mask`` are enqueued and the others paired with the whole bank. NT-Xent
    needs at most one positive per row: a label at most twice in the bank (once with
    ``enqueue_mask``), as in PML's MoCo recipe, whose labels are unique per batch."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def _plan(self, labels, indices_tuple, enqueue_mask) -> Union[str, Plan]:
        if indices_tuple is not None:
            return "an indices_tuple"
        if not _integer_labels(labels):
            return "labels that are not an integer tensor"
        if enqueue_mask is not None and not (torch.is_tensor(enqueue_mask)
                                             and enqueue_mask.dtype == torch.bool
                                             and enqueue_mask.shape == labels.shape
                                             and bool(enqueue_mask.any())):
            return "an enqueue_mask that is not a bool mask of the batch enqueuing a row"
        if not isinstance(self.loss, _FusedLoss):
            return f"loss {type(self.loss).__name__} (not a fusedloss.pml loss)"
        if self.miner is None:
            mining = None
        elif isinstance(self.miner, _FusedMiner):
            mining = self.miner.mining()
        else:
            mining = f"miner {type(self.miner).__name__} (not a fusedloss.pml miner)"
        keys = labels if enqueue_mask is None else labels[enqueue_mask]
        bank_labels = self._bank_labels_after(keys) if isinstance(self.loss, NTXentLoss) else keys
        return self.loss.plan(labels, mining, ref_labels=bank_labels,
                              ref_holds_batch=enqueue_mask is None)

    def _bank_labels_after(self, keys):
        """The labels of the filled bank once `keys` are enqueued (add_to_memory's ring)."""
        size, k = len(self.label_memory), len(keys)
        after = self.label_memory.to(keys.device, keys.dtype).clone()
        after[(self.queue_idx + torch.arange(k, device=keys.device)) % size] = keys
        filled = size if self.has_been_filled or self.queue_idx + k >= size else self.queue_idx + k
        return after[:filled]

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        plan = self._plan(labels, indices_tuple, enqueue_mask)
        if isinstance(plan, str):
            _fall_back(self, plan)
            with warnings.catch_warnings():  # the wrapped loss then runs PML's code too: once said
                warnings.simplefilter("ignore", PMLFallbackWarning)
                return super().forward(embeddings, labels, indices_tuple, enqueue_mask)
        labels = labels.to(embeddings.device)
        queries, query_labels, keys, key_labels = embeddings, labels, embeddings, labels
        if enqueue_mask is not None:
            mask = enqueue_mask.to(embeddings.device)
            keys, key_labels = embeddings[mask], labels[mask]
            queries, query_labels = embeddings[~mask], labels[~mask]
        if len(keys) > len(self.embedding_memory):
            raise ValueError(f"CrossBatchMemory: {len(keys)} rows to enqueue do not fit in a "
                             f"memory of {len(self.embedding_memory)}")
        self.reset_stats()
        self.embedding_memory = self.embedding_memory.to(embeddings.device, embeddings.dtype)
        self.label_memory = self.label_memory.to(embeddings.device, labels.dtype)
        start = self.queue_idx
        self.add_to_memory(keys, key_labels, len(keys))
        filled = len(self.embedding_memory) if self.has_been_filled else self.queue_idx
        bank, bank_labels = self.embedding_memory[:filled], self.label_memory[:filled]
        self_offset = start if enqueue_mask is None else None
        return _bank_loss(plan, queries, query_labels, bank, bank_labels, self_offset,
                          self.loss.backend)


def _bank_loss(plan: Plan, queries, labels, bank, bank_labels, self_offset, backend):
    """The fused loss of `plan` of the queries against the bank, which holds the queries at
    rows (self_offset + i) mod M (their pairs dropped after mining), or not (None)."""
    loss, options = plan
    if loss == "ntxent":
        return _ntxent(queries, labels, bank, bank_labels, backend=backend,
                       self_offset=self_offset, **options)
    if self_offset is None:
        function = _pairs.MEMORY_BANK_LOSSES[loss].function
        return function(queries, labels, bank, bank_labels, backend=backend, **options)
    options = _pairs.memory_bank_options("CrossBatchMemory", loss, dict(options, backend=backend))
    return _pairs.memory_bank_loss("CrossBatchMemory", loss, queries, labels, bank, bank_labels,
                                   self_offset, options)


# ---- PML's modules with the drop-ins in place ----------------------------------------------------

def _with_drop_ins(name: str, pml_module, drop_ins) -> types.ModuleType:
    """A module `fusedloss.pml.<name>`: every public name of `pml_module`, the classes of
    `drop_ins` replacing PML's of the same name; importable (`from fusedloss.pml.losses import
    SupConLoss`)."""
    module = types.ModuleType(f"{__name__}.{name}", f"pytorch_metric_learning.{name} with "
                              f"fusedloss.pml's {', '.join(c.__name__ for c in drop_ins)}")
    module.__dict__.update({k: v for k, v in vars(pml_module).items() if not k.startswith("_")})
    module.__dict__.update({c.__name__: c for c in drop_ins})
    sys.modules[module.__name__] = module
    return module


losses = _with_drop_ins("losses", _pml_losses, (MultiSimilarityLoss, SupConLoss, NTXentLoss,
                                                ContrastiveLoss, TripletMarginLoss,
                                                CrossBatchMemory))
miners = _with_drop_ins("miners", _pml_miners, (MultiSimilarityMiner, BatchHardMiner))
