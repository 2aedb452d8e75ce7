"""Multi-label margin loss (MLCD) on normalised logits: one Triton row kernel and its launcher.

The math is derived in csrc/include/fusedloss/multilabel.h. Per row, with cosines c_j, the
positives P (targets[row, :K], padding = ignore_index, duplicates counted once), scale s and
z_p the margin logit of margin.h (_common.target_logit):

    L_neg = log(1 + sum_{j not in P} exp(s c_j))        online: (m, S) seeded with (0, 1)
    L_pos = log(1 + sum_{p in P} exp(-z_p))             one block of BLOCK_K entries
    loss  = L_neg + L_pos                               (0 for a row without positives)
    grad_j = s exp(s c_j - L_neg)     (j not in P),     grad_p = -dz_p/dc_p exp(-z_p - L_pos)

Kernel: one program per row. The K targets are read as one block of BLOCK_K (a power of two,
K <= BLOCK_K <= 64); an entry equal to an earlier listed one is a duplicate (a BLOCK_K x
BLOCK_K comparison) and enters L_pos once. Pass 1 walks the row in BLOCK_C chunks; a chunk's
positive columns are found by a loop over the K targets that compares only the targets
falling in the chunk (a scalar test each, so a row costs K vector comparisons, not K per
chunk), and are left out of the online log-sum-exp: the negatives' sum is never all columns
minus the positives, which cancels when the positives dominate. Pass 2 (COMPUTE_GRAD)
rereads the row and writes the negatives' gradient with 0 at the positive columns; after a
barrier the program stores the positives' gradients over those zeros (each at its first
listing). A target outside [0, C) that is not padding makes the row NaN (no out-of-bounds
read). BLOCK_C and num_warps as the margin row kernel (_common.row_block_c, row_num_warps).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss.triton_kernels._common import (asin_terms, check_args, from_hi_lo, hi_lo, launch,
                                              online_lse_update, row_block_c, row_kernel_io,
                                              row_num_warps, target_logit, uses_angle)


@triton.jit
def _positive_columns(cols, targets_row, K, ignore_index, start, BLOCK_C: tl.constexpr):
    """cols == p for some listed target p of the row (those in [start, start + BLOCK_C))."""
    hit = cols < 0
    for k in range(0, K):
        p = tl.load(targets_row + k)
        if (p != ignore_index) & (p >= start) & (p < start + BLOCK_C):
            hit = hit | (cols == p)
    return hit


@triton.jit
def _multilabel_kernel(
    cos_ptr, targets_ptr, loss_ptr, grad_ptr,
    C, K, cos_row_stride, ignore_index,
    scale_hi, scale_lo, m1_hi, m1_lo, m2_hi, m2_lo, m3_hi, m3_lo,
    USE_ANGLE: tl.constexpr, DETACH_MARGIN: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ASIN_TERMS: tl.constexpr,
):
    ACC = loss_ptr.dtype.element_ty  # fp32, or fp64 for fp64 cos
    row = tl.program_id(0).to(tl.int64)
    cos_row = cos_ptr + row * cos_row_stride
    targets_row = targets_ptr + row * K
    scale = from_hi_lo(scale_hi, scale_lo, ACC)
    m1 = from_hi_lo(m1_hi, m1_lo, ACC)
    m2 = from_hi_lo(m2_hi, m2_lo, ACC)
    m3 = from_hi_lo(m3_hi, m3_lo, ACC)

    # The positives: listed entries, first listings, a bad one (outside [0, C)) anywhere.
    ks = tl.arange(0, BLOCK_K)
    t = tl.load(targets_row + ks, mask=ks < K, other=ignore_index)
    listed = t != ignore_index
    earlier = tl.expand_dims(ks, 0) < tl.expand_dims(ks, 1)  # [k, k']: k' before k
    repeat = (tl.expand_dims(t, 1) == tl.expand_dims(t, 0)) & tl.expand_dims(listed, 0) & earlier
    first = listed & (tl.max(repeat.to(tl.int32), axis=1) == 0)
    in_range = (t >= 0) & (t < C)
    any_listed = tl.max(listed.to(tl.int32), axis=0) > 0
    bad = tl.max((listed & ~in_range).to(tl.int32), axis=0) > 0
    take = first & in_range
    c_p = tl.load(cos_row + tl.where(take, t, 0), mask=take, other=0.0).to(ACC)
    z_p, slope = target_logit(c_p, scale, m1, m2, m3, USE_ANGLE, DETACH_MARGIN, ASIN_TERMS)
    m_pos, s_pos = online_lse_update(tl.full([], 0.0, ACC), tl.full([], 1.0, ACC),
                                     tl.where(first, -z_p, float("-inf")), 0)
    loss_pos = m_pos + tl.log(s_pos)

    # Pass 1: L_neg over the columns that are not positives, seeded with exp(0) = 1.
    offs = tl.arange(0, BLOCK_C)
    m_run = tl.full([], 0.0, ACC)
    s_run = tl.full([], 1.0, ACC)
    c_end = tl.where(any_listed, C, 0)  # rows without positives read nothing
    for start in range(0, c_end, BLOCK_C):
        cols = start + offs
        keep = (cols < C) & ~_positive_columns(cols, targets_row, K, ignore_index, start,
                                               BLOCK_C)
        z = scale * tl.load(cos_row + cols, mask=keep, other=0.0).to(ACC)
        m_run, s_run = online_lse_update(m_run, s_run, tl.where(keep, z, float("-inf")), 0)
    loss_neg = m_run + tl.log(s_run)
    loss = tl.where(bad, float("nan"), loss_neg + loss_pos)
    tl.store(loss_ptr + row, tl.where(any_listed, loss, 0.0))

    # Pass 2: the gradient, negatives first, then the positives over their zeros.
    if COMPUTE_GRAD:
        out = grad_ptr.dtype.element_ty
        grad_row = grad_ptr + row * C  # grad is contiguous [N, C]
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            skip = _positive_columns(cols, targets_row, K, ignore_index, start, BLOCK_C)
            z = scale * tl.load(cos_row + cols, mask=cols < c_end, other=0.0).to(ACC)
            g = tl.where(skip | ~any_listed, 0.0, scale * tl.exp(z - loss_neg))
            g = tl.where(bad, float("nan"), g)
            tl.store(grad_row + cols, g.to(out), mask=cols < C)
        tl.debug_barrier()
        g_p = -slope * tl.exp(-z_p - loss_pos)
        g_p = tl.where(bad, float("nan"), g_p)
        tl.store(grad_row + tl.where(take, t, 0), g_p.to(out), mask=take)


def multilabel_margin_cross_entropy(cos: Tensor, targets: Tensor, scale: float, m1: float,
                                    m2: float, m3: float, detach_margin: bool, ignore_index: int,
                                    compute_grad: bool) -> tuple[Tensor, Tensor]:
    """fusedloss::multilabel_margin_cross_entropy (_schemas.py): per-row loss, and
    d loss_i / d cos_ij in the dtype of `cos` when compute_grad (else an empty tensor).
    Target values are not read (a bad one gives a NaN row); the rest as the C++ kernel."""
    op = "multilabel_margin_cross_entropy"
    check_args(op, cos=cos, scale=scale)
    n = cos.shape[0]
    if targets.dim() != 2 or targets.shape[0] != n:
        raise ValueError(f"{op}: targets must have shape [{n}, K], got {list(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: targets must be int64, got {targets.dtype}")
    if not 1 <= targets.shape[1] <= 64:
        raise ValueError(f"{op}: targets must have 1 to 64 columns (positives per row), got "
                         f"{targets.shape[1]}")
    if targets.device != cos.device:
        raise RuntimeError(f"{op}: targets is on {targets.device} but cos is on {cos.device}")
    cos, targets, loss, grad, grad_arg = row_kernel_io(cos, targets, compute_grad)
    c, k = cos.shape[1], targets.shape[1]
    block_c = row_block_c(c, cos.device)
    if n > 0:
        launch(
            _multilabel_kernel, (n,), cos, targets, loss, grad_arg,
            c, k, cos.stride(0), ignore_index,
            *hi_lo(scale), *hi_lo(m1), *hi_lo(m2), *hi_lo(m3),
            USE_ANGLE=uses_angle(None, m1, m2), DETACH_MARGIN=detach_margin,
            COMPUTE_GRAD=compute_grad, BLOCK_C=block_c,
            BLOCK_K=max(triton.next_power_of_2(k), 2), ASIN_TERMS=asin_terms(loss.dtype),
            num_warps=min(row_num_warps(block_c), 8 if loss.dtype == torch.float64 else 16),
        )
    return loss, grad
