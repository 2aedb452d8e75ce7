"""Sharded margin softmax cross-entropy in Triton: the work of one rank on its shard of the
classes, for fusedloss.sharded_margin_cross_entropy and linear_sharded_margin_cross_entropy.

This rank holds the classes [class_start, class_start + C_local) of every row; target holds
global class ids. Logits are margin.h's (z_j = s c_j, z_y the margin logit of
csrc/include/fusedloss/margin.h, computed by _common.target_logit).
The split of the loss into per-shard partials and of its gradient into per-row coefficients
is derived in margin.h (section "Sharded rows") and combined across ranks in
python/fusedloss/sharded.py; the contracts are the schema comments of
fusedloss/_schemas.py. Per row i
with global target y ("local": class_start <= y < class_start + C_local):

    stats_i = (lse_other = log sum_{local j != y} exp(z_j)     (-inf when there is no such j),
               z_y if y is local else 0,
               sum_z = sum_{local j} z_j                        (z_y included when y is local))
    ignored rows: (-inf, 0, 0)

    with coef_i = (lse, a, b, d), lse the global log-sum-exp:
    grad_ij = s (a exp(s c_ij - lse) - b)     (local j != y)
    grad_iy = (dz_y / dc_y) d                 (y local)
    ignored rows: 0

lse_other is kept max-rescaled: with M = max_{local j != y} z_j,
lse_other = M + log sum exp(z_j - M), accumulated online chunk by chunk (running max, sum
rescaled by exp(M_old - M_new)). The running max starts at -inf, since a shard may hold no
class j != y (C_local = 1 with a local target); the rescaling uses M_ref = 0 while the max is
still -inf, so no -inf - -inf arises and an empty sum leaves lse_other = 0 + log 0 = -inf.

Logit level (cos [N, C_local]): `_stats_kernel`, one program per row, one pass over the row
in BLOCK_C chunks (the row kernels' sizes, _common.row_block_c: BLOCK_C =
next_power_of_2(C_local) capped at 4096 on the GPU, 128 under the interpreter).
`_grad_kernel`, grid (N, C_local / BLOCK_C): elementwise in the row, the target column's
slope recomputed from c_y by each program (a few dozen flops). Ignored rows read nothing.
Targets are validated by the caller; a target that is not local only means that its column
is elsewhere.

Fused linear (embeddings [N, D], weight shard [C_local, D]): the tiled pipeline of
triton_kernels/margin_linear.py, on the shard, through its public steps (its docstring
describes the tiles and the "sharded mode"): `target_logits` with sharded=True for z_y and
the slope, `split_lse`'s split partials combined here into the stats, and `input_grads` for
both gradients with G given by coef. No N x C_local buffer; no atomics, deterministic on one
GPU model and SM count (margin_linear's splits follow the SM count). The
embedding gradient is this shard's contribution (the caller sums it over ranks).

Logit transforms (margin.h, "Logit transforms"; softcap h and filter_threshold t, each
switched on by a constexpr, SOFTCAP and FILTER, so that the plain kernels are unchanged):
z_j = h tanh(s c'_j / h) with c'_j = 0 where j != y and c_j > t, dz_j/dc_j = 0 there and
s (1 - tanh^2) elsewhere; the stats sum these z, and the gradient is dz_j/dc_j
(a exp(z_j - lse) - b). The capped target logit is h tanh(z_y / h) with its slope times
1 - tanh^2 (margin_linear.py's helpers, shared with the fused linear kernels).

Precision: accumulation in fp32 (fp64 for fp64 inputs); stats in that dtype, gradients in
the inputs' dtypes; scalars passed as fp32 hi + lo pairs (_common.hi_lo).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss._ops import accumulation_dtype
from fusedloss.triton_kernels import margin_linear as linear
from fusedloss.triton_kernels.margin_linear import capped_target, transformed_logits
from fusedloss.triton_kernels._common import (asin_terms, check_args, from_hi_lo, hi_lo, launch,
                                              online_lse_update, row_block_c, row_layout,
                                              row_margins, row_num_warps, target_logit,
                                              uses_angle)


@triton.jit
def _row_target(cos_row, t, C, class_start, ignore_index):
    """(live: the row is not ignored, its local target column t - class_start, local: that
    column is in [0, C) of a live row, c_y: the cosine there, 0 when not local)."""
    live = t != ignore_index
    col = t - class_start
    local = live & (col >= 0) & (col < C)
    c_y = tl.load(cos_row + tl.where(local, col, 0), mask=local, other=0.0)
    return live, col, local, c_y


@triton.jit
def _row_prologue(row, cos_ptr, cos_row_stride, target_ptr, row_m2_ptr, row_m3_ptr, C,
                  class_start, ignore_index, scale_hi, scale_lo, m1_hi, m1_lo, m2_hi, m2_lo,
                  m3_hi, m3_lo, HAS_ROW_M2: tl.constexpr, HAS_ROW_M3: tl.constexpr,
                  USE_ANGLE: tl.constexpr, DETACH_MARGIN: tl.constexpr,
                  ASIN_TERMS: tl.constexpr, ACC: tl.constexpr):
    """What both logit kernels know of a row before its columns: (the row's cosines, scale,
    live, col, local (as _row_target), z_y and dz_y / dc_y), the scalars in ACC from their
    fp32 hi + lo pairs, m2 and m3 the row's ElasticFace draws where given."""
    cos_row = cos_ptr + row * cos_row_stride
    scale = from_hi_lo(scale_hi, scale_lo, ACC)
    m1 = from_hi_lo(m1_hi, m1_lo, ACC)
    m2, m3 = row_margins(row, True, row_m2_ptr, row_m3_ptr, m2_hi, m2_lo, m3_hi, m3_lo,
                         HAS_ROW_M2, HAS_ROW_M3, ACC)
    live, col, local, c_y = _row_target(cos_row, tl.load(target_ptr + row), C, class_start,
                                        ignore_index)
    z_y, slope = target_logit(c_y.to(ACC), scale, m1, m2, m3, USE_ANGLE, DETACH_MARGIN,
                              ASIN_TERMS)
    return cos_row, scale, live, col, local, z_y, slope


