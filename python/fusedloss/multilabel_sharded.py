"""The multi-label margin loss (MLCD) with the classes split across the ranks of a
torch.distributed process group: the loss and gradients those of the unsharded problem.

Rank r holds the classes J_r = [class_start, class_start + C_r); targets [N, K] hold global
class ids, the same on every rank. The ops of fusedloss.multilabel reduce the shard to its
partials (lse_neg_r, lse_pos_r), the log-sum-exps over its own negatives and positives
(-inf when empty: csrc/include/fusedloss/multilabel.h), and

    top = max_r lse_r,  shift = top where finite else 0,
    lse = shift + log sum_r exp(lse_r - shift)        (-inf when every partial is)
    loss = softplus(lse_neg) + softplus(lse_pos)

with one all_reduce(max) and one all_reduce(sum) of 2 N floats, independent of the number
of classes. Backward needs no collective on logits: the loss is the same function of the
sums on every rank, so rank r's weights dL/dlse_r = dL/dlse exp(lse_r - lse) come from
autograd through the sum (fusedloss.distributed.sum_over_ranks), and the grad op turns them
into its shard's gradient. The linear form sums the embeddings' gradient over the ranks.
Bad input on any rank raises the same error on every rank before the real collectives
(fusedloss.distributed.prepared_everywhere), never a hang."""
from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks
from . import distributed as fdist
from ._ops import reduce_rows, resolve_backend, result_dtype
from .multilabel import (STATS_OP, check_block_size, check_cos_targets, check_linear_inputs,
                         check_options, has_positive, softplus_rows)
from .multilabel_linear import _BLOCK_BYTES, FusedStats, _Plan
from .reference import multilabel as reference

_PER_RANK = ("class_start", "num_local", "num_classes", "bad_row", "bad_value", "local_error")
_SHARED = ("options.digest", "embedding_dim") + tuple(
    f"{name}.{part}" for name in ("targets", "embeddings") for part in ("size", "sum", "min", "max"))


def combine(stats: torch.Tensor, group) -> torch.Tensor:
    """The row's (lse_neg, lse_pos) [N, 2] from this shard's partials, over the ranks of
    `group` (this process alone when torch.distributed is not initialised)."""
    top = fdist.all_reduce(stats.detach(), "max", group)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = fdist.sum_over_ranks(torch.exp(stats - shift), group)
    some = total > 0
    return torch.where(some, shift + torch.log(torch.where(some, total, 1.0)), -float("inf"))


def _bad_target_row(targets, num_classes, ignore_index):
    """{bad_row, bad_value}: the first row with an entry outside [0, num_classes) that is not
    ignore_index, and that entry (bad_row = -1 when there is none)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
    if targets.numel() == 0 or not bool(bad.any()):
        return {"bad_row": -1, "bad_value": 0}
    i, k = (int(v) for v in bad.nonzero()[0])
    return {"bad_row": i, "bad_value": int(targets[i, k])}


def _prepared(fn, group, device, prepare):
    """prepare() on this rank, then the agreement on errors over the group (fdist)."""

    def row_of(prepared):
        row = dict.fromkeys(_PER_RANK + _SHARED, 0)
        if prepared is not None:
            targets, class_start, num_local, num_classes, shared = prepared[1:6]
            row.update(class_start=class_start, num_local=num_local, num_classes=num_classes,
                       **shared, **_bad_target_row(targets, num_classes, prepared[6]))
        return row

    prepared, table = fdist.prepared_everywhere(fn, group, device, prepare, row_of)
    fdist.raise_shard_errors(fn, table, _SHARED)
    return prepared


def _options(fn, scale, m1, m2, m3, margin_grad, ignore_index, reduction):
    check_options(fn, scale, m1, m2, m3, margin_grad, ignore_index, reduction)
    return (float(scale), float(m1), float(m2), float(m3), margin_grad == "detached")


def sharded_multilabel_margin_cross_entropy(
    local_cos: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_start: int,
    num_classes: int,
    group=None,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    margin_grad: str = "exact",
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`fusedloss.multilabel_margin_cross_entropy` with the classes split across the
    ranks of ``group`` (None: the default group; without torch.distributed initialised, this
    process alone).

    ``local_cos [N, C_local]`` holds the cosines of classes ``[class_start, class_start +
    C_local)`` on this rank; the ranks' shards must tile ``[0, num_classes)`` (uneven and
    empty shards are fine). ``targets [N, K]`` hold global class ids, identical on every
    rank. Every rank returns the loss of the unsharded problem and ``local_cos`` gets the
    gradient of its shard. Keywords as in multilabel_margin_cross_entropy. Traffic: one
    all_reduce of about 20 W int64 (the agreement on errors), then all_reduce(max) and
    all_reduce(sum) of 2 N floats each; backward, none.
    """
    fn = "sharded_multilabel_margin_cross_entropy"

    def prepare():
        hyper = _options(fn, scale, m1, m2, m3, margin_grad, ignore_index, reduction)
        check_cos_targets(fn, "local_cos", local_cos, targets)
        _checks.integer(fn, class_start=class_start, num_classes=num_classes)
        chosen = resolve_backend(backend, local_cos.device, STATS_OP.name)
        shared = {"options.digest": fdist.fingerprint(hyper, str(local_cos.dtype), reduction,
                                                      ignore_index), "embedding_dim": 0,
                  **fdist.tensor_summary("targets", targets),
                  **fdist.tensor_summary("embeddings", None)}
        return (chosen, targets.long(), class_start, local_cos.shape[1], num_classes, shared,
                ignore_index, hyper)

    chosen, t, start, _, total, _, _, hyper = _prepared(fn, group, _device_of(local_cos),
                                                        prepare)
    stats_of = reference.multilabel_margin_stats if chosen == "reference" else \
        STATS_OP.for_backend(chosen)
    stats = stats_of(local_cos, t, *hyper, start, total, ignore_index)
    return _loss(combine(stats, group), t, ignore_index, reduction, result_dtype(local_cos))


