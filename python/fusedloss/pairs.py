"""Pairwise similarity losses with mining: Multi-Similarity (loss and miner), SupCon, InfoNCE,
contrastive and batch-hard triplet, with pytorch-metric-learning's (PML's) semantics.

Every function reduces the N x M similarity matrix S_ij = x_i . r_j (x the queries, r the
reference set, the batch itself by default) to per-row statistics with three ops, whose
contracts are the schemas and comments in python/fusedloss/_schemas.py:
  pair_extrema              the hardest positive and negative of each row (mining);
  pair_row_stats            per-row sums and masked log-sum-exps of one loss kind;
  pair_row_stats_backward   its gradient, recomputing tiles (pair_row_stats' autograd).
The losses are then combined from the [N, K] statistics with ordinary torch ops, so the
reductions below are differentiable as written. The kernels tile S and never store it; the
"reference" backend is the dense oracle in fusedloss.reference.pairs, differentiated by
autograd.

PML correspondences (each function's docstring gives the formula):
  multi_similarity_loss     MultiSimilarityMiner(epsilon) + MultiSimilarityLoss(alpha, beta, base)
  multi_similarity_miner    MultiSimilarityMiner(epsilon)
  supcon_loss               SupConLoss(temperature)
  info_nce_loss             NTXentLoss(temperature) with labels = arange(N), ref_emb = key
  contrastive_loss          ContrastiveLoss(pos_margin, neg_margin) (LpDistance or CosineSimilarity)
  batch_hard_triplet_loss   BatchHardMiner + TripletMarginLoss(margin)
  orthogonal_projection_loss  (not in PML) the authors' OrthogonalProjectionLoss(gamma)
PML's global rule of GenericPairLoss holds for the pair losses: a batch with at most one
positive pair and at most one negative pair gives 0. So does PML's zero for a batch with no
pairs of a needed sign; every such 0 has a zero gradient.
NaN: a NaN in an embedding that takes part in the loss gives a NaN loss, on every backend.
The hardest pick of a row with a NaN score is NaN (torch.min's rule, pair_extrema's contract),
and the AvgNonZero means count NaN entries, where PML's `> 0` would drop them.

Across ranks. Every loss (and the miner) takes ``group`` (a torch.distributed process group;
None, the default: this process alone, no collective) and ``ddp_grad_scale`` (default True).
With a group each rank passes its own N_r rows (sizes may differ, 0 included; the labels and
a reference set, if any, are per rank too) and every rank gets the loss of the global batch,
the rank-ordered concatenation, exactly as the function without a group on that batch. The
design, per call:
  1. agreement on errors: one all_reduce of 8 W int64 (fdist.prepared_everywhere);
     bad input on any rank raises on every rank; D, the dtype, whether a reference set is
     given, whether the inputs need a gradient and the options must match across ranks
     (the table, and the batch sizes in it, are read on the host: one sync per call, as in
     the sharded functions; without a group there is none);
  2. one all-gather of the (normalised) rows, O(N D), and one of the labels (of the
     reference sets too, when given);
  3. the tiled kernels with this rank's rows as queries against the global references,
     self_offset = the rank's first global row, so each rank's pass costs N_r x N_global
     similarities tile by tile and no rank stores an N_r x N_global matrix;
  4. the per-row statistics reduced to a few numbers per rank (sums, counts, the miner's
     few-pairs rule) and summed over ranks (all_reduce of O(1) numbers, fdist.sum_over_ranks;
     the miner's thresholds are per row, and each rank holds every reference of its rows);
  5. backward: each rank differentiates its own partial sums; the references' gradient goes
     to the rows' owners in one reduce-scatter (on gloo an all_to_all of W padded blocks),
     O(N D) per rank, in the all-gather's backward.
The local embeddings' gradient is the exact gradient of the global loss times W with
``ddp_grad_scale=True``, so that DistributedDataParallel's average over the W ranks of the
backbone's gradients is the exact gradient; ``False`` gives the exact gradient. Every rank
must call backward (the reduce-scatter is a collective), as with DDP itself.
"""
from dataclasses import dataclass
import importlib.util
import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import _checks
from . import distributed as fdist
from ._ops import BACKENDS, Op, accumulation_dtype, resolve_backend, result_dtype
from .reference import pairs as reference
from .reference.pairs import (CONTRASTIVE, EUCLIDEAN, MULTI_SIMILARITY, NUM_STATS,
                              ORTHOGONAL_PROJECTION, SIMILARITY, SUPCON)

_DISTANCES = {"euclidean": EUCLIDEAN, "cosine": SIMILARITY}
# PML's documented margins of ContrastiveLoss for each distance: (pos_margin, neg_margin).
_CONTRASTIVE_MARGINS = {"euclidean": (0.0, 1.0), "cosine": (1.0, 0.0)}
# Similarities formed at once by the miner's torch code: rows x M per block.
_MINER_BLOCK_ELEMENTS = 1 << 22


# ---- ops: fake kernels and autograd ------------------------------------------------------------

def _extrema_fake(x, labels, ref, ref_labels, distance, self_offset, block_size):
    n = x.shape[0]
    return x.new_empty(n, 2, dtype=accumulation_dtype(x)), x.new_empty(n, 2, dtype=torch.long)


def _stats_fake(x, labels, ref, ref_labels, thresholds, kind, distance, hyper, self_offset,
                block_size):
    return x.new_empty(x.shape[0], NUM_STATS[kind], dtype=accumulation_dtype(x))


def _stats_backward_fake(grad_stats, stats, x, labels, ref, ref_labels, thresholds, kind, distance,
                         hyper, self_offset, block_size, x_grad, ref_grad):
    return (x.new_empty(x.shape) if x_grad else x.new_empty(0),
            ref.new_empty(ref.shape) if ref_grad else ref.new_empty(0))


def _stats_setup_context(ctx, inputs, output):
    x, labels, ref, ref_labels, thresholds, *options = inputs
    ctx.options = tuple(options)  # kind, distance, hyper, self_offset, block_size
    ctx.save_for_backward(x, labels, ref, ref_labels, thresholds, output)


def _stats_backward(ctx, grad_stats):
    x, labels, ref, ref_labels, thresholds, stats = ctx.saved_tensors
    x_grad, ref_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    backward = STATS_BACKWARD.cpp if ctx.op is STATS.cpp else STATS_BACKWARD.triton
    grad_x, grad_ref = backward(grad_stats.contiguous(), stats, x, labels, ref, ref_labels,
                                thresholds, *ctx.options, x_grad, ref_grad)
    return (grad_x if x_grad else None, None, grad_ref if ref_grad else None,
            None, None, None, None, None, None, None)


EXTREMA = Op("pairs", "pair_extrema", fake=_extrema_fake)
STATS_BACKWARD = Op("pairs", "pair_row_stats_backward", fake=_stats_backward_fake)
STATS = Op("pairs", "pair_row_stats", fake=_stats_fake, setup_context=_stats_setup_context,
           backward=_stats_backward)