@triton.jit
def _other_logits(cos_row, cols, col, C, scale, softcap, threshold, ACC: tl.constexpr,
                  SOFTCAP: tl.constexpr, FILTER: tl.constexpr):
    """The logits z_j (s c_j, transformed) of a chunk's columns j in [0, C) other than the
    target column col: (z with -inf elsewhere, for the log-sum-exp; z with 0 elsewhere, for
    the sum)."""
    valid = (cols < C) & (cols != col)
    c = tl.load(cos_row + cols, mask=valid, other=0.0).to(ACC)
    z, _ = transformed_logits(c, scale, softcap, threshold, SOFTCAP, FILTER)
    return tl.where(valid, z, float("-inf")), tl.where(valid, z, 0.0)


@triton.jit
def _stats_kernel(
    cos_ptr, target_ptr, row_m2_ptr, row_m3_ptr, stats_ptr,
    C, cos_row_stride, class_start, ignore_index,
    scale_hi, scale_lo, m1_hi, m1_lo, m2_hi, m2_lo, m3_hi, m3_lo, cap_hi, cap_lo, thr_hi, thr_lo,
    HAS_ROW_M2: tl.constexpr, HAS_ROW_M3: tl.constexpr, USE_ANGLE: tl.constexpr,
    SOFTCAP: tl.constexpr, FILTER: tl.constexpr, BLOCK_C: tl.constexpr, ASIN_TERMS: tl.constexpr,
):
    """stats [N, 3] of one row; an ignored row reads nothing and keeps (-inf, 0, 0)."""
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cos_row, scale, live, col, local, z_y, slope = _row_prologue(
        row, cos_ptr, cos_row_stride, target_ptr, row_m2_ptr, row_m3_ptr, C, class_start,
        ignore_index, scale_hi, scale_lo, m1_hi, m1_lo, m2_hi, m2_lo, m3_hi, m3_lo,
        HAS_ROW_M2, HAS_ROW_M3, USE_ANGLE, True, ASIN_TERMS, ACC)  # the stats need no slope
    softcap = from_hi_lo(cap_hi, cap_lo, ACC)
    threshold = from_hi_lo(thr_hi, thr_lo, ACC)
    z_y, _ = capped_target(z_y, slope, softcap, SOFTCAP)
    z_y = tl.where(local, z_y, 0.0)

    offs = tl.arange(0, BLOCK_C)
    m_run = tl.full([], float("-inf"), ACC)  # max_{j != y} z_j so far
    s_oth = tl.full([], 0.0, ACC)  # sum_{j != y} exp(z_j - m_ref)
    z_acc = tl.zeros([BLOCK_C], dtype=ACC)
    for start in range(0, tl.where(live, C, 0), BLOCK_C):
        z, z_or_zero = _other_logits(cos_row, start + offs, col, C, scale, softcap, threshold,
                                     ACC, SOFTCAP, FILTER)
        z_acc += z_or_zero
        m_run, s_oth = online_lse_update(m_run, s_oth, z, 0)
    lse_other = tl.where(m_run == float("-inf"), 0.0, m_run) + tl.log(s_oth)
    out = stats_ptr + row * 3
    tl.store(out, lse_other)
    tl.store(out + 1, z_y)
    tl.store(out + 2, tl.sum(z_acc, axis=0) + z_y)


