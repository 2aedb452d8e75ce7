"""Multi-label margin loss (MLCD) on normalised logits: the two Triton row kernels (per-row
statistics, gradient) and their launchers.

The math is derived in csrc/include/fusedloss/multilabel.h. Per row, with the local cosines
c_j of the shard [class_start, class_start + C) (a whole row: class_start 0), the local
positives P (targets[row, :K] in the shard; padding = ignore_index, duplicates counted once),
scale s and z_p the margin logit of margin.h (_common.target_logit):

    stats:  lse_neg = log sum_{j not in P} exp(s c_j),   lse_pos = log sum_{p in P} exp(-z_p)
            (-inf for an empty sum; online log-sum-exp with the running max at -inf)
    grad:   grad_j = a_neg s exp(s c_j - lse_neg)  (j not in P),
            grad_p = -a_pos dz_p/dc_p exp(-z_p - lse_pos),   coef = (a_neg, lse_neg, a_pos, lse_pos)

One program per row. The K targets are read as one block of BLOCK_K (a power of two, K <=
BLOCK_K <= 64); an entry equal to an earlier listed one is a duplicate (a BLOCK_K x BLOCK_K
comparison) and enters lse_pos once. Both kernels walk the row in BLOCK_C chunks; a chunk's
positive columns are found by a loop over the K targets that compares only the targets
falling in the chunk (a scalar test each, so a row costs K vector comparisons in all, not K
per chunk), and are left out: the negatives' sum is never all columns minus the positives,
which cancels when the positives dominate. The grad kernel writes the chunk with 0 at the
positive columns, then, after a barrier, the positives' entries over those zeros (each at
its first listing). Targets are not range-checked here (the public functions check them).
BLOCK_C as the margin row kernel's (_common.row_block_c) capped at 2048, num_warps =
BLOCK_C / 256 (_common.row_num_warps).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss.triton_kernels._common import (asin_terms, check_args, from_hi_lo, hi_lo, launch,
                                              online_lse_update, row_block_c, row_layout,
                                              row_num_warps, target_logit, uses_angle)


@triton.jit
def _positive_columns(cols, targets_row, K, ignore_index, start, BLOCK_C: tl.constexpr):
    """cols == p for some listed local target p of the row (those in [start, start + BLOCK_C))."""
    hit = cols < 0
    for k in range(0, K):
        p = tl.load(targets_row + k)
        if (p != ignore_index) & (p >= start) & (p < start + BLOCK_C):
            hit = hit | (cols == p)
    return hit


@triton.jit
def _local_positives(cos_row, targets_row, K, C, ignore_index, class_start, scale, m1, m2, m3,
                     USE_ANGLE: tl.constexpr, DETACH_MARGIN: tl.constexpr,
                     BLOCK_K: tl.constexpr, ASIN_TERMS: tl.constexpr):
    """(local column of each entry, its first-listing flag, z_p, dz_p/dc_p) of the BLOCK_K
    target entries of a row, in the accumulation dtype of `scale`."""
    ks = tl.arange(0, BLOCK_K)
    t = tl.load(targets_row + ks, mask=ks < K, other=ignore_index)
    col = t - class_start
    local = (t != ignore_index) & (col >= 0) & (col < C)
    earlier = tl.expand_dims(ks, 0) < tl.expand_dims(ks, 1)  # [k, k']: k' before k
    repeat = (tl.expand_dims(t, 1) == tl.expand_dims(t, 0)) & tl.expand_dims(local, 0) & earlier
    first = local & (tl.max(repeat.to(tl.int32), axis=1) == 0)
    c_p = tl.load(cos_row + tl.where(first, col, 0), mask=first, other=0.0).to(scale.dtype)
    z_p, slope = target_logit(c_p, scale, m1, m2, m3, USE_ANGLE, DETACH_MARGIN, ASIN_TERMS)
    return col, first, z_p, slope


@triton.jit
def _multilabel_stats_kernel(
    cos_ptr, targets_ptr, stats_ptr,
    C, K, cos_row_stride, ignore_index, class_start,
    scale_hi, scale_lo, m1_hi, m1_lo, m2_hi, m2_lo, m3_hi, m3_lo,
    USE_ANGLE: tl.constexpr, DETACH_MARGIN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ASIN_TERMS: tl.constexpr,
):
    ACC = stats_ptr.dtype.element_ty  # fp32, or fp64 for fp64 cos
    row = tl.program_id(0).to(tl.int64)
    cos_row = cos_ptr + row * cos_row_stride
    targets_row = targets_ptr + row * K
    scale = from_hi_lo(scale_hi, scale_lo, ACC)
    col, first, z_p, _ = _local_positives(
        cos_row, targets_row, K, C, ignore_index, class_start, scale,
        from_hi_lo(m1_hi, m1_lo, ACC), from_hi_lo(m2_hi, m2_lo, ACC),
        from_hi_lo(m3_hi, m3_lo, ACC), USE_ANGLE, DETACH_MARGIN, BLOCK_K, ASIN_TERMS)
    minus_inf = tl.full([], float("-inf"), ACC)
    m_pos, s_pos = online_lse_update(minus_inf, tl.full([], 0.0, ACC),
                                     tl.where(first, -z_p, float("-inf")), 0)
    lse_pos = tl.where(s_pos > 0, m_pos + tl.log(tl.where(s_pos > 0, s_pos, 1.0)), float("-inf"))

    offs = tl.arange(0, BLOCK_C)
    m_run = minus_inf
    s_run = tl.full([], 0.0, ACC)
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        keep = (cols < C) & ~_positive_columns(cols + class_start, targets_row, K, ignore_index,
                                               start + class_start, BLOCK_C)
        z = scale * tl.load(cos_row + cols, mask=keep, other=0.0).to(ACC)
        m_run, s_run = online_lse_update(m_run, s_run, tl.where(keep, z, float("-inf")), 0)
    lse_neg = tl.where(s_run > 0, m_run + tl.log(tl.where(s_run > 0, s_run, 1.0)), float("-inf"))
    tl.store(stats_ptr + 2 * row, lse_neg)
    tl.store(stats_ptr + 2 * row + 1, lse_pos)


@triton.jit
def _multilabel_grad_kernel(
    cos_ptr, targets_ptr, coef_ptr, grad_ptr,
    C, K, cos_row_stride, ignore_index, class_start,
    scale_hi, scale_lo, m1_hi, m1_lo, m2_hi, m2_lo, m3_hi, m3_lo,
    USE_ANGLE: tl.constexpr, DETACH_MARGIN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ASIN_TERMS: tl.constexpr,
):
    ACC = coef_ptr.dtype.element_ty
    OUT = grad_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cos_row = cos_ptr + row * cos_row_stride
    targets_row = targets_ptr + row * K
    grad_row = grad_ptr + row * C  # grad is contiguous [N, C]
    scale = from_hi_lo(scale_hi, scale_lo, ACC)
    a_neg = tl.load(coef_ptr + 4 * row)
    lse_neg = tl.load(coef_ptr + 4 * row + 1)
    a_pos = tl.load(coef_ptr + 4 * row + 2)
    lse_pos = tl.load(coef_ptr + 4 * row + 3)
    idle = (a_neg == 0.0) & (a_pos == 0.0)  # a row without positives: zeros, nothing read
    col, first, z_p, slope = _local_positives(
        cos_row, targets_row, K, C, ignore_index, class_start, scale,
        from_hi_lo(m1_hi, m1_lo, ACC), from_hi_lo(m2_hi, m2_lo, ACC),
        from_hi_lo(m3_hi, m3_lo, ACC), USE_ANGLE, DETACH_MARGIN, BLOCK_K, ASIN_TERMS)
    g_p = tl.where(idle, 0.0, -a_pos * slope * tl.exp(-z_p - lse_pos))

    offs = tl.arange(0, BLOCK_C)
    c_end = tl.where(idle, 0, C)
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        skip = _positive_columns(cols + class_start, targets_row, K, ignore_index,
                                 start + class_start, BLOCK_C)
        z = scale * tl.load(cos_row + cols, mask=cols < c_end, other=0.0).to(ACC)
        g = tl.where(skip, 0.0, a_neg * scale * tl.exp(z - lse_neg))
        g = tl.where(idle, 0.0, g)
        tl.store(grad_row + cols, g.to(OUT), mask=cols < C)
    tl.debug_barrier()
    tl.store(grad_row + tl.where(first, col, 0), g_p.to(OUT), mask=first)


# The row chunk: at BLOCK_C = 4096 (the margin row kernel's) the fp64 kernels and the fp16 /
# bf16 gradient kernel spill 4 to 16 B a thread on sm_90 (ptxas -v, tests/test_triton_aot.py);
# at 2048, with 8 warps, none does.
_MAX_BLOCK_C = 2048


def _check(op, cos, targets, scale, class_start, num_classes, coef=None):
    """The checks of csrc/cpu/multilabel.cpp check_rows, without reading target values."""
    check_args(op, cos=cos, scale=scale)
    n = cos.shape[0]
    if targets.dim() != 2 or targets.shape[0] != n:
        raise ValueError(f"{op}: targets must have shape [{n}, K], got {list(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: targets must be int64, got {targets.dtype}")
    if targets.device != cos.device:
        raise RuntimeError(f"{op}: targets is on {targets.device} but cos is on {cos.device}")
    if not 1 <= targets.shape[1] <= 64:
        raise ValueError(f"{op}: targets must have 1 to 64 columns (positives per row), got "
                         f"{targets.shape[1]}")
    if not (class_start >= 0 and class_start + cos.shape[1] <= num_classes):
        raise ValueError(f"{op}: the shard [class_start, class_start + C_local) = "
                         f"[{class_start}, {class_start + cos.shape[1]}) must lie in "
                         f"[0, num_classes = {num_classes})")
    if coef is not None:
        acc = torch.float64 if cos.dtype == torch.float64 else torch.float32
        if coef.dim() != 2 or list(coef.shape) != [n, 4]:
            raise ValueError(f"{op}: coef must have shape [{n}, 4] (a_neg, lse_neg, a_pos, "
                             f"lse_pos per row), got {list(coef.shape)}")
        if coef.dtype != acc:
            raise TypeError(f"{op}: coef must be {acc}, got {coef.dtype}")
        if coef.device != cos.device:
            raise RuntimeError(f"{op}: coef is on {coef.device} but cos is on {cos.device}")


def _launch(kernel, cos, targets, out_args, scale, m1, m2, m3, detach_margin, class_start,
            ignore_index):
    n, c = cos.shape
    block_c = min(row_block_c(c, cos.device), _MAX_BLOCK_C)
    acc = torch.float64 if cos.dtype == torch.float64 else torch.float32
    if n > 0:
        launch(kernel, (n,), cos, targets, *out_args, c, targets.shape[1], cos.stride(0),
               ignore_index, class_start, *hi_lo(scale), *hi_lo(m1), *hi_lo(m2), *hi_lo(m3),
               USE_ANGLE=uses_angle(None, m1, m2), DETACH_MARGIN=detach_margin,
               BLOCK_C=block_c, BLOCK_K=max(triton.next_power_of_2(targets.shape[1]), 2),
               ASIN_TERMS=asin_terms(acc),
               num_warps=row_num_warps(block_c))


def multilabel_margin_stats(cos: Tensor, targets: Tensor, scale: float, m1: float, m2: float,
                            m3: float, detach_margin: bool, class_start: int, num_classes: int,
                            ignore_index: int) -> Tensor:
    """fusedloss::multilabel_margin_stats (_schemas.py): (lse_neg, lse_pos) [N, 2]."""
    op = "multilabel_margin_stats"
    _check(op, cos, targets, scale, class_start, num_classes)
    cos, targets = row_layout(cos), targets.contiguous()
    acc = torch.float64 if cos.dtype == torch.float64 else torch.float32
    stats = torch.empty(cos.shape[0], 2, dtype=acc, device=cos.device)
    _launch(_multilabel_stats_kernel, cos, targets, (stats,), scale, m1, m2, m3, detach_margin,
            class_start, ignore_index)
    return stats


def multilabel_margin_grad(cos: Tensor, targets: Tensor, coef: Tensor, scale: float, m1: float,
                           m2: float, m3: float, detach_margin: bool, class_start: int,
                           num_classes: int, ignore_index: int) -> Tensor:
    """fusedloss::multilabel_margin_grad (_schemas.py): the gradient [N, C_local]."""
    op = "multilabel_margin_grad"
    _check(op, cos, targets, scale, class_start, num_classes, coef)
    cos, targets = row_layout(cos), targets.contiguous()
    grad = torch.empty(cos.shape, dtype=cos.dtype, device=cos.device)
    _launch(_multilabel_grad_kernel, cos, targets, (coef.contiguous(), grad), scale, m1, m2, m3,
            detach_margin, class_start, ignore_index)
    return grad