def _resolve(fn: str, backend: str, device: torch.device, op_name: str) -> str:
    """The backend that runs `op_name`; Triton only where its kernel file exists."""
    chosen = resolve_backend(backend, device, op_name)
    if chosen == "triton" and importlib.util.find_spec("fusedloss.triton_kernels.pairs") is None:
        raise RuntimeError(f"{fn}: backend 'triton' is not available: fusedloss has no Triton "
                           "kernels for the pair losses (no fusedloss.triton_kernels.pairs)")
    return chosen


# ---- the batch against its reference set ---------------------------------------------------------

@dataclass
class _Pairs:
    """Queries x [N, D] and references ref [M, D] (normalised when asked), their labels, the
    backend, and which column of row i is not a pair: (offset + i) mod M, none for -1.
    `mining_offset` applies to mining (the extrema), `pair_offset` to the pairs of the loss;
    they differ only for a memory bank that holds the batch (PML's miners see the batch's own
    slots there, and only its loss drops them).

    Across ranks (`ranks` set, see _Ranks) x holds this rank's rows of the global batch and
    ref the global reference set; the loss is a function of sums over every rank's rows
    (`total`, `count`), the same on every rank."""

    x: torch.Tensor
    labels: torch.Tensor
    ref: torch.Tensor
    ref_labels: torch.Tensor
    backend: str
    mining_offset: int
    pair_offset: int
    ranks: Optional["_Ranks"] = None

    @property
    def num_rows(self) -> int:
        """Rows of the (global) batch."""
        return self.x.shape[0] if self.ranks is None else self.ranks.rows

    @property
    def num_pairs(self) -> int:
        """Pairs of the loss, positive or negative, of the (global) batch: a shape, not a
        value."""
        n, m = self.num_rows, self.ref.shape[0]
        return n * (m - 1 if self.pair_offset >= 0 and m > 0 else m)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks (t itself in one process), differentiable: each rank's
        partial gets the sum's gradient times the gradient scale (fdist.sum_over_ranks)."""
        if self.ranks is None:
            return t
        return fdist.sum_over_ranks(t, self.ranks.group, self.ranks.grad_scale)

    def count(self, t: torch.Tensor) -> torch.Tensor:
        """t (counts, flags: no gradient) summed over the ranks."""
        return t if self.ranks is None else fdist.all_reduce(t, "sum", self.ranks.group)

    def mean_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The mean of a per-row value over the rows of the global batch."""
        return self.total(rows.sum()) / self.num_rows

    def extrema(self, distance: int):
        """pair_extrema (values, indices), without gradient."""
        with torch.no_grad():
            args = (self.x.detach(), self.labels, self.ref.detach(), self.ref_labels, distance,
                    self.mining_offset)
            if self.backend == "reference":
                return reference.pair_extrema(*args)
            return EXTREMA.for_backend(self.backend)(*args, 0)

    def row_stats(self, thresholds, kind: int, distance: int, hyper) -> torch.Tensor:
        hyper = [float(h) for h in hyper]
        args = (self.x, self.labels, self.ref, self.ref_labels, thresholds, kind, distance, hyper,
                self.pair_offset)
        if self.backend == "reference":
            return reference.pair_row_stats(*args)
        return STATS.for_backend(self.backend)(*args, 0)

    def dense_pair_counts(self):
        """(positive, negative) pairs of the loss, counted on the device from an N x M mask:
        for tiny batches only (num_pairs <= 2, see _unless_few_pairs)."""
        pos, neg = reference.pair_masks(self.labels, self.ref_labels, self.pair_offset)
        return self.count(torch.stack([pos.sum(), neg.sum()])).unbind()

    def zero(self) -> torch.Tensor:
        """A zero loss connected to the inputs, so that its gradient is zero, not None."""
        total = (self.x * 0).sum()
        if self.ref is not self.x:
            total = total + (self.ref * 0).sum()
        return total.to(accumulation_dtype(self.x))


def _prepare(fn, embeddings, labels, ref_embeddings, ref_labels, normalize, backend, op_name,
             self_offset=None, across: Optional["_Across"] = None) -> _Pairs:
    """Checked, normalised inputs. Without a reference set the batch is its own, row i never
    paired with column i (for mining and the loss); with one, every pair counts. A
    `self_offset` k (memory_bank_loss) says that the reference set holds the batch at rows
    (k + i) mod M: the loss drops those pairs, mining keeps them, as PML's CrossBatchMemory
    does. `across`: the batch is this rank's part of a global batch (_prepare_across)."""
    if across is not None:
        return _prepare_across(fn, embeddings, labels, ref_embeddings, ref_labels, normalize,
                               backend, op_name, self_offset, across)
    _check_batch(fn, embeddings, labels, ref_embeddings, ref_labels, normalize, self_offset)
    backend = _resolve(fn, backend, embeddings.device, op_name)
    x = F.normalize(embeddings, dim=1) if normalize else embeddings
    if ref_embeddings is None:
        return _Pairs(x, labels.long(), x, labels.long(), backend, 0, 0)
    ref = F.normalize(ref_embeddings, dim=1) if normalize else ref_embeddings
    bank_offset = -1 if self_offset is None else self_offset
    return _Pairs(x, labels.long(), ref, ref_labels.long(), backend, -1, bank_offset)


# ---- the global batch of a process group ---------------------------------------------------------

@dataclass(frozen=True)
class _Across:
    """A call across the ranks of `group`: the gradient convention, the checks of the loss's
    options (run on every rank inside the agreement on errors) and the values that every
    rank must share (the options)."""

    group: object
    ddp_grad_scale: bool
    check: Callable[[], None]
    shared: tuple


@dataclass(frozen=True)
class _Ranks:
    """This rank's place in the global batch: every rank's number of rows (`sizes`, rank
    order), this rank, and the factor of the local gradients (W with ddp_grad_scale, else 1)."""

    group: object
    rank: int
    sizes: tuple
    grad_scale: float

    @property
    def offset(self) -> int:
        """The global index of this rank's first row."""
        return sum(self.sizes[: self.rank])

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def gather(self, t: torch.Tensor, sizes=None) -> torch.Tensor:
        """Every rank's t in rank order (fdist.all_gather_rows; autograd-aware, its backward
        one reduce-scatter of the gradient to the rows' owners)."""
        return fdist.all_gather_rows(t, self.sizes if sizes is None else sizes, self.group)


def _across(fn, group, ddp_grad_scale, check: Callable[[], None], *shared) -> Optional[_Across]:
    """None without a group: then `check` (and that of ddp_grad_scale) runs now, and the call
    is this process's alone; with one, they run inside the agreement on errors."""

    def checks():
        _flag(fn, ddp_grad_scale=ddp_grad_scale)
        check()

    if group is None:
        checks()
        return None
    return _Across(group, ddp_grad_scale, checks, shared)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What every rank must share, from the table of the agreement on errors.
_AGREED = ("embedding_dim", "dtype", "reference_set", "requires_grad", "options.digest")