@triton.jit
def _grad_kernel(
    cos_ptr, target_ptr, row_m2_ptr, row_m3_ptr, coef_ptr, grad_ptr,
    C, cos_row_stride, class_start, ignore_index,
    scale_hi, scale_lo, m1_hi, m1_lo, m2_hi, m2_lo, m3_hi, m3_lo, cap_hi, cap_lo, thr_hi, thr_lo,
    HAS_ROW_M2: tl.constexpr, HAS_ROW_M3: tl.constexpr, USE_ANGLE: tl.constexpr,
    DETACH_MARGIN: tl.constexpr, SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_C: tl.constexpr, ASIN_TERMS: tl.constexpr,
):
    """grad [N, C_local] (contiguous) of one row's block of BLOCK_C columns from coef [N, 4]."""
    ACC: tl.constexpr = coef_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_row = cols < C
    cos_row, scale, live, col, local, z_y, slope = _row_prologue(
        row, cos_ptr, cos_row_stride, target_ptr, row_m2_ptr, row_m3_ptr, C, class_start,
        ignore_index, scale_hi, scale_lo, m1_hi, m1_lo, m2_hi, m2_lo, m3_hi, m3_lo,
        HAS_ROW_M2, HAS_ROW_M3, USE_ANGLE, DETACH_MARGIN, ASIN_TERMS, ACC)
    softcap = from_hi_lo(cap_hi, cap_lo, ACC)
    threshold = from_hi_lo(thr_hi, thr_lo, ACC)
    _, slope = capped_target(z_y, slope, softcap, SOFTCAP)
    lse = tl.load(coef_ptr + row * 4)
    a = tl.load(coef_ptr + row * 4 + 1)
    b = tl.load(coef_ptr + row * 4 + 2)
    d = tl.load(coef_ptr + row * 4 + 3)

    c = tl.load(cos_row + cols, mask=cols < tl.where(live, C, 0), other=0.0).to(ACC)
    if SOFTCAP or FILTER:
        z, factor = transformed_logits(c, scale, softcap, threshold, SOFTCAP, FILTER)
        g = scale * factor * (a * tl.exp(z - lse) - b)
    else:
        g = scale * (a * tl.exp(scale * c - lse) - b)
    g = tl.where(local & (cols == col), slope * d, g)
    g = tl.where(live, g, 0.0)  # where, not a product: coef of an ignored row may hold inf
    tl.store(grad_ptr + row * C + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)


