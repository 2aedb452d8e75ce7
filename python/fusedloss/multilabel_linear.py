"""The multi-label margin loss (MLCD) fused with the classifier matmul: cos = normalize(x) @
normalize(W)^T is made and consumed a block of rows at a time, never as an N x C matrix.

Per block of rows R (about 32 MiB of cosines): cos_R = x_R W^T scaled by the inverse class
norms, the per-row statistics of multilabel_margin_stats, and, when a gradient is wanted,
G_R = d loss / d cos_R from multilabel_margin_grad with the row weights a = sigmoid(lse)
(times the row's incoming weight), then, with G'_R = G_R diag(1 / |w_j|),

    d loss / d x_R += G'_R W,        H += G'_R^T x_R,
    d loss / d w_j  = H_j - (w_j . H_j) w_j / |w_j|^2          (the normalisation of w_j)

so W is never copied to its normalised form, and the only C x D buffer is H, which becomes
the weight's gradient (fp16 / bf16 inputs: the blocks run in fp32, from an fp32 copy of W). The embeddings are normalised with F.normalize (O(N D)) before. The
gradients are made in forward, assuming the same incoming gradient on every row (reduction
"mean" or "sum"), and scaled in backward; otherwise (reduction "none" with row weights) the
blocks are recomputed in backward with the row weights: three matmuls in the first case,
four in the second.
"""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from ._ops import accumulation_dtype, reduce_rows, resolve_backend, result_dtype
from .multilabel import (GRAD_OP, STATS_OP, check_block_size, check_linear_inputs,
                         check_options, has_positive, softplus_rows, target_values)
from .reference import multilabel as reference