def _agree(fn, across: _Across, prepare: Callable, x, ref):
    """(prepare(), _Ranks, every rank's number of reference rows) after the agreement on
    errors (fdist.prepared_everywhere: one all_reduce of a few int64 per rank): a rank whose
    checks fail raises its error and the others name it; then D, the dtype, whether a
    reference set is given, whether the inputs need a gradient (the backward's collectives
    run on every rank or on none) and the options must be the same on every rank."""

    def row_of(prepared):
        if prepared is None:
            return dict.fromkeys(("rows", "ref_rows") + _AGREED, 0)
        grad = torch.is_grad_enabled()
        return {"rows": x.shape[0], "ref_rows": -1 if ref is None else ref.shape[0],
                "embedding_dim": x.shape[1], "dtype": _FLOAT_DTYPES.index(x.dtype)
                if x.dtype in _FLOAT_DTYPES else -1, "reference_set": int(ref is not None),
                "requires_grad": int(grad and x.requires_grad)
                + 2 * int(grad and ref is not None and ref.requires_grad),
                "options.digest": fdist.fingerprint(*across.shared, across.ddp_grad_scale)}

    device = x.device if torch.is_tensor(x) else torch.device("cpu")
    prepared, table = fdist.prepared_everywhere(fn, across.group, device, prepare, row_of)
    readable = [{**row, "dtype": str(_FLOAT_DTYPES[row["dtype"]]) if row["dtype"] >= 0 else "?",
                 "reference_set": "given" if row["reference_set"] else "none"} for row in table]
    differing = fdist.disagreements(readable, _AGREED)
    if differing:
        raise ValueError(f"{fn}: these must be the same on every rank but are not: "
                         + ", ".join(differing))
    world, rank = fdist.world_and_rank(across.group)
    scale = float(world) if across.ddp_grad_scale else 1.0
    ranks = _Ranks(across.group, rank, tuple(row["rows"] for row in table), scale)
    return prepared, ranks, [row["ref_rows"] for row in table]


def _prepare_across(fn, embeddings, labels, ref_embeddings, ref_labels, normalize, backend,
                    op_name, self_offset, across: _Across) -> _Pairs:
    """_prepare for this rank's rows of a global batch, the concatenation of every rank's
    (rank order, N_r rows on rank r, uneven allowed): the local rows are the queries, after
    the agreement on errors (_agree). The references: the gathered global batch, row i of
    this rank never paired with its own global column offset + i; or the concatenation of
    every rank's reference set; or (self_offset given) a memory bank, the same on every rank,
    that holds the global batch at rows (self_offset + j) mod M."""

    def prepare():
        across.check()
        _check_batch(fn, embeddings, labels, ref_embeddings, ref_labels, normalize, self_offset)
        return _resolve(fn, backend, embeddings.device, op_name)

    bank = self_offset is not None
    chosen, ranks, ref_sizes = _agree(fn, across, prepare, embeddings,
                                      None if bank else ref_embeddings)
    x = F.normalize(embeddings, dim=1) if normalize else embeddings
    labels = labels.long()
    if ref_embeddings is None:
        offset = ranks.offset
        return _Pairs(x, labels, ranks.gather(x), ranks.gather(labels), chosen, offset, offset,
                      ranks)
    ref = F.normalize(ref_embeddings, dim=1) if normalize else ref_embeddings
    if not bank:
        return _Pairs(x, labels, ranks.gather(ref, ref_sizes),
                      ranks.gather(ref_labels.long(), ref_sizes), chosen, -1, -1, ranks)
    own = (self_offset + ranks.offset) % max(ref.shape[0], 1)
    return _Pairs(x, labels, ref, ref_labels.long(), chosen, -1, own, ranks)


def _unless_few_pairs(pairs: _Pairs, loss: torch.Tensor) -> torch.Tensor:
    """`loss`, or PML's GenericPairLoss zero when there is at most one positive and at most one
    negative pair. With every pair taken, that needs num_pairs <= 2, a property of the shapes;
    the pairs are then counted on the device (no host read)."""
    if pairs.num_pairs > 2:
        return loss
    num_pos, num_neg = pairs.dense_pair_counts()
    return torch.where((num_pos <= 1) & (num_neg <= 1), pairs.zero(), loss)


def _few_mined_pairs(pairs: _Pairs, thresholds: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The same rule for the pairs that the multi-similarity miner keeps, as a bool tensor.

    A row keeps a pair iff min_pos - eps < max_neg, and then it keeps its hardest negative
    (max_neg + eps > min_pos): two such rows mean two negative pairs. So the rule can only
    hold with at most one active row, whose kept pairs are counted from one row of S (O(M D)).
    Across ranks each rank counts its active rows and the kept pairs of its first one (none
    without an active row): with one active row in the global batch, the sums are its counts.
    A row with a NaN threshold leaves the rule undecided: then False, so that the NaN shows."""
    n, m = pairs.x.shape[0], pairs.ref.shape[0]
    with torch.no_grad():
        max_neg, min_pos = thresholds.unbind(1)
        active = min_pos - epsilon < max_neg
        counts = torch.zeros(4, dtype=torch.long, device=pairs.x.device)
        counts[3] = thresholds.isnan().any()
        if n > 0 and m > 0:
            row = active.to(torch.uint8).argmax().view(1)  # the first active row (0 when none)
            acc = accumulation_dtype(pairs.x)
            s = (pairs.x.detach().index_select(0, row).to(acc) @ pairs.ref.detach().to(acc).T)[0]
            pos, neg = reference.pair_masks(pairs.labels.index_select(0, row), pairs.ref_labels,
                                            -1)
            paired = torch.ones(m, dtype=torch.bool, device=s.device)
            if pairs.pair_offset >= 0:
                paired = torch.arange(m, device=s.device) != (pairs.pair_offset + row) % m
            pos, neg = pos[0] & paired, neg[0] & paired
            any_active = active.any()
            counts[0] = active.sum()
            counts[1] = (pos & (s - epsilon < max_neg.index_select(0, row))).sum() * any_active
            counts[2] = (neg & (s + epsilon > min_pos.index_select(0, row))).sum() * any_active
        num_active, kept_pos, kept_neg, undecided = pairs.count(counts).unbind()
        few = (num_active == 0) | ((num_active == 1) & (kept_pos <= 1) & (kept_neg <= 1))
        return few & (undecided == 0)


def _mean_over_positive(pairs: _Pairs, values: torch.Tensor) -> torch.Tensor:
    """PML's AvgNonZeroReducer: the mean of the entries > 0 (over every rank's), and 0 when
    there is none. A NaN entry counts too, so that the mean is NaN (PML's `> 0` would drop it
    and hide the NaN input behind a finite loss); finite entries reduce exactly as PML's."""
    nonzero = (values > 0) | values.isnan()
    count = pairs.count(nonzero.sum()).clamp(min=1).to(values.dtype)
    return pairs.total(torch.where(nonzero, values, 0.0).sum()) / count


