"""Sharded margin softmax cross-entropy: the classes split across the ranks of a
torch.distributed process group, the loss and gradients those of the unsharded problem.

Rank r holds the classes [class_start, class_start + C_local) of every row; target holds
global class ids. The four ops (contracts in python/fusedloss/_schemas.py, oracle in
fusedloss.reference.sharded) reduce a shard to per-row partials and turn combined per-row
coefficients back into the shard's gradient; this module combines the partials across
ranks. With z_j = s c_j and z_y the margin logit (csrc/include/fusedloss/margin.h), each
rank's partials are (lse_other_r = log sum_{local j != y} exp(z_j), z_y where y is local
else 0, sum_z_r = sum_{local j} z_j), and

    M = max_r lse_other_r,  shift = M where finite else 0
    [T, z_y, sum_z] = sum_r [exp(lse_other_r - shift), z_y_r, sum_z_r]
    lse_o = shift + log T,  lse = logaddexp(lse_o, z_y)
    loss = softplus(lse_o - z_y) + eps (z_y - sum_z / C) + lambda lse^2

(softplus(lse_o - z_y) = lse - z_y, accurate when p_y ~ 1; eps = label_smoothing, C the
global number of classes; cross-entropy with label smoothing is lse - (1 - eps) z_y -
(eps / C) sum_j z_j). With r_i = d L / d loss_i and g = 2 lambda lse, the gradient of the
row's loss is p_j (1 + g) - eps / C for j != y and (1 + g) p_y - (1 - eps) - eps / C at y;
with 1 - p_y = exp(lse_o - lse) kept accurate this is the coefficient set
    coef = (lse, a, b, d),  a = r (1 + g),  b = r eps / C,
    d = r (eps - eps / C - exp(lse_o - lse) + g exp(z_y - lse)),
    grad_ij = s (a exp(s c_ij - lse) - b)  (j != y),  grad_iy = (d z_y / d c_y) d.

The same combine is the epilogue engine of the single-process margin ops (margin_cross_entropy
and its linear form run through it, on this process alone, for the options below; see
`local_margin_loss`). Each option changes the combined row, the loss or the coefficients:

* extra_negatives e [L] (UNPG's shared columns, appended as s e_l to every row): the columns
  are the same in every row, so their whole share of the partition function is one number,
  E = log sum_l exp(s e_l), and the row becomes
      lse_o' = logaddexp(lse_o, E),  lse' = logaddexp(lse_o', z_y),
      sum_z' = sum_z + s sum_l e_l,  C' = C + L,
  after which the loss and coefficients above hold unchanged with (lse_o', lse', sum_z', C').
  The gradient of column l summed over the rows is
      dL/de_l = s sum_i (a_i exp(s e_l - lse'_i) - b_i)
              = s (exp(s e_l - m) sum_i a_i exp(m - lse'_i) - sum_i b_i),  m = min_i lse'_i,
  O(N + L) and free of overflow: s e_l <= E <= lse'_i, so neither exponential exceeds 1.
* tau (the comp-sum family of Mao, Mohri and Zhong, 2023): with ce = -log p_y =
  softplus(lse_o - z_y) the row's loss is (p_y^(tau - 1) - 1) / (1 - tau) =
  expm1((1 - tau) ce) / (1 - tau) (ce itself at tau = 1, where the branch is skipped, so
  tau = 1 is the plain loss bit for bit), and its gradient is w times that of ce,
  w = exp((1 - tau) ce) = p_y^(tau - 1): a = r (w + g), d = r (-w exp(lse_o - lse) + g p_y)
  (label smoothing is refused with tau != 1, so eps = 0 here). For tau < 1 the loss and w
  overflow to inf where the exact value exceeds the accumulation dtype (as the math says).
* return_lse: lse' is a second output of every row; its incoming gradient q_i adds
  q_i dlse'/dz_j = q_i p_j: a += q, d += q exp(z_y - lse'), and q_i exp(s e_l - lse'_i) to
  the extra columns (through a, since it only adds to a).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import _checks
from . import distributed as fdist
from ._ops import Op, accumulation_dtype, reduce_rows, resolve_backend, result_dtype
from .margin import (MarginOptions, check_generator, elastic_margins, margin_keywords,
                     options_of)
from .margin_linear import check_block_size, kernel_block_size
from .reference import sharded as reference


def _stats_fake(cos, target, row_m2, row_m3, scale, m1, m2, m3, class_start, ignore_index,
                softcap=0.0, filter_threshold=0.0):
    return cos.new_empty(cos.shape[0], 3, dtype=accumulation_dtype(cos))


def _grad_fake(cos, target, row_m2, row_m3, coef, scale, m1, m2, m3, detach_margin,
               class_start, ignore_index, softcap=0.0, filter_threshold=0.0):
    return cos.new_empty(cos.shape)


def _linear_stats_fake(x, w, target, row_m2, row_m3, scale, m1, m2, m3, normalize, class_start,
                       ignore_index, block_size, softcap=0.0, filter_threshold=0.0):
    return x.new_empty(x.shape[0], 3, dtype=accumulation_dtype(x))


def _linear_grad_fake(x, w, target, row_m2, row_m3, coef, scale, m1, m2, m3, detach_margin,
                      normalize, class_start, ignore_index, block_size, softcap=0.0,
                      filter_threshold=0.0):
    return x.new_empty(x.shape), w.new_empty(w.shape)


def _grad_inplace_fake(cos, *args):
    return None


# No op-level autograd: the autograd functions below differentiate through the collectives.
STATS = Op("sharded", "sharded_margin_stats", fake=_stats_fake)
GRAD = Op("sharded", "sharded_margin_grad", fake=_grad_fake)
LINEAR_STATS = Op("sharded", "sharded_margin_linear_stats", fake=_linear_stats_fake)
LINEAR_GRAD = Op("sharded", "sharded_margin_linear_grad", fake=_linear_grad_fake)


# The grad op that overwrites cos with its gradient (inplace_backward). It mutates its input,
# so it has no Op (whose Triton twin and autograd are for functional ops): the CPU kernel
# comes through the dispatcher, the Triton launcher is called as it is.
GRAD_INPLACE = "sharded_margin_grad_inplace"
torch.library.register_fake(f"fusedloss::{GRAD_INPLACE}")(_grad_inplace_fake)


def kernel(op: Op, backend: str) -> Callable:
    """The implementation of `op` on `backend` (the dense oracle for "reference")."""
    return getattr(reference, op.name) if backend == "reference" else op.for_backend(backend)


def grad_inplace(backend: str) -> Callable:
    """The implementation of sharded_margin_grad_inplace on `backend` (cpu or triton)."""
    if backend == "triton":
        from fusedloss.triton_kernels.sharded import sharded_margin_grad_inplace
        return sharded_margin_grad_inplace
    return getattr(torch.ops.fusedloss, GRAD_INPLACE).default


# --- combining the partials (shared by the collectives and the in-process simulation) -------

def combine_partials(stats: torch.Tensor, reduce_max: Callable,
                     reduce_sum: Callable) -> torch.Tensor:
    """[N, 4] = (lse_other, z_y, sum_z, lse) of the whole row from this shard's stats [..., N, 3].

    reduce_max / reduce_sum reduce a tensor over the shards: all_reduce across ranks, or a
    reduction over the leading dimension of stacked shards [S, N, 3] in one process."""
    top = reduce_max(stats[..., 0])
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    terms = torch.stack([torch.exp(stats[..., 0] - shift), stats[..., 1], stats[..., 2]], dim=-1)
    total, z_y, sum_z = reduce_sum(terms).unbind(-1)
    lse_other = shift + torch.log(total)
    return torch.stack([lse_other, z_y, sum_z, torch.logaddexp(lse_other, z_y)], dim=1)


def with_extra_columns(rows: torch.Tensor, extra: Optional[torch.Tensor], scale: float,
                       num_classes: int):
    """(rows, C) with the shared columns s e_l of `extra` [L] joined to every row (see the
    module docstring): (lse_o', z_y, sum_z', lse') and C + L; the rows unchanged without."""
    if extra is None:
        return rows, num_columns_of(num_classes, None)
    e = scale * extra.to(rows.dtype)
    lse_other, z_y, sum_z, _ = rows.unbind(1)
    lse_other = torch.logaddexp(lse_other, torch.logsumexp(e, dim=0))
    rows = torch.stack([lse_other, z_y, sum_z + e.sum(), torch.logaddexp(lse_other, z_y)], dim=1)
    return rows, num_columns_of(num_classes, extra)


def num_columns_of(num_classes: int, extra: Optional[torch.Tensor]) -> int:
    return num_classes + (0 if extra is None else extra.shape[0])


def row_losses(rows: torch.Tensor, valid: torch.Tensor, opts: MarginOptions,
               num_classes: int) -> torch.Tensor:
    """Per-row loss [N] from the combined rows (0 for ignored rows)."""
    lse_other, z_y, sum_z, lse = rows.unbind(1)
    eps, lam = opts.label_smoothing, opts.lse_square_scale
    ce = F.softplus(lse_other - z_y)
    if opts.tau != 1.0:
        ce = torch.expm1((1.0 - opts.tau) * ce) / (1.0 - opts.tau)
    loss = ce + eps * (z_y - sum_z / num_classes) + lam * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def grad_coefficients(rows: torch.Tensor, grad_rows: torch.Tensor, valid: torch.Tensor,
                      opts: MarginOptions, num_classes: int,
                      grad_lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """coef [N, 4] = (lse, a, b, d) of the grad ops (zeros for ignored rows); grad_lse: the
    incoming gradient of the lse output (return_lse), None when there is none."""
    lse_other, z_y, _, lse = rows.unbind(1)
    zero = torch.zeros_like(lse)
    r = torch.where(valid, grad_rows.to(rows.dtype), zero)
    eps = opts.label_smoothing
    g = 2.0 * opts.lse_square_scale * lse
    w = 1.0 if opts.tau == 1.0 else torch.exp((1.0 - opts.tau) * F.softplus(lse_other - z_y))
    a = r * (w + g)
    b = r * (eps / num_classes)
    d = r * (eps - eps / num_classes - w * torch.exp(lse_other - lse) + g * torch.exp(z_y - lse))
    if grad_lse is not None:
        q = torch.where(valid, grad_lse.to(rows.dtype), zero)
        a = a + q
        d = d + q * torch.exp(z_y - lse)
    return torch.stack([torch.where(valid, lse, zero), a, b, d], dim=1)


def extra_columns_grad(coef: torch.Tensor, valid: torch.Tensor, extra: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """dL/de_l = s (exp(s e_l - m) sum_i a_i exp(m - lse'_i) - sum_i b_i), m = min_i lse'_i
    over the rows that are not ignored (module docstring), in the dtype of `extra`."""
    lse, a, b, _ = coef.unbind(1)
    inf = lse.new_full((1,), float("inf"))  # the min of an empty batch: +inf, then 0
    m = torch.cat([torch.where(valid, lse, torch.full_like(lse, float("inf"))), inf]).amin()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    weight = torch.where(valid, a * torch.exp(m - lse), torch.zeros_like(a)).sum()
    e = scale * extra.to(coef.dtype)
    return (scale * (torch.exp(e - m) * weight - b.sum())).to(extra.dtype)


def _reducers(group):
    """(reduce_max, reduce_sum) across the ranks of group, for combine_partials."""
    return (lambda t: fdist.all_reduce(t, "max", group),
            lambda t: fdist.all_reduce(t, "sum", group))


# --- the autograd functions -------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """What a sharded call needs besides its tensors: the options, the backend, the group and
    this rank's place in the class space."""

    opts: MarginOptions
    backend: str
    group: object
    class_start: int
    num_classes: int
    normalize: bool = True
    block_size: int = 0  # as the op schemas take it: 0 means the backend chooses
    reduce_embedding_grad: bool = True  # False: the caller sums grad_embeddings itself
    local: bool = False  # True: this process holds every class; no collective at all
    inplace: bool = False  # True: backward writes the gradient into cos's storage

    def margins(self):
        o = self.opts
        return float(o.scale), float(o.m1), float(o.m2), float(o.m3)

    def transform(self):
        """softcap (0: none) and filter_threshold, the ops' last arguments (margin.h's logit
        transforms)."""
        o = self.opts
        return (0.0 if o.softcap is None else float(o.softcap),
                float(o.interclass_filtering_threshold))

    @property
    def detach_margin(self) -> bool:
        return self.opts.margin_grad == "detached"


def _empty_shard_stats(n, dtype, device):
    """The partials of a shard without classes: no logits, so (-inf, 0, 0) on every row."""
    stats = torch.zeros(n, 3, dtype=dtype, device=device)
    stats[:, 0] = -float("inf")
    return stats


def _combined_losses(ctx, stats, target, extra, shard: Shard, *saved):
    """Forward after this shard's stats: combine them across the ranks (not when local), join
    the extra columns, keep what backward needs, and return (per-row loss, per-row lse')."""
    reducers = (lambda t: t, lambda t: t) if shard.local else _reducers(shard.group)
    rows = combine_partials(stats, *reducers)
    rows, num_columns = with_extra_columns(rows, extra, float(shard.opts.scale),
                                           shard.num_classes)
    ctx.shard = shard
    ctx.num_columns = num_columns
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*saved, target, rows, extra)
    valid = target != shard.opts.ignore_index
    lse = torch.where(valid, rows[:, 3], torch.zeros_like(rows[:, 3]))
    return row_losses(rows, valid, shard.opts, num_columns), lse


def _saved_coefficients(ctx, grad_rows, grad_lse):
    """(the tensors forward saved before target, target, coef, the gradient of the extra
    columns or None) in backward."""
    *saved, target, rows, extra = ctx.saved_tensors
    shard = ctx.shard
    valid = target != shard.opts.ignore_index
    if grad_rows is None:
        grad_rows = torch.zeros_like(rows[:, 0])
    coef = grad_coefficients(rows, grad_rows, valid, shard.opts, ctx.num_columns, grad_lse)
    grad_extra = None
    if extra is not None and ctx.needs_input_grad[ctx.extra_input]:
        grad_extra = extra_columns_grad(coef, valid, extra, float(shard.opts.scale))
    return saved, target, coef, grad_extra


class _ShardedMarginLoss(torch.autograd.Function):
    """cos [N, C_local] -> per-row loss [N]: stats op, two all_reduces, the combined loss."""

    @staticmethod
    def forward(ctx, cos, target, row_m2, row_m3, extra, shard: Shard):
        if cos.shape[1] == 0:
            stats = _empty_shard_stats(cos.shape[0], accumulation_dtype(cos), cos.device)
        else:
            stats = kernel(STATS, shard.backend)(cos, target, row_m2, row_m3, *shard.margins(),
                                                 shard.class_start, shard.opts.ignore_index,
                                                 *shard.transform())
        ctx.extra_input = 4
        return _combined_losses(ctx, stats, target, extra, shard, cos, row_m2, row_m3)

    @staticmethod
    def backward(ctx, grad_rows, grad_lse):
        (cos, row_m2, row_m3), target, coef, grad_extra = _saved_coefficients(ctx, grad_rows,
                                                                              grad_lse)
        shard = ctx.shard
        if cos.shape[1] == 0:
            return torch.zeros_like(cos), None, None, None, grad_extra, None
        args = (target, row_m2, row_m3, coef, *shard.margins(), shard.detach_margin,
                shard.class_start, shard.opts.ignore_index, *shard.transform())
        if shard.inplace and shard.backend != "reference":
            # cos was saved unmodified (saved_tensors checked its version); from here on its
            # storage is the gradient, and its version moves on, so that any other node that
            # saved cos raises when it unpacks it instead of reading a gradient as cosines.
            grad_inplace(shard.backend)(cos, *args)
            torch.autograd.graph.increment_version(cos)
            return cos, None, None, None, grad_extra, None
        grad = kernel(GRAD, shard.backend)(cos, *args)
        return grad, None, None, None, grad_extra, None


class _LinearShardedMarginLoss(torch.autograd.Function):
    """(embeddings [N, D], weight shard [C_local, D]) -> per-row loss [N], never storing the
    N x C_local block; backward sums grad_embeddings over the ranks (unless the caller does)."""

    @staticmethod
    def forward(ctx, x, w, target, row_m2, row_m3, extra, shard: Shard):
        if w.shape[0] == 0:
            stats = _empty_shard_stats(x.shape[0], accumulation_dtype(x), x.device)
        else:
            stats = kernel(LINEAR_STATS, shard.backend)(
                x, w, target, row_m2, row_m3, *shard.margins(), shard.normalize,
                shard.class_start, shard.opts.ignore_index, shard.block_size, *shard.transform())
        ctx.extra_input = 5
        return _combined_losses(ctx, stats, target, extra, shard, x, w, row_m2, row_m3)

    @staticmethod
    def backward(ctx, grad_rows, grad_lse):
        (x, w, row_m2, row_m3), target, coef, grad_extra = _saved_coefficients(ctx, grad_rows,
                                                                               grad_lse)
        shard = ctx.shard
        if w.shape[0] == 0:
            grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(w)
        else:
            grad_x, grad_w = kernel(LINEAR_GRAD, shard.backend)(
                x, w, target, row_m2, row_m3, coef, *shard.margins(), shard.detach_margin,
                shard.normalize, shard.class_start, shard.opts.ignore_index, shard.block_size,
                *shard.transform())
        if shard.reduce_embedding_grad:  # every rank, whatever needs_input_grad says there
            grad_x = fdist.all_reduce(grad_x, "sum", shard.group,
                                      kind=fdist.EMBEDDING_GRAD)
        return grad_x, grad_w, None, None, None, grad_extra, None


# --- the public functions ---------------------------------------------------------------------

def check_options(fn: str, opts: MarginOptions) -> None:
    """MarginOptions.check, and the refusal of elastic_plus, which no sharded op supports."""
    opts.check(fn)
    if opts.elastic_plus:
        raise ValueError(f"{fn}: elastic_plus=True is not supported when sharded (it ranks every "
                         "row's target cosine against all others before the loss); use "
                         "m2_std / m3_std without elastic_plus")


def _check_class_range(fn, class_start, num_classes):
    _checks.integer(fn, class_start=class_start, num_classes=num_classes)


# The table row of the agreement on errors: the same keys on every rank and in every call.
_PER_RANK = ("class_start", "num_local", "num_classes", "bad_row", "bad_value", "local_error")
_SHARED = ("options.digest", "embedding_dim") + tuple(
    f"{name}.{part}" for name in ("target", "elastic_m2_draws", "elastic_m3_draws",
                                  "extra_negatives", "embeddings")
    for part in ("size", "sum", "min", "max"))


@dataclass
class _Prepared:
    """A call checked on this rank: its shard, tensors and the values every rank must share."""

    shard: Shard
    target: torch.Tensor
    row_m2: Optional[torch.Tensor]
    row_m3: Optional[torch.Tensor]
    num_local: int
    shared: dict


def _shared_values(opts, plain, target, row_m2, row_m3, embeddings=None, embedding_dim=0,
                   extra=None):
    """The values every rank must share: the options (with `plain` values), the target, the
    elastic draws, the extra negative columns and, for the linear function, the embeddings."""
    return {"options.digest": fdist.fingerprint(opts, *plain), "embedding_dim": embedding_dim,
            **fdist.tensor_summary("target", target),
            **fdist.tensor_summary("elastic_m2_draws", row_m2),
            **fdist.tensor_summary("elastic_m3_draws", row_m3),
            **fdist.tensor_summary("extra_negatives", extra),
            **fdist.tensor_summary("embeddings", embeddings)}


def _prepared_everywhere(fn, group, device, prepare) -> _Prepared:
    """prepare() (this rank's checks and set-up), then the one small collective before the
    real ones (fusedloss.distributed.prepared_everywhere), so that bad input on any rank
    raises on every rank and never hangs the group: a rank whose own checks failed raises its
    own error, the others say which rank failed; otherwise every rank raises the same error
    for the problems that only the table shows (see fusedloss.distributed.raise_shard_errors)."""

    def row_of(prepared):
        row = dict.fromkeys(_PER_RANK + _SHARED, 0)
        if prepared is not None:
            shard = prepared.shard
            row.update(class_start=shard.class_start, num_local=prepared.num_local,
                       num_classes=shard.num_classes, **prepared.shared,
                       **fdist.bad_target(prepared.target, shard.num_classes,
                                          shard.opts.ignore_index))
        return row

    prepared, table = fdist.prepared_everywhere(fn, group, device, prepare, row_of)
    fdist.raise_shard_errors(fn, table, _SHARED)
    return prepared


@margin_keywords
def sharded_margin_cross_entropy(
    local_cos: torch.Tensor,
    target: torch.Tensor,
    *,
    class_start: int,
    num_classes: int,
    group=None,
    generator: Optional[torch.Generator] = None,
    extra_negatives: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
    **margin,
):
    """:func:`fusedloss.margin_cross_entropy` with the classes split across the ranks of
    ``group`` (None: the default group; without torch.distributed initialised, this process
    alone, with no collective).

    ``local_cos [N, C_local]`` holds the cosines of classes ``[class_start, class_start +
    C_local)`` on this rank; the ranks' shards must tile ``[0, num_classes)`` (uneven shards
    and empty ones are fine; :func:`fusedloss.distributed.shard_range` gives the usual split).
    ``target [N]`` holds global class ids and must be identical on every rank. Every rank
    returns the loss of ``margin_cross_entropy`` on the concatenated ``[N, num_classes]``
    cosines, and ``local_cos`` gets the gradient of its shard.

    Margin keywords, with the defaults, meaning and checks of margin_cross_entropy:
    ``scale``, ``m1``, ``m2``, ``m3``, ``m2_std``, ``m3_std``, ``generator``, ``margin_grad``,
    ``label_smoothing``, ``lse_square_scale``, ``tau``, ``softcap``,
    ``interclass_filtering_threshold``, ``ignore_index`` and ``reduction``; ``extra_negatives``
    and ``return_lse`` as in margin_cross_entropy: every rank passes the same ``e`` (compared
    by the agreement on errors), its columns count once in the combined partition function,
    and every rank's ``e`` gets the full gradient. ``inplace_backward`` as in
    margin_cross_entropy: backward writes this shard's gradient into ``local_cos``.
    ElasticFace margins are drawn on every rank: give every rank a generator with the same
    seed (draws that differ are an error). ``elastic_plus=True`` is refused: it ranks every
    row's target cosine against all others before the loss. ``backend``: "auto",
    "reference", "cpu", "triton" (there is no CUDA C++ kernel, so auto picks triton for CUDA
    tensors).

    Bad input on any rank (a target outside [0, num_classes), targets, options or
    num_classes that differ across ranks, shards that do not tile the classes) raises the
    same ValueError on every rank before the real collectives, never a hang.

    Traffic per call (W ranks, N rows; fp32 partials, fp64 for fp64 input): one all_reduce
    of about 20 W int64 (the agreement on errors), then all_reduce(max) of N floats and
    all_reduce(sum) of 3N floats, 16 N bytes in fp32, independent of the number of classes
    (a ring all_reduce sends about 2 (W - 1) / W times its payload per rank). Backward needs
    no collective.
    """
    fn = "sharded_margin_cross_entropy"
    opts = options_of(fn, margin)

    def prepare():
        check_options(fn, opts)
        _checks.floating_tensor(fn, "local_cos", local_cos, ndim=2)
        _checks.target_tensor(fn, target, local_cos.shape[0])
        _checks.same_device(fn, local_cos=local_cos, target=target)
        _check_class_range(fn, class_start, num_classes)
        check_generator(fn, generator, local_cos.device)
        check_extra_negatives(fn, extra_negatives, "local_cos", local_cos)
        check_inplace(fn, inplace_backward, local_cos, "local_cos")
        chosen = resolve_backend(backend, local_cos.device, STATS.name)
        row_m2, row_m3 = elastic_margins(opts, target, None, accumulation_dtype(local_cos),
                                         generator)
        shared = _shared_values(opts, (str(local_cos.dtype), bool(return_lse)), target, row_m2,
                                row_m3, extra=extra_negatives)
        return _Prepared(Shard(opts, chosen, group, class_start, num_classes,
                               inplace=bool(inplace_backward)), target.long(),
                         row_m2, row_m3, local_cos.shape[1], shared)

    p = _prepared_everywhere(fn, group, _device_of(local_cos), prepare)
    out = _ShardedMarginLoss.apply(local_cos, p.target, p.row_m2, p.row_m3, extra_negatives,
                                   p.shard)
    return reduced(out, p.target, p.shard.opts, result_dtype(local_cos), return_lse)


def reduced(rows_and_lse, target, opts: MarginOptions, dtype, return_lse: bool):
    """The reduced loss of the autograd functions' (per-row loss, per-row lse'), and with
    return_lse the lse' rows too (accumulation dtype, 0 for ignored rows)."""
    rows, lse = rows_and_lse
    loss = reduce_rows(rows, target != opts.ignore_index, opts.reduction, dtype)
    return (loss, lse) if return_lse else loss


def check_inplace(fn: str, inplace: bool, cos: torch.Tensor, name: str = "cos") -> None:
    """inplace_backward needs a contiguous cos that requires grad (its storage becomes the
    gradient); whether cos is needed elsewhere is checked by autograd's version counter."""
    if not inplace:
        return
    if not cos.requires_grad:
        raise ValueError(f"{fn}: inplace_backward=True needs {name} that requires grad (its "
                         "storage becomes its gradient)")
    if not cos.is_contiguous():
        raise ValueError(f"{fn}: inplace_backward=True needs a contiguous {name} (its storage "
                         "becomes its gradient)")


def check_extra_negatives(fn: str, extra, like_name: str, like: torch.Tensor) -> None:
    """extra_negatives is None or a 1-D tensor of the dtype and device of `like`."""
    if extra is None:
        return
    _checks.floating_tensor(fn, "extra_negatives", extra, ndim=1)
    if extra.dtype != like.dtype:
        raise TypeError(f"{fn}: extra_negatives must have the dtype of {like_name} "
                        f"({like.dtype}), got {extra.dtype}")
    _checks.same_device(fn, **{like_name: like, "extra_negatives": extra})


def local_margin_loss(cos, target, row_m2, row_m3, opts: MarginOptions, backend: str,
                      extra_negatives, return_lse: bool, inplace: bool = False):
    """margin_cross_entropy through the stats engine, on this process alone (no collective):
    the stats op, the combine and epilogue above, the grad op in backward (writing into cos
    with inplace)."""
    shard = Shard(opts, backend, None, 0, cos.shape[1], local=True, inplace=inplace)
    out = _ShardedMarginLoss.apply(cos, target, row_m2, row_m3, extra_negatives, shard)
    return reduced(out, target, opts, result_dtype(cos), return_lse)


def local_linear_margin_loss(x, w, target, row_m2, row_m3, opts: MarginOptions, backend: str,
                             normalize: bool, block_size: int, extra_negatives,
                             return_lse: bool):
    """linear_margin_cross_entropy through the stats engine, on this process alone: the
    linear stats op in forward, the linear grad op (the matmul recomputed) in backward."""
    shard = Shard(opts, backend, None, 0, w.shape[0], bool(normalize), block_size,
                  reduce_embedding_grad=False, local=True)
    out = _LinearShardedMarginLoss.apply(x, w, target, row_m2, row_m3, extra_negatives, shard)
    return reduced(out, target, opts, result_dtype(x), return_lse)


def _device_of(x):
    return x.device if torch.is_tensor(x) else torch.device("cpu")


@margin_keywords
def linear_sharded_margin_cross_entropy(
    embeddings: torch.Tensor,
    weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    class_start: int,
    num_classes: int,
    group=None,
    generator: Optional[torch.Generator] = None,
    normalize: bool = True,
    block_size: Optional[int] = None,
    extra_negatives: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
    **margin,
):
    """:func:`fusedloss.linear_margin_cross_entropy` with the classifier's rows split across
    the ranks of ``group``: ``weight_shard [C_local, D]`` holds the rows of classes
    ``[class_start, class_start + C_local)``, and no rank ever stores its ``N x C_local``
    block of cosines, in forward or backward.

    ``embeddings [N, D]`` and ``target [N]`` (global class ids) must be identical on every
    rank. Every rank returns the loss of the unsharded problem; ``weight_shard`` gets the
    gradient of its rows, and ``embeddings`` the full gradient (summed over the ranks) on
    every rank.

    Keywords: ``class_start``, ``num_classes``, ``group``, the margin keywords (``scale``,
    ``m1``, ``m2``, ``m3``, ``m2_std``, ``m3_std``, ``elastic_plus``, ``generator``,
    ``margin_grad``, ``label_smoothing``, ``lse_square_scale``, ``tau``, ``softcap``,
    ``interclass_filtering_threshold``, ``ignore_index``, ``reduction``), ``extra_negatives``,
    ``return_lse`` and ``backend`` are those of :func:`sharded_margin_cross_entropy`, with its
    agreement on errors and its ElasticFace rule; ``normalize`` and ``block_size`` (a
    positive int; None: the backend chooses) are those of
    :func:`fusedloss.linear_margin_cross_entropy`.

    Traffic per call: forward as :func:`sharded_margin_cross_entropy` (16 N bytes combined,
    independent of the number of classes, plus the agreement on errors, which also compares
    a checksum of the embeddings); backward all_reduces the N x D embedding gradient (N D
    elements of the embeddings' dtype), independent of the number of classes too, since every
    rank gets all of it (:class:`fusedloss.nn.PartialFC`, whose ranks need only their own
    rows, reduce-scatters it instead: half the traffic).
    """
    fn = "linear_sharded_margin_cross_entropy"
    opts = options_of(fn, margin)
    return linear_sharded(fn, embeddings, weight_shard, target, opts, class_start=class_start,
                          num_classes=num_classes, group=group, normalize=normalize,
                          block_size=block_size, backend=backend, generator=generator,
                          reduce_embedding_grad=True, extra_negatives=extra_negatives,
                          return_lse=return_lse)


def linear_sharded(fn: str, embeddings, weight_shard, target, opts: MarginOptions, *,
                   class_start, num_classes, group, normalize, block_size, backend, generator,
                   reduce_embedding_grad, extra_negatives=None, return_lse=False):
    """linear_sharded_margin_cross_entropy with its options in `opts` and errors named after
    `fn` (also the entry point of fusedloss.nn.PartialFC). With reduce_embedding_grad=False
    every rank's embedding gradient is its shard's contribution alone: PartialFC sums it in
    the backward of its all-gather instead, by a reduce-scatter that hands each rank the sum
    of its own rows only (fusedloss.distributed.reduce_scatter_rows), and its gathered
    embeddings are the same on every rank by construction, so they are not compared."""

    def prepare():
        check_options(fn, opts)
        _checks.embeddings_and_weight(fn, embeddings, weight_shard, target, "weight_shard",
                                      "C_local")
        _check_class_range(fn, class_start, num_classes)
        check_block_size(fn, block_size)
        check_generator(fn, generator, embeddings.device)
        check_extra_negatives(fn, extra_negatives, "embeddings", embeddings)
        chosen = resolve_backend(backend, embeddings.device, LINEAR_STATS.name)
        row_m2, row_m3 = elastic_margins(opts, target, None, accumulation_dtype(embeddings),
                                         generator)
        shared = _shared_values(opts, (str(embeddings.dtype), bool(normalize), bool(return_lse)),
                                target, row_m2, row_m3,
                                embeddings if reduce_embedding_grad else None,
                                embeddings.shape[1], extra=extra_negatives)
        shard = Shard(opts, chosen, group, class_start, num_classes, bool(normalize),
                      kernel_block_size(block_size), reduce_embedding_grad)
        return _Prepared(shard, target.long(), row_m2, row_m3, weight_shard.shape[0], shared)

    p = _prepared_everywhere(fn, group, _device_of(embeddings), prepare)
    out = _LinearShardedMarginLoss.apply(embeddings, weight_shard, p.target, p.row_m2, p.row_m3,
                                         extra_negatives, p.shard)
    return reduced(out, p.target, p.shard.opts, result_dtype(embeddings), return_lse)