_FN = "linear_multilabel_margin_cross_entropy"
_BLOCK_BYTES = 32 << 20  # cosines per block of rows
_NORM_EPS = 1e-12  # F.normalize's


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How the blocks run: the kernel backend, the ops' hyperparameters after (cos, targets),
    the rows per block, whether W is normalised, the ignore_index."""

    backend: str
    hyper: tuple
    rows: int
    normalize: bool
    ignore_index: int

    def ops(self):
        return STATS_OP.for_backend(self.backend), GRAD_OP.for_backend(self.backend)


def linear_multilabel_margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
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
    """:func:`fusedloss.multilabel_margin_cross_entropy` of
    ``cos = normalize(embeddings) @ normalize(weight).T`` (``normalize=False``: of
    ``embeddings @ weight.T``), without an ``N x C`` matrix in forward or backward.

    ``embeddings [N, D]`` and ``weight [C, D]`` share one floating dtype; ``targets [N, K]``
    as in multilabel_margin_cross_entropy, with its keywords and their meaning.
    ``block_size``: rows of cosines per block (None: about 32 MiB of them). The matmuls are
    torch's; the row kernels those of ``backend`` ("auto", "reference", "cpu", "triton"). The
    weight is not copied: its normalisation enters through the class norms (see
    fusedloss/multilabel_linear.py).
    """
    _check_inputs(embeddings, weight, targets, block_size)
    check_options(_FN, scale, m1, m2, m3, margin_grad, ignore_index, reduction)
    backend = resolve_backend(backend, embeddings.device, STATS_OP.name)
    target_values(_FN, targets, weight.shape[0], ignore_index)
    if backend == "reference":
        return reference.linear_multilabel_margin_cross_entropy(
            embeddings, weight, targets, normalize=normalize, scale=scale, m1=m1, m2=m2, m3=m3,
            margin_grad=margin_grad, ignore_index=ignore_index,
            reduction=reduction).to(result_dtype(embeddings))
    n, c = embeddings.shape[0], weight.shape[0]
    rows = block_size or max(1, _BLOCK_BYTES // (c * embeddings.element_size()))
    plan = _Plan(backend, (float(scale), float(m1), float(m2), float(m3),
                           margin_grad == "detached", 0, c, ignore_index), min(rows, max(n, 1)),
                 normalize, ignore_index)
    x = F.normalize(embeddings) if normalize else embeddings
    targets = targets.long()
    loss_rows = _FusedRows.apply(x, weight, targets, plan)
    return reduce_rows(loss_rows, has_positive(targets, ignore_index), reduction,
                       result_dtype(embeddings))


def _check_inputs(x, w, targets, block_size):
    check_linear_inputs(_FN, x, "weight", w, "C", targets)
    if w.shape[0] == 0:
        raise ValueError(f"{_FN}: weight must have at least one class (C >= 1)")
    check_block_size(_FN, block_size)


class _FusedRows(torch.autograd.Function):
    """x [N, D] (normalised or not), w [C, D], targets [N, K] -> the row losses [N]."""

    @staticmethod
    def forward(ctx, x, w, targets, plan):
        valid = has_positive(targets, plan.ignore_index)
        weights = valid.to(accumulation_dtype(x)) if any(ctx.needs_input_grad[:2]) else None
        stats, gx, gw = _sweep(x, w, targets, plan, weights)
        rows = torch.where(valid, softplus_rows(stats), stats.new_zeros(()))
        ctx.plan = plan
        # Eager: the gradients stay off save_for_backward, so that backward scales them in
        # place (no second C x D buffer) and hands them out once; a second backward through
        # the graph recomputes. Traced: ordinary saved tensors, scaled out of place.
        ctx.in_place = weights is not None and not torch.compiler.is_compiling()
        ctx.grads = (gx, gw) if ctx.in_place else None
        traced = () if ctx.in_place or weights is None else (gx, gw)
        ctx.save_for_backward(x, w, targets, stats, *traced)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        x, w, targets, stats, *grads = ctx.saved_tensors
        if ctx.in_place:
            grads, ctx.grads = list(ctx.grads or ()), None
        if grads and grad_rows.shape[0] > 0 and grad_rows.stride(0) == 0:
            g = grad_rows[0]
            if ctx.in_place:
                gx, gw = (t.mul_(g.to(t.dtype)) for t in grads)
            else:
                gx, gw = (t * g.to(t.dtype) for t in grads)
        else:
            valid = has_positive(targets, ctx.plan.ignore_index)
            weights = torch.where(valid, grad_rows.to(stats.dtype), 0.0)
            _, gx, gw = _sweep(x, w, targets, ctx.plan, weights, stats)
        return gx, gw, None, None


class FusedStats(torch.autograd.Function):
    """x [N, D], w [C_local, D], targets [N, K] -> this block of classes' (lse_neg, lse_pos)
    [N, 2] (the sharded linear form). Backward recomputes the blocks with the incoming
    weights dL/dlse (four matmuls in all) and, with `group`, sums the embeddings' gradient
    over the ranks."""

    @staticmethod
    def forward(ctx, x, w, targets, plan, group):
        stats, _, _ = _sweep(x, w, targets, plan)
        ctx.plan, ctx.group = plan, group
        ctx.save_for_backward(x, w, targets, stats)
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        from . import distributed as fdist

        x, w, targets, stats = ctx.saved_tensors
        coef = torch.stack((grad_stats[:, 0], stats[:, 0], grad_stats[:, 1], stats[:, 1]), dim=1)
        _, gx, gw = _sweep(x, w, targets, ctx.plan, coef=coef.to(stats.dtype), stats=stats)
        if ctx.group is not False:
            gx = fdist.all_reduce(gx, "sum", ctx.group, kind=fdist.EMBEDDING_GRAD)
        return gx, gw, None, None, None


def _sweep(x, w, targets, plan, weights=None, stats=None, coef=None):
    """The blocks of rows: (stats [N, 2], and the gradients with respect to x and w of
    sum_i weights_i loss_i (row `weights`), or of sum_i (a_neg lse_neg + a_pos lse_pos)_i
    (`coef` [N, 4] = (a_neg, lse_neg, a_pos, lse_pos)), else None, None). `stats`, when
    given, are those of forward (not recomputed)."""
    stats_op, grad_op = plan.ops()
    acc = accumulation_dtype(x)
    # fp16 / bf16 inputs: the cosines in fp32 (scale 64 turns a bf16 rounding of a cosine
    # into ~0.25 of logit), from an fp32 copy of W, O(C D).
    wd = w.detach().to(acc)
    inv = None
    if plan.normalize:
        norm = wd.norm(dim=1)
        inv = 1.0 / norm.clamp(min=_NORM_EPS)
    have = stats is not None
    if not have:
        stats = torch.empty(x.shape[0], 2, dtype=acc, device=x.device)
    grads = weights is not None or coef is not None
    gx = torch.empty_like(x) if grads else None
    h = torch.zeros(w.shape, dtype=acc, device=w.device) if grads else None
    for start in range(0, x.shape[0], plan.rows):
        r = slice(start, start + plan.rows)
        xr = x[r].detach().to(acc)
        cos = xr @ wd.t()
        if inv is not None:
            cos.mul_(inv)
        if not have:
            stats[r] = stats_op(cos, targets[r], *plan.hyper)
        if not grads:
            continue
        if coef is None:
            s = stats[r]
            block = torch.stack((weights[r] * torch.sigmoid(s[:, 0]), s[:, 0],
                                 weights[r] * torch.sigmoid(s[:, 1]), s[:, 1]), dim=1)
        else:
            block = coef[r]
        g = grad_op(cos, targets[r], block.contiguous(), *plan.hyper)
        del cos
        if inv is not None:
            g.mul_(inv)
        gx[r] = g @ wd
        h.addmm_(g.t(), xr)
    if not grads:
        return stats, None, None
    if inv is not None:
        # d cos_ij / d w_j = x_i / |w_j| - (x_i . w_j) w_j / |w_j|^3 for |w_j| > eps.
        dots = torch.bmm(wd.unsqueeze(1), h.unsqueeze(2)).view(-1)  # w_j . H_j, no C x D temporary
        along = torch.where(norm > _NORM_EPS, inv * inv * dots, 0.0)
        h.addcmul_(wd, along[:, None], value=-1.0)
    return stats, gx, h.to(w.dtype)