def _finish(loss: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    return loss.to(result_dtype(embeddings))


# ---- the public functions ------------------------------------------------------------------------

def multi_similarity_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    mining: bool = True,
    normalize: bool = True,
    backend: str = "auto",
    group=None,
    ddp_grad_scale: bool = True,
) -> torch.Tensor:
    r"""Multi-Similarity loss (Wang et al., CVPR 2019) with its miner, as PML's
    ``MultiSimilarityMiner(epsilon)`` followed by ``MultiSimilarityLoss(alpha, beta, base)``.

    ``embeddings [N, D]`` with integer ``labels [N]``; optionally a reference set (memory bank)
    ``ref_embeddings [M, D]`` with ``ref_labels [M]``. Without one the batch is its own
    reference and row i is never paired with itself; with one every (query, reference) pair
    counts, as in PML. A pair is positive when the labels are equal. With ``normalize`` the
    embeddings are L2-normalised first (``F.normalize``), so S_ij is the cosine similarity.

    Mining (``mining=True``): a positive pair is kept iff ``S_ij - epsilon < max negative S of
    row i`` and a negative iff ``S_ij + epsilon > min positive S of row i`` (strict). Per row::

        (1/alpha) log(1 + sum_{kept pos} exp(-alpha (S_ij - base)))
      + (1/beta)  log(1 + sum_{kept neg} exp( beta (S_ij - base)))

    a row without kept pairs contributing 0; the loss is the mean over all N rows (PML's
    MeanReducer). ``mining=False`` keeps every pair. As in PML, the loss is 0 (with a zero
    gradient) when at most one positive and at most one negative pair are kept. The
    exponentials are max-rescaled, so beta = 50 cannot overflow in any dtype. A row whose
    hardest positive or negative is NaN (a NaN embedding) has a NaN loss, the miner's rule
    being undecided there.

    ``alpha > 0`` and ``beta > 0``. The loss has the dtype of ``embeddings``; statistics are
    accumulated in fp32 (fp64 for fp64). ``backend``: "auto", "reference", "cpu", "triton".
    ``group`` and ``ddp_grad_scale``: the loss of the global batch of a process group, each
    rank passing its own rows (see "Across ranks" in :mod:`fusedloss.pairs`).
    """
    return _batch_loss("multi_similarity", embeddings, labels, ref_embeddings, ref_labels,
                       normalize, backend, group, ddp_grad_scale, alpha=alpha, beta=beta,
                       base=base, epsilon=epsilon, mining=mining)


def _check_multi_similarity(fn, *, alpha, beta, base, epsilon, mining):
    _checks.positive(fn, alpha=alpha, beta=beta)
    _checks.finite(fn, base=base, epsilon=epsilon)
    _flag(fn, mining=mining)


def _multi_similarity(pairs: _Pairs, *, alpha, beta, base, epsilon, mining) -> torch.Tensor:
    thresholds = _ms_thresholds(pairs) if mining else None
    stats = pairs.row_stats(thresholds, MULTI_SIMILARITY, SIMILARITY, (alpha, beta, base, epsilon))
    if pairs.num_rows == 0:
        return pairs.zero()
    rows = stats[:, 0] / alpha + stats[:, 1] / beta
    if not mining:
        return _unless_few_pairs(pairs, pairs.mean_of_rows(rows))
    # A NaN threshold (a NaN score among the row's pairs: pair_extrema lets NaN win) leaves
    # the miner's rule undecided, and every comparison with it false, which would keep no
    # pair and hide the NaN: such a row's loss is NaN (NaN + its stats), and so is the batch's.
    rows = rows + torch.where(thresholds.isnan(), thresholds, 0.0).sum(1)
    few = _few_mined_pairs(pairs, thresholds, epsilon)
    return torch.where(few, pairs.zero(), pairs.mean_of_rows(rows))


def _ms_thresholds(pairs: _Pairs) -> torch.Tensor:
    """The miner's thresholds [N, 2] = (max negative S, min positive S) of each row."""
    values, _ = pairs.extrema(SIMILARITY)
    return values.flip(1).contiguous()


def multi_similarity_miner(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    epsilon: float = 0.1,
    normalize: bool = True,
    backend: str = "auto",
    group=None,
):
    r"""The pairs of PML's ``MultiSimilarityMiner(epsilon)``: ``(a1, p, a2, n)`` int64 index
    tensors, positive pairs ``(a1[k], p[k])`` and negative pairs ``(a2[k], n[k])`` (row of
    ``embeddings``, row of the reference set), in row-major order.

    A positive pair is kept iff ``S_ij - epsilon < max negative S of row i``, a negative iff
    ``S_ij + epsilon > min positive S of row i`` (strict); the reference set and self exclusion
    are those of :func:`multi_similarity_loss`. The row thresholds come from the tiled
    extrema kernel of ``backend``; the pairs are then found in blocks of rows, never more than
    about 4M similarities at once. No gradient flows through the indices.

    With a process group (``group``; see "Across ranks" in :mod:`fusedloss.pairs`) every rank
    returns the pairs of the global batch in global indices (rows and reference rows of the
    rank-ordered concatenation), the same tensors as the single-process miner on that batch:
    each rank mines its own rows against the gathered references, then the ranks all-gather
    their pairs (two int64 indices per kept pair).
    """
    fn = "multi_similarity_miner"
    across = _across(fn, group, True, lambda: _checks.finite(fn, epsilon=epsilon), epsilon,
                     normalize, ref_embeddings is None)
    with torch.no_grad():
        pairs = _prepare(fn, embeddings, labels, ref_embeddings, ref_labels, normalize, backend,
                         EXTREMA.name, across=across)
        found = _mined_pairs(pairs, epsilon)
        return found if pairs.ranks is None else _gathered_pairs(pairs.ranks, found)


def _mined_pairs(pairs: _Pairs, epsilon: float):
    """multi_similarity_miner's (a1, p, a2, n) of the prepared pairs; rows numbered
    globally across ranks."""
    thresholds = _ms_thresholds(pairs)
    found = [[], [], [], []]
    n, m = pairs.x.shape[0], pairs.ref.shape[0]
    block = max(1, _MINER_BLOCK_ELEMENTS // max(m, 1))
    acc = accumulation_dtype(pairs.x)
    first = 0 if pairs.ranks is None else pairs.ranks.offset
    with torch.no_grad():
        ref = pairs.ref.detach().to(acc)
        for start in range(0, n, block):
            rows = slice(start, min(start + block, n))
            s = pairs.x.detach()[rows].to(acc) @ ref.T
            offset = -1 if pairs.pair_offset < 0 else (pairs.pair_offset + start) % max(m, 1)
            pos, neg = reference.pair_masks(pairs.labels[rows], pairs.ref_labels, offset)
            max_neg, min_pos = thresholds[rows, :1], thresholds[rows, 1:]
            kept = (pos & (s - epsilon < max_neg), neg & (s + epsilon > min_pos))
            for k, mask in enumerate(kept):
                i, j = mask.nonzero(as_tuple=True)
                found[2 * k].append(i + start + first)
                found[2 * k + 1].append(j)
    empty = torch.empty(0, dtype=torch.long, device=pairs.x.device)
    return tuple(torch.cat(f) if f else empty for f in found)


def _gathered_pairs(ranks: _Ranks, found):
    """Every rank's mined (a1, p, a2, n), concatenated in rank order: one all_gather of the
    counts, then one of the pairs of each sign (rows are already global, so rank order is
    the global row-major order)."""
    counts = fdist.gather_counts([found[0].numel(), found[2].numel()], ranks.group,
                                 found[0].device)
    out = []
    for k in (0, 1):
        local = torch.stack([found[2 * k], found[2 * k + 1]], 1)
        out.extend(ranks.gather(local, counts[:, k].tolist()).unbind(1))
    return tuple(t.contiguous() for t in out)


def supcon_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
    backend: str = "auto",
    group=None,
    ddp_grad_scale: bool = True,
) -> torch.Tensor:
    r"""Supervised contrastive loss (Khosla et al., 2020), as PML's ``SupConLoss(temperature)``.

    Per row i with P_i positives among its pairs A_i (every other row of the batch, or every
    reference; see :func:`multi_similarity_loss`)::

        l_i = log sum_{j in A_i} exp(S_ij / t) - (1 / |P_i|) sum_{j in P_i} S_ij / t

    Rows without positives count as 0, and the loss is the mean over the rows with
    ``l_i > 0`` (PML's AvgNonZeroReducer). The loss is 0 with a zero gradient when the batch
    has no positive or no negative pair, or at most one of each, as in PML. ``temperature > 0``.
    ``group`` and ``ddp_grad_scale``: the loss of the global batch of a process group, each
    rank passing its own rows (see "Across ranks" in :mod:`fusedloss.pairs`).
    """
    return _batch_loss("supcon", embeddings, labels, ref_embeddings, ref_labels, normalize,
                       backend, group, ddp_grad_scale, temperature=temperature)