# ---------------------------------------------------------------------------------------
# Launchers: the four ops of fusedloss/_schemas.py. Each checks its arguments as the C++ kernel does
# (check_args), target values excepted: a target that is neither ignore_index nor local only
# means that its column is elsewhere.


def _margin_args(row_m2: Optional[Tensor], row_m3: Optional[Tensor], placeholder: Tensor,
                 scale: float, m1: float, m2: float, m3: float, acc: torch.dtype,
                 softcap: float, threshold: float):
    """(pointer arguments row_m2, row_m3; scalar arguments; constexprs) shared by the logit
    kernels. An absent row margin gets `placeholder`, in a branch its constexpr removes."""
    pointers = (row_m2.contiguous() if row_m2 is not None else placeholder,
                row_m3.contiguous() if row_m3 is not None else placeholder)
    scalars = (*hi_lo(scale), *hi_lo(m1), *hi_lo(m2), *hi_lo(m3), *hi_lo(softcap),
               *hi_lo(threshold))
    constexprs = dict(HAS_ROW_M2=row_m2 is not None, HAS_ROW_M3=row_m3 is not None,
                      USE_ANGLE=uses_angle(row_m2, m1, m2), ASIN_TERMS=asin_terms(acc),
                      SOFTCAP=softcap != 0.0, FILTER=threshold != 0.0)
    return pointers, scalars, constexprs


def check_transform(op: str, softcap: float, threshold: float, m1: float, m2: float, m3: float,
                    row_margins: bool) -> None:
    """The C++ kernels' check of the logit transforms (csrc/cpu/sharded.cpp)."""
    if not (softcap >= 0 and softcap != float("inf")):
        raise ValueError(f"{op}: softcap must be finite and >= 0 (0: none), got {softcap}")
    if softcap != 0 and (m1 != 1 or m2 != 0 or m3 != 0 or row_margins):
        raise ValueError(f"{op}: softcap needs no margin (m1 = 1, m2 = m3 = 0, no row margins)")
    if not 0 <= threshold <= 1:
        raise ValueError(f"{op}: filter_threshold must lie in [0, 1] (0: none), got "
                         f"{threshold}")


def _launch_options(num_classes: int, device: torch.device) -> dict:
    block_c = row_block_c(num_classes, device)
    return dict(BLOCK_C=block_c, num_warps=row_num_warps(block_c))


def sharded_margin_stats(cos: Tensor, target: Tensor, row_m2: Optional[Tensor],
                         row_m3: Optional[Tensor], scale: float, m1: float, m2: float, m3: float,
                         class_start: int, ignore_index: int, softcap: float = 0.0,
                         filter_threshold: float = 0.0) -> Tensor:
    """fusedloss::sharded_margin_stats: the partials [N, 3] (fp32, fp64 for fp64 cos)."""
    check_args("sharded_margin_stats", cos=cos, target=target, row_m2=row_m2, row_m3=row_m3,
               class_start=class_start, scale=scale)
    check_transform("sharded_margin_stats", softcap, filter_threshold, m1, m2, m3,
                    row_m2 is not None or row_m3 is not None)
    cos = row_layout(cos)
    n, c = cos.shape
    stats = torch.empty((n, 3), dtype=accumulation_dtype(cos), device=cos.device)
    if n == 0:
        return stats
    pointers, scalars, constexprs = _margin_args(row_m2, row_m3, stats, scale, m1, m2, m3,
                                                 stats.dtype, softcap, filter_threshold)
    launch(_stats_kernel, (n,),
        cos, target.contiguous(), *pointers, stats, c, cos.stride(0), class_start, ignore_index,
        *scalars, **constexprs, **_launch_options(c, cos.device),
    )
    return stats