def linear_sharded_multilabel_margin_cross_entropy(
    embeddings: torch.Tensor,
    weight_shard: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_start: int,
    num_classes: int,
    group=None,
    normalize: bool = True,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    margin_grad: str = "exact",
    ignore_index: int = -100,
    reduction: str = "mean",
    block_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`fusedloss.linear_multilabel_margin_cross_entropy` with the class centres split
    across the ranks of ``group``: ``weight_shard [C_local, D]`` holds the classes
    ``[class_start, class_start + C_local)``; ``embeddings [N, D]`` and ``targets [N, K]``
    are the same on every rank. No ``N x C_local`` block is stored; the embeddings' gradient
    is summed over the ranks in backward (one all_reduce of N D floats). Keywords as in
    sharded_multilabel_margin_cross_entropy and linear_multilabel_margin_cross_entropy.
    """
    return linear_sharded("linear_sharded_multilabel_margin_cross_entropy", embeddings,
                          weight_shard, targets, class_start=class_start,
                          num_classes=num_classes, group=group, normalize=normalize,
                          scale=scale, m1=m1, m2=m2, m3=m3, margin_grad=margin_grad,
                          ignore_index=ignore_index, reduction=reduction, block_size=block_size,
                          backend=backend)


def linear_sharded(fn, embeddings, weight_shard, targets, *, class_start, num_classes, group,
                   normalize, scale, m1, m2, m3, margin_grad, ignore_index, reduction,
                   block_size, backend, reduce_embedding_grad=True):
    """linear_sharded_multilabel_margin_cross_entropy, named `fn` in errors; with
    reduce_embedding_grad=False the embeddings' gradient is this shard's only (nn.PartialFC
    sums it over the ranks in its all-gather's backward)."""

    def prepare():
        hyper = _options(fn, scale, m1, m2, m3, margin_grad, ignore_index, reduction)
        check_linear_inputs(fn, embeddings, "weight_shard", weight_shard, "C_local", targets)
        _checks.integer(fn, class_start=class_start, num_classes=num_classes)
        check_block_size(fn, block_size)
        chosen = resolve_backend(backend, embeddings.device, STATS_OP.name)
        shared = {"options.digest": fdist.fingerprint(hyper, str(embeddings.dtype), reduction,
                                                      ignore_index, bool(normalize)),
                  "embedding_dim": embeddings.shape[1],
                  **fdist.tensor_summary("targets", targets),
                  **fdist.tensor_summary("embeddings", embeddings)}
        return (chosen, targets.long(), class_start, weight_shard.shape[0], num_classes, shared,
                ignore_index, hyper)

    chosen, t, start, c_local, total, _, _, hyper = _prepared(fn, group,
                                                              _device_of(embeddings), prepare)
    x = F.normalize(embeddings) if normalize else embeddings
    reduce_over = group if reduce_embedding_grad and fdist.initialized() else False
    if chosen == "reference":  # the dense oracle: the N x C_local cosines, then the stats
        w = F.normalize(weight_shard) if normalize else weight_shard
        if reduce_over is not False:
            x = _GradSummedOverRanks.apply(x, reduce_over)
        stats = reference.multilabel_margin_stats(x @ w.t(), t, *hyper, start, total,
                                                  ignore_index)
        return _loss(combine(stats, group), t, ignore_index, reduction,
                     result_dtype(embeddings))
    rows = block_size or max(1, _BLOCK_BYTES // (max(c_local, 1) * 4))
    plan = _Plan(chosen, hyper + (start, total, ignore_index), min(rows, max(t.shape[0], 1)),
                 bool(normalize), ignore_index)
    stats = FusedStats.apply(x, weight_shard, t, plan, reduce_over)
    return _loss(combine(stats, group), t, ignore_index, reduction, result_dtype(embeddings))


class _GradSummedOverRanks(torch.autograd.Function):
    """x itself; backward sums its gradient over the ranks (x is the same on every rank and
    each rank's loss differentiates its own classes only)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return fdist.all_reduce(grad, "sum", ctx.group, kind=fdist.EMBEDDING_GRAD), None


def _loss(lse, targets, ignore_index, reduction, dtype):
    valid = has_positive(targets, ignore_index)
    rows = torch.where(valid, softplus_rows(lse), lse.new_zeros(()))
    return reduce_rows(rows, valid, reduction, dtype)


def _device_of(x):
    return x.device if torch.is_tensor(x) else torch.device("cpu")