def _check_supcon(fn, *, temperature):
    _checks.positive(fn, temperature=temperature)


def _supcon(pairs: _Pairs, *, temperature) -> torch.Tensor:
    stats = pairs.row_stats(None, SUPCON, SIMILARITY, (temperature,))
    num_pos = stats[:, 2].detach()
    rows = torch.where(num_pos > 0, stats[:, 0] - stats[:, 1] / num_pos.clamp(min=1), 0.0)
    total_pos = pairs.count(num_pos.sum())
    total_neg = pairs.num_pairs - total_pos
    no_loss = (total_pos == 0) | (total_neg == 0) | ((total_pos <= 1) & (total_neg <= 1))
    return torch.where(no_loss, pairs.zero(), _mean_over_positive(pairs, rows))


def info_nce_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: float = 0.07,
    symmetric: bool = False,
    normalize: bool = True,
    backend: str = "auto",
    group=None,
    ddp_grad_scale: bool = True,
) -> torch.Tensor:
    r"""InfoNCE / NT-Xent with the positives on the diagonal (SimCLR's and CLIP's form).

    ``query [N, D]`` and ``key [N, D]``; row i's positive is ``key[i]``, its negatives every
    other key::

        l_i = log sum_j exp(S_ij / t) - S_ii / t,    S = query @ key.T  (normalised rows)

    the mean over rows, i.e. ``F.cross_entropy(S / t, arange(N))``, and PML's
    ``NTXentLoss(t)(query, arange(N), ref_emb=key, ref_labels=arange(N))``. With
    ``symmetric=True`` the mean of that and the same loss with query and key swapped (CLIP).
    The N x N matrix is never stored. ``temperature > 0``; an empty batch gives 0.

    With a process group (``group``, ``ddp_grad_scale``; see "Across ranks" in
    :mod:`fusedloss.pairs`) each rank passes its N_r query and key rows; the loss is that of
    the concatenated global batch, the positives on its diagonal. The keys (and, symmetric,
    the queries, in the same all-gather) are gathered; each rank's rows are the queries.
    """
    fn = "info_nce_loss"

    def check():
        _checks.positive(fn, temperature=temperature)
        _flag(fn, symmetric=symmetric, normalize=normalize)
        _checks.floating_tensor(fn, "query", query, ndim=2)
        _checks.floating_tensor(fn, "key", key, ndim=2)
        if query.shape != key.shape:
            raise ValueError(f"{fn}: query and key must have the same shape [N, D], got "
                             f"{tuple(query.shape)} and {tuple(key.shape)}")

    across = _across(fn, group, ddp_grad_scale, check, temperature, symmetric, normalize)
    directions = (_info_nce_pairs(fn, query, key, symmetric, normalize, backend) if across is None
                  else _info_nce_pairs_across(fn, query, key, symmetric, normalize, backend,
                                              across))
    losses = [_info_nce(pairs, temperature) for pairs in directions]
    loss = losses[0] if len(losses) == 1 else (losses[0] + losses[1]) / 2
    return _finish(loss, query)


def _info_nce_pairs(fn, query, key, symmetric, normalize, backend):
    """The prepared (query -> key) pairs, and (key -> query) when symmetric: each row's
    positive is the reference of the same index (labels = the row index)."""
    ids = torch.arange(query.shape[0], device=query.device)
    ways = [(query, key), (key, query)] if symmetric else [(query, key)]
    return [_prepare(fn, q, ids, k, ids, normalize, backend, STATS.name) for q, k in ways]


def _info_nce_pairs_across(fn, query, key, symmetric, normalize, backend, across: _Across):
    """_info_nce_pairs for this rank's rows of the global batch: the local rows (global ids
    offset + i) against the gathered keys (ids 0 .. N - 1), and the local keys against the
    gathered queries; one all-gather of [query | key] rows when symmetric, of the keys alone
    otherwise."""

    def prepare():
        across.check()
        _checks.same_device(fn, query=query, key=key)
        return _resolve(fn, backend, query.device, STATS.name)

    chosen, ranks, _ = _agree(fn, across, prepare, query, key)
    q, k = (F.normalize(t, dim=1) if normalize else t for t in (query, key))
    ids = torch.arange(q.shape[0], device=q.device) + ranks.offset
    every_id = torch.arange(ranks.rows, device=q.device)
    if not symmetric:
        return [_Pairs(q, ids, ranks.gather(k), every_id, chosen, -1, -1, ranks)]
    every_q, every_k = ranks.gather(torch.cat([q, k], 1)).split(q.shape[1], 1)
    return [_Pairs(q, ids, every_k, every_id, chosen, -1, -1, ranks),
            _Pairs(k, ids, every_q, every_id, chosen, -1, -1, ranks)]


def _info_nce(pairs: _Pairs, temperature: float) -> torch.Tensor:
    """InfoNCE of prepared pairs whose labels put each row's positive on the diagonal."""
    stats = pairs.row_stats(None, SUPCON, SIMILARITY, (temperature,))
    if pairs.num_rows == 0:
        return pairs.zero()
    return pairs.mean_of_rows(stats[:, 0] - stats[:, 1])


def contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    pos_margin: Optional[float] = None,
    neg_margin: Optional[float] = None,
    distance: str = "euclidean",
    normalize: bool = True,
    backend: str = "auto",
    group=None,
    ddp_grad_scale: bool = True,
) -> torch.Tensor:
    r"""Contrastive loss (Hadsell et al., 2006), as PML's
    ``ContrastiveLoss(pos_margin, neg_margin)``.

    ``distance="euclidean"`` (PML's LpDistance, d_ij = |x_i - r_j|): positive pairs cost
    ``relu(d - pos_margin)``, negative pairs ``relu(neg_margin - d)``; margins default to 0
    and 1. ``distance="cosine"`` (PML's CosineSimilarity): ``relu(pos_margin - S)`` and
    ``relu(S - neg_margin)``, margins defaulting to 1 and 0. The loss is the mean of the
    positive pair losses that are > 0 plus the mean of the negative ones that are > 0 (PML's
    AvgNonZeroReducer on each; an empty set gives 0). Pairs and self exclusion are those of
    :func:`multi_similarity_loss`; at most one positive and one negative pair give 0.
    ``group`` and ``ddp_grad_scale``: the loss of the global batch of a process group, each
    rank passing its own rows (see "Across ranks" in :mod:`fusedloss.pairs`).
    """
    return _batch_loss("contrastive", embeddings, labels, ref_embeddings, ref_labels, normalize,
                       backend, group, ddp_grad_scale, pos_margin=pos_margin,
                       neg_margin=neg_margin, distance=distance)