def sharded_margin_grad(cos: Tensor, target: Tensor, row_m2: Optional[Tensor],
                        row_m3: Optional[Tensor], coef: Tensor, scale: float, m1: float, m2: float,
                        m3: float, detach_margin: bool, class_start: int,
                        ignore_index: int, softcap: float = 0.0,
                        filter_threshold: float = 0.0) -> Tensor:
    """fusedloss::sharded_margin_grad: this shard's gradient [N, C_local] in the dtype of cos."""
    check_args("sharded_margin_grad", cos=cos, target=target, row_m2=row_m2, row_m3=row_m3,
               coef=coef, class_start=class_start, scale=scale)
    check_transform("sharded_margin_grad", softcap, filter_threshold, m1, m2, m3,
                    row_m2 is not None or row_m3 is not None)
    cos = row_layout(cos)
    n, c = cos.shape
    grad = torch.empty((n, c), dtype=cos.dtype, device=cos.device)
    if grad.numel() == 0:
        return grad
    coef = coef.contiguous()
    pointers, scalars, constexprs = _margin_args(row_m2, row_m3, coef, scale, m1, m2, m3,
                                                 coef.dtype, softcap, filter_threshold)
    options = _launch_options(c, cos.device)
    launch(_grad_kernel, (n, triton.cdiv(c, options["BLOCK_C"])),
        cos, target.contiguous(), *pointers, coef, grad, c, cos.stride(0), class_start,
        ignore_index, *scalars, DETACH_MARGIN=detach_margin, **constexprs, **options,
    )
    return grad


def sharded_margin_grad_inplace(cos: Tensor, target: Tensor, row_m2: Optional[Tensor],
                                row_m3: Optional[Tensor], coef: Tensor, scale: float, m1: float,
                                m2: float, m3: float, detach_margin: bool, class_start: int,
                                ignore_index: int, softcap: float = 0.0,
                                filter_threshold: float = 0.0) -> None:
    """fusedloss::sharded_margin_grad_inplace: sharded_margin_grad written into cos itself
    (contiguous). Each program reads its columns before writing them; the slope's read of
    c_y happens in the program that owns column y, before its write."""
    check_args("sharded_margin_grad_inplace", cos=cos, target=target, row_m2=row_m2,
               row_m3=row_m3, coef=coef, class_start=class_start, scale=scale)
    check_transform("sharded_margin_grad_inplace", softcap, filter_threshold, m1, m2, m3,
                    row_m2 is not None or row_m3 is not None)
    if not cos.is_contiguous():
        raise ValueError("sharded_margin_grad_inplace: cos must be contiguous (its storage "
                         "becomes the gradient)")
    n, c = cos.shape
    if cos.numel() == 0:
        return
    coef = coef.contiguous()
    pointers, scalars, constexprs = _margin_args(row_m2, row_m3, coef, scale, m1, m2, m3,
                                                 coef.dtype, softcap, filter_threshold)
    options = _launch_options(c, cos.device)
    launch(_grad_kernel, (n, triton.cdiv(c, options["BLOCK_C"])),
        cos, target.contiguous(), *pointers, coef, cos, c, cos.stride(0), class_start,
        ignore_index, *scalars, DETACH_MARGIN=detach_margin, **constexprs, **options,
    )