def _contrastive_margins(distance, pos_margin, neg_margin):
    """(pos_margin, neg_margin), None replaced by PML's default for the distance."""
    default_pos, default_neg = _CONTRASTIVE_MARGINS[distance]
    return (default_pos if pos_margin is None else pos_margin,
            default_neg if neg_margin is None else neg_margin)


def _check_contrastive(fn, *, pos_margin, neg_margin, distance):
    _checks.choice(fn, "distance", distance, tuple(_DISTANCES))
    pos_margin, neg_margin = _contrastive_margins(distance, pos_margin, neg_margin)
    _checks.finite(fn, pos_margin=pos_margin, neg_margin=neg_margin)


def _contrastive(pairs: _Pairs, *, pos_margin, neg_margin, distance) -> torch.Tensor:
    margins = _contrastive_margins(distance, pos_margin, neg_margin)
    stats = pairs.row_stats(None, CONTRASTIVE, _DISTANCES[distance], margins)
    counts = pairs.count(stats[:, [1, 3]].detach().sum(0)).clamp(min=1)
    sums = pairs.total(stats[:, [0, 2]].sum(0))
    return _unless_few_pairs(pairs, sums[0] / counts[0] + sums[1] / counts[1])


def batch_hard_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    margin: float = 0.05,
    distance: str = "euclidean",
    normalize: bool = True,
    backend: str = "auto",
    group=None,
    ddp_grad_scale: bool = True,
) -> torch.Tensor:
    r"""Batch-hard triplet loss (Hermans et al., 2017), as PML's ``BatchHardMiner`` followed by
    ``TripletMarginLoss(margin)``.

    Each anchor (row) takes its hardest positive and hardest negative: with
    ``distance="euclidean"`` the farthest positive and the nearest negative, loss
    ``relu(d_ap - d_an + margin)``; with ``distance="cosine"`` the least similar positive and
    the most similar negative, loss ``relu(S_an - S_ap + margin)``. Ties go to the first
    reference. Anchors without a positive or a negative drop out; the loss is the mean over
    the anchors whose loss is > 0 (PML's AvgNonZeroReducer), 0 when there is none. The
    extrema come from the tiled kernel; the two distances per anchor are then recomputed in
    torch (O(N D)), and the gradient flows through them.
    ``group`` and ``ddp_grad_scale``: the loss of the global batch of a process group, each
    rank passing its own rows (see "Across ranks" in :mod:`fusedloss.pairs`).
    """
    return _batch_loss("batch_hard_triplet", embeddings, labels, ref_embeddings, ref_labels,
                       normalize, backend, group, ddp_grad_scale, margin=margin,
                       distance=distance)


def _check_batch_hard_triplet(fn, *, margin, distance):
    _checks.choice(fn, "distance", distance, tuple(_DISTANCES))
    _checks.finite(fn, margin=margin)


def _batch_hard_triplet(pairs: _Pairs, *, margin, distance) -> torch.Tensor:
    if pairs.ref.shape[0] == 0:
        return pairs.zero()
    _, index = pairs.extrema(_DISTANCES[distance])
    keep = (index >= 0).all(1)
    if pairs.pair_offset >= 0 and pairs.mining_offset < 0:
        # A bank that holds the batch: PML's miner may pick a row's own slot; its loss drops it.
        rows = torch.arange(index.shape[0], device=index.device)
        own = (pairs.pair_offset + rows) % pairs.ref.shape[0]
        keep = keep & (index[:, 0] != own)
    index = index.clamp(min=0)
    acc = accumulation_dtype(pairs.x)
    x, ref = pairs.x.to(acc), pairs.ref.to(acc)
    positive, negative = ref[index[:, 0]], ref[index[:, 1]]
    if distance == "euclidean":
        violation = (x - positive).norm(dim=1) - (x - negative).norm(dim=1)
    else:
        violation = (x * negative).sum(1) - (x * positive).sum(1)
    losses = torch.where(keep, (violation + margin).relu(), 0.0)
    return _mean_over_positive(pairs, losses) + pairs.zero()


def orthogonal_projection_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    gamma: float = 0.5,
    absolute: bool = False,
    normalize: bool = True,
    backend: str = "auto",
    group=None,
    ddp_grad_scale: bool = True,
) -> torch.Tensor:
    r"""Orthogonal Projection Loss (Ranasinghe et al., ICCV 2021): same-class features pulled
    together, different classes pushed towards orthogonality.

    With S the cosine matrix of the (normalised) rows against the reference set (the batch
    itself by default, pairs i != j; with ``ref_embeddings`` every pair counts), over the
    positive pairs P and the negative pairs Q::

        s = sum_{P} S_ij / (|P| + 1e-6),    d = sum_{Q} f(S_ij) / (|Q| + 1e-6),
        loss = (1 - s) + gamma d,           f(S) = S, or |S| when ``absolute``

    ``gamma = 0.5`` and the signed mean are the defaults of the authors' README and loss.py;
    ``absolute=True`` is their CIFAR / ImageNet variant. The sums and the pair counts come from
    one tiled pass (pair_row_stats, kind 3); the backward recomputes the tiles; no N x M
    matrix is stored. A batch of one class has no negative pair (d = 0), a batch without
    positive pairs s = 0, and an empty batch gives 1 with a zero gradient, as the authors'
    formula does. ``gamma >= 0``.
    """
    return _batch_loss("orthogonal_projection", embeddings, labels, ref_embeddings, ref_labels,
                       normalize, backend, group, ddp_grad_scale, gamma=gamma, absolute=absolute)


def _check_orthogonal_projection(fn, *, gamma, absolute):
    _checks.at_least(fn, 0.0, gamma=gamma)
    _flag(fn, absolute=absolute)


# The authors' guard against an empty pair set, added to each pair count.
_OPL_EPS = 1e-6


def _orthogonal_projection(pairs: _Pairs, *, gamma, absolute) -> torch.Tensor:
    stats = pairs.row_stats(None, ORTHOGONAL_PROJECTION, SIMILARITY, (float(absolute),))
    pos_sum, pos_count, neg_sum, neg_count = pairs.total(stats.sum(0)).unbind()
    pos_mean = pos_sum / (pos_count.detach() + _OPL_EPS)
    neg_mean = neg_sum / (neg_count.detach() + _OPL_EPS)
    return (1 - pos_mean) + gamma * neg_mean


# ---- UNPG's negative pairs -----------------------------------------------------------------------

_UNPG_BACKENDS = ("auto", "reference", "cpu", "cuda")


def unpg_negatives(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    whisker: float = 1.5,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    r"""The in-batch negative pairs of UNPG (Jung et al., "Unified Negative Pair Generation
    toward Well-discriminative Feature Space for Face Recognition", 2022), filtered as the
    authors do, to be joined to a margin softmax as shared extra columns
    (``extra_negatives`` of :func:`fusedloss.margin_cross_entropy` and its linear, sharded
    forms; ``unpg=True`` on :class:`fusedloss.nn.MarginSoftmaxHead` and ``nn.PartialFC``).

    ``embeddings [N, D]`` (L2-normalised first when ``normalize``) and integer ``labels [N]``.
    The cosines s_ij of the L pairs i < j with ``labels[i] != labels[j]``, sorted ascending,
    give Tukey's fences: ``Q1 = s[floor(L / 4)]``, ``Q3 = s[floor(3 L / 4)]``,
    ``IQR = Q3 - Q1``; the values in ``[Q1 - whisker IQR, Q3 + whisker IQR]`` are returned as a
    1-D tensor, ascending, in the dtype of ``embeddings``. The quartiles are exact (a full sort
    of the L values). Gradients flow to ``embeddings`` through the kept pairs, as in the
    authors' code; the fences themselves are constants (order statistics). A NaN cosine (a
    NaN embedding) is always kept, after the others, so that NaN reaches the loss. L = 0 (a
    batch of one class, or N < 2) gives an empty tensor. ``whisker >= 0``.

    Cost: the upper triangle of the pair cosines, made by blocks of rows against the rows
    after them (matrix products) and reduced at once to the block's negative pairs; memory
    O(L) for the values and their order, plus one block; no dense ``N x N`` matrix. The
    backward makes the blocks again and scatters the gradient of the kept values into them
    before two products. Backends: "auto", "cpu" and "cuda" run this blocked implementation
    with torch ops (bound by its matrix products, so no hand-written kernel and no "triton"
    backend; "cpu" / "cuda" only insist on the tensors' device); "reference" is the dense
    oracle. The length of the result depends on the data, so it reads it on the host.
    Double backward is not supported.
    """
    fn = "unpg_negatives"
    _checks.at_least(fn, 0.0, whisker=whisker)
    _check_batch(fn, embeddings, labels, None, None, normalize, None)
    if backend == "triton":
        raise ValueError(f"{fn}: no Triton kernel for unpg_negatives; its blocked implementation "
                         "is matmul-bound and runs on any device (use backend='auto')")
    _checks.choice(fn, "backend", backend, _UNPG_BACKENDS)
    if backend in ("cpu", "cuda") and embeddings.device.type != backend:
        raise ValueError(f"{fn}: backend {backend!r} runs on {backend} tensors, got tensors on "
                         f"{embeddings.device}")
    x = F.normalize(embeddings, dim=1) if normalize else embeddings
    if backend == "reference":
        values = reference.unpg_negatives(x, labels.long(), float(whisker))
    else:
        values = _UnpgNegatives.apply(x, labels.long(), float(whisker))
    return _finish(values, embeddings)


def _unpg_blocks(n: int):
    """(first row, rows) of the row blocks of the upper triangle: each block meets the rows from
    its first one on, about _MINER_BLOCK_ELEMENTS scores at a time."""
    rows = max(1, _MINER_BLOCK_ELEMENTS // max(n, 1))
    return [(i0, min(rows, n - i0)) for i0 in range(0, n, rows)]


def _unpg_block_pairs(labels: torch.Tensor, i0: int, rows: int) -> torch.Tensor:
    """[rows, N - i0] mask of the negative pairs i < j of rows i0 ... against columns i0 ...."""
    upper = torch.ones(rows, labels.shape[0] - i0, dtype=torch.bool,
                       device=labels.device).triu(1)
    return upper & (labels[i0:i0 + rows, None] != labels[None, i0:])


def _tukey_kept(ordered: torch.Tensor, whisker: float) -> torch.Tensor:
    """Mask of the ascending values `ordered` [L >= 1] inside Tukey's fences, NaN included."""
    count = ordered.numel()
    q1, q3 = ordered[count // 4], ordered[(3 * count) // 4]
    spread = q3 - q1
    inside = (ordered >= q1 - whisker * spread) & (ordered <= q3 + whisker * spread)
    return inside | ordered.isnan()


class _UnpgNegatives(torch.autograd.Function):
    """unpg_negatives on prepared rows x [N, D] (int64 labels): forward and backward by blocks
    of rows (_unpg_blocks), the scores in fp32 (fp64 for fp64).

    Forward: per block the scores S = x_blk x[i0:]^T and, in row-major order, the values of its
    negative pairs; all L of them sorted (stable), the kept ones taken with `source`, their
    positions in that row-major order. Backward: with g_l the gradient of the l-th pair value
    (0 for those not kept), d s_ij / d x_i = x_j and d s_ij / d x_j = x_i, so per block
    G [rows, N - i0] (g at the block's negative pairs, scattered back in the same order) gives
        grad x[i0 : i0 + rows] += G x[i0:],    grad x[i0:] += G^T x[i0 : i0 + rows]."""

    @staticmethod
    def forward(ctx, x, labels, whisker):
        acc = accumulation_dtype(x)
        rows_acc = x.detach().to(acc)
        blocks = _unpg_blocks(x.shape[0])
        values = []
        for i0, rows in blocks:
            scores = rows_acc[i0:i0 + rows] @ rows_acc[i0:].T
            values.append(scores[_unpg_block_pairs(labels, i0, rows)])
        values = torch.cat(values) if values else rows_acc.new_empty(0)
        ctx.num_pairs = values.numel()
        if values.numel() == 0:
            source = torch.empty(0, dtype=torch.long, device=x.device)
            ctx.save_for_backward(x, labels, source)
            return values
        ordered, order = values.sort(stable=True)
        kept = _tukey_kept(ordered, whisker)
        source = order[kept]
        ctx.save_for_backward(x, labels, source)
        return ordered[kept]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, labels, source = ctx.saved_tensors
        acc = accumulation_dtype(x)
        rows_acc = x.to(acc)
        pair_grad = rows_acc.new_zeros(ctx.num_pairs)
        pair_grad[source] = grad.to(acc)
        grad_x = torch.zeros_like(rows_acc)
        start = 0
        for i0, rows in _unpg_blocks(x.shape[0]):
            pairs = _unpg_block_pairs(labels, i0, rows)
            weights = rows_acc.new_zeros(pairs.shape)
            count = int(pairs.sum())
            weights[pairs] = pair_grad[start:start + count]
            start += count
            grad_x[i0:i0 + rows] += weights @ rows_acc[i0:]
            grad_x[i0:] += weights.T @ rows_acc[i0:i0 + rows]
        return grad_x.to(x.dtype), None, None


# ---- the losses of a batch against a reference set: the table behind the public functions -----

@dataclass(frozen=True)
class _PairLoss:
    """A pair loss of a batch against a reference set (the batch itself, a given set, or a
    memory bank that holds the batch): its public function (whose keyword-only parameters are
    the loss's options, with their defaults), the check of those options, the loss of
    prepared pairs, and the op whose backends run it."""

    function: Callable
    check: Callable
    compute: Callable
    op_name: str

    def defaults(self) -> dict:
        """The keywords of the loss and of the call (normalize, backend), not those of the
        process group, which belong to the caller (a memory bank takes its own)."""
        params = inspect.signature(self.function).parameters.values()
        return {p.name: p.default for p in params
                if p.kind is p.KEYWORD_ONLY and p.name not in _GROUP_OPTIONS}


# The public functions run through this table (_batch_loss), and so does a memory bank
# (fusedloss.nn.CrossBatchMemory, through memory_bank_loss), whose losses are its keys.
MEMORY_BANK_LOSSES = {
    "multi_similarity": _PairLoss(multi_similarity_loss, _check_multi_similarity,
                                  _multi_similarity, STATS.name),
    "supcon": _PairLoss(supcon_loss, _check_supcon, _supcon, STATS.name),
    "contrastive": _PairLoss(contrastive_loss, _check_contrastive, _contrastive, STATS.name),
    "batch_hard_triplet": _PairLoss(batch_hard_triplet_loss, _check_batch_hard_triplet,
                                    _batch_hard_triplet, EXTREMA.name),
    "orthogonal_projection": _PairLoss(orthogonal_projection_loss, _check_orthogonal_projection,
                                       _orthogonal_projection, STATS.name),
}
_CALL_OPTIONS = ("normalize", "backend")
_GROUP_OPTIONS = ("group", "ddp_grad_scale")


def _batch_loss(loss: str, embeddings, labels, ref_embeddings, ref_labels, normalize, backend,
                group=None, ddp_grad_scale=True, **options) -> torch.Tensor:
    """The body of the public function of loss `loss` (a key of MEMORY_BANK_LOSSES), errors
    named after it: its options checked (on every rank, with a group), then the loss of the
    batch against the reference set (the batch itself when None)."""
    spec = MEMORY_BANK_LOSSES[loss]
    fn = spec.function.__name__
    across = _across(fn, group, ddp_grad_scale, lambda: spec.check(fn, **options), loss,
                     sorted(options.items()), normalize, ref_embeddings is None)
    return _loss_of_pairs(spec, fn, embeddings, labels, ref_embeddings, ref_labels, normalize,
                          backend, options, across=across)


def _loss_of_pairs(spec: _PairLoss, fn: str, embeddings, labels, ref_embeddings, ref_labels,
                   normalize, backend, options: dict, self_offset=None,
                   across: Optional[_Across] = None) -> torch.Tensor:
    """Loss `spec` with its (checked) options of the prepared pairs (see _prepare), in the
    dtype of `embeddings`."""
    pairs = _prepare(fn, embeddings, labels, ref_embeddings, ref_labels, normalize, backend,
                     spec.op_name, self_offset, across)
    return _finish(spec.compute(pairs, **options), embeddings)


def memory_bank_options(fn: str, loss: str, options: dict) -> dict:
    """Every keyword of loss `loss` (a key of MEMORY_BANK_LOSSES): `options` over the defaults
    of its function, checked as the function checks them, so that a bad option raises before
    any batch; a keyword the function does not take is a TypeError."""
    _checks.choice(fn, "loss", loss, tuple(MEMORY_BANK_LOSSES))
    spec = MEMORY_BANK_LOSSES[loss]
    defaults = spec.defaults()
    unknown = sorted(k for k in options if k not in defaults)
    if unknown:
        raise TypeError(f"{fn}: {loss} takes no keyword(s) {unknown}")
    options = {**defaults, **options}
    spec.check(fn, **{k: v for k, v in options.items() if k not in _CALL_OPTIONS})
    _flag(fn, normalize=options["normalize"])
    _checks.choice(fn, "backend", options["backend"], ("auto",) + BACKENDS)
    return options


def memory_bank_loss(fn: str, loss: str, embeddings: torch.Tensor, labels: torch.Tensor,
                     bank: torch.Tensor, bank_labels: torch.Tensor, self_offset: int,
                     options: dict, group=None, ddp_grad_scale: bool = True) -> torch.Tensor:
    """Loss `loss` of the batch against a memory bank that holds it at rows
    (self_offset + i) mod M: the loss drops those pairs, mining keeps them, as PML's
    CrossBatchMemory does. `options`: every keyword of the loss, as memory_bank_options
    returns them. With a group, the batch is this rank's rows of the global batch, and the
    bank, the same on every rank, holds the global batch from slot self_offset."""
    loss_options = {k: v for k, v in options.items() if k not in _CALL_OPTIONS}
    across = _across(fn, group, ddp_grad_scale, lambda: None, loss, sorted(options.items()),
                     self_offset, tuple(bank.shape))
    return _loss_of_pairs(MEMORY_BANK_LOSSES[loss], fn, embeddings, labels, bank, bank_labels,
                          options["normalize"], options["backend"], loss_options, self_offset,
                          across)


def gather_batch(fn: str, embeddings: torch.Tensor, labels: torch.Tensor, group,
                 check: Callable[[], None]):
    """(every rank's embeddings, every rank's labels), concatenated in rank order and
    detached, after check() (this rank's inputs) and the agreement on errors on every rank
    (D and the dtype the same everywhere): what a memory bank across ranks enqueues."""

    def prepare():
        check()
        _checks.floating_tensor(fn, "embeddings", embeddings, ndim=2)
        _labels_tensor(fn, "labels", labels, embeddings.shape[0], "embeddings")
        return True

    across = _Across(group, True, lambda: None, ())
    with torch.no_grad():
        _, ranks, _ = _agree(fn, across, prepare, embeddings, None)
        return ranks.gather(embeddings.detach()), ranks.gather(labels.long())


# ---- argument checks -----------------------------------------------------------------------------

def _flag(fn, **values):
    for name, v in values.items():
        if not isinstance(v, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(v).__name__}")


def _labels_tensor(fn: str, name: str, labels, n: int, rows_of: str) -> None:
    if not torch.is_tensor(labels):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must hold integer class labels, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{fn}: {name} has {labels.shape[0]} entries but {rows_of} has {n} rows; "
                         "they must match")


def _check_batch(fn, embeddings, labels, ref_embeddings, ref_labels, normalize, self_offset):
    _flag(fn, normalize=normalize)
    _checks.floating_tensor(fn, "embeddings", embeddings, ndim=2)
    _labels_tensor(fn, "labels", labels, embeddings.shape[0], "embeddings")
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError(f"{fn}: ref_embeddings and ref_labels go together: a reference set "
                         "needs its labels, and labels need a reference set")
    if ref_embeddings is not None:
        _checks.floating_tensor(fn, "ref_embeddings", ref_embeddings, ndim=2)
        _labels_tensor(fn, "ref_labels", ref_labels, ref_embeddings.shape[0], "ref_embeddings")
        if ref_embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(f"{fn}: embeddings [N, D] and ref_embeddings [M, D] must share D, "
                             f"got {tuple(embeddings.shape)} and {tuple(ref_embeddings.shape)}")
        if ref_embeddings.dtype != embeddings.dtype:
            raise TypeError(f"{fn}: embeddings and ref_embeddings must share a dtype, got "
                            f"{embeddings.dtype} and {ref_embeddings.dtype}")
    elif self_offset is not None:
        raise ValueError(f"{fn}: self_offset needs a reference set that holds the batch")
    _checks.same_device(fn, embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                        ref_labels=ref_labels)