def sharded_margin_linear_stats(embeddings: Tensor, weight: Tensor, target: Tensor,
                                row_m2: Optional[Tensor], row_m3: Optional[Tensor], scale: float,
                                m1: float, m2: float, m3: float, normalize: bool,
                                class_start: int, ignore_index: int, block_size: int,
                                softcap: float = 0.0, filter_threshold: float = 0.0) -> Tensor:
    """fusedloss::sharded_margin_linear_stats: the partials [N, 3] of cos = x^ w^T."""
    check_args("sharded_margin_linear_stats", embeddings=embeddings, weight=weight,
               target=target, block_size=block_size, row_m2=row_m2, row_m3=row_m3,
               class_start=class_start, scale=scale)
    check_transform("sharded_margin_linear_stats", softcap, filter_threshold, m1, m2, m3,
                    row_m2 is not None or row_m3 is not None)
    p = linear.pipeline(embeddings, weight, target, normalize, block_size)
    n = p.x.shape[0]
    live = p.target != ignore_index
    if n == 0 or p.w.shape[0] == 0:  # no row, or a shard without classes: (-inf, 0, 0)
        zero = torch.zeros(n, dtype=p.acc, device=p.x.device)
        return torch.stack([torch.full_like(zero, float("-inf")), zero, zero], dim=1)
    z_y, slope = linear.target_logits(p, row_m2, row_m3, scale, m1, m2, m3, detach_margin=True,
                                      class_start=class_start, sharded=True)
    z_y, _ = _capped(z_y, slope, softcap)
    part_max, part_oth, part_z = linear.split_lse(p, scale, class_start, True, softcap,
                                                  filter_threshold).unbind(0)
    # lse_other = M + log sum_splits S_o,split exp(M_split - M), with M = 0 while it is -inf.
    row_max = part_max.amax(0)
    ref = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    lse_other = ref + torch.log((part_oth * torch.exp(part_max - ref)).sum(0))
    sum_z = part_z.sum(0) + z_y
    ignored = torch.tensor([float("-inf"), 0.0, 0.0], dtype=p.acc, device=p.x.device)
    return torch.where(live[:, None], torch.stack([lse_other, z_y, sum_z], dim=1), ignored)


def sharded_margin_linear_grad(embeddings: Tensor, weight: Tensor, target: Tensor,
                               row_m2: Optional[Tensor], row_m3: Optional[Tensor], coef: Tensor,
                               scale: float, m1: float, m2: float, m3: float, detach_margin: bool,
                               normalize: bool, class_start: int, ignore_index: int,
                               block_size: int, softcap: float = 0.0,
                               filter_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """fusedloss::sharded_margin_linear_grad: (this shard's contribution to grad_embeddings,
    grad_weight_shard), in the inputs' dtypes."""
    check_args("sharded_margin_linear_grad", embeddings=embeddings, weight=weight,
               target=target, block_size=block_size, row_m2=row_m2, row_m3=row_m3, coef=coef,
               class_start=class_start, scale=scale)
    check_transform("sharded_margin_linear_grad", softcap, filter_threshold, m1, m2, m3,
                    row_m2 is not None or row_m3 is not None)
    p = linear.pipeline(embeddings, weight, target, normalize, block_size)
    if p.x.shape[0] == 0 or p.w.shape[0] == 0:
        return torch.zeros_like(p.x), torch.zeros_like(p.w)
    z_y, slope = linear.target_logits(p, row_m2, row_m3, scale, m1, m2, m3, detach_margin,
                                      class_start=class_start, sharded=True)
    _, slope = _capped(z_y, slope, softcap)
    # G_ij = s a exp(s cos_ij - lse) - s b, G_iy = slope d: _grad_kernel's coef form. Ignored
    # rows and rows whose target is elsewhere are told apart by the kernel from the target.
    lse, a, b, d = coef.to(p.acc).unbind(1)
    kernel_coef = torch.stack([lse, scale * a, scale * b, slope * d]).contiguous()
    return linear.input_grads(p, kernel_coef, scale, class_start, ignore_index, softcap,
                              filter_threshold)


def _capped(z_y: Tensor, slope: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
    """The capped target logit h tanh(z_y / h) and its slope times 1 - tanh^2 (margin.h), in
    O(N) torch ops; (z_y, slope) without a cap."""
    if softcap == 0.0:
        return z_y, slope
    th = torch.tanh(z_y / softcap)
    return softcap * th, slope * (1.0 - th * th)
