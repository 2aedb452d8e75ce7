"""Margin softmax cross-entropy on normalised logits (ArcFace, CosFace, SphereFace,
their combination, ElasticFace per-row margins): one Triton row kernel and its launcher.

The math is derived in csrc/include/fusedloss/margin.h. Per row, with cosines c_j,
target y, scale s, label smoothing eps and C classes, the kernel computes

    theta = acos(clamp(c_y, -1, 1)),   phi = m1 theta + m2,   k = floor(phi / pi)
    z_j = s c_j (j != y),   z_y = s ((-1)^k cos(phi) - 2k - m3)   (s (c_y - m3) if not USE_ANGLE)
    dz_y/dc_y = s m1 (-1)^k' sin(phi') / sin(theta'),  theta' = clamp(theta, 0.01, pi - 0.01),
                phi' = m1 theta' + m2, k' = floor(phi' / pi)      (s if detached or not USE_ANGLE)
    m = max_j z_j,   S_o = sum_{j != y} exp(z_j - m),   S = S_o + exp(z_y - m)
    loss   = (m - z_y) + log S + eps (z_y - sum_j z_j / C)   [= lse - (1-eps) z_y - (eps/C) sum_j z_j]
    grad_j = s (exp(z_j - m) / S - eps / C)                    (j != y)
    grad_y = dz_y/dc_y (eps - eps / C - S_o / S)              [S_o / S = 1 - p_y, no cancellation]

and, with the auxiliary term lambda lse^2 (lse_square_scale = lambda > 0, HAS_LSE_SQUARE),
g = 2 lambda (m + log S):

    loss  += lambda (m + log S)^2
    grad_j = s ((1 + g) exp(z_j - m) / S - eps / C)            (j != y)
    grad_y += dz_y/dc_y g exp(z_y - m) / S

These are margin.h's formulas rearranged so that fp32 does not lose digits: lse, which would
round at the size of z (~64), is never formed for the cross-entropy (only for the auxiliary
term, where its rounding is harmless), and 1 - p_y is a ratio, not 1 minus ~1, because the
margin slope (up to ~100 s m1) amplifies any error in it.

Kernel: one program per row. Pass 1 walks the row in BLOCK_C chunks with an online
log-sum-exp (block max, S_o rescaled by exp(m_old - m_new)); the target column is left
out of the loop and z_y seeds the running max, so the state is never -inf - -inf, even
for C = 1. The same loop sums z_j for label smoothing. Pass 2 (only when COMPUTE_GRAD)
rereads the row and writes the gradient. Ignored rows read nothing and get loss 0 and a
zero gradient row. A target outside [0, C) that is not ignore_index makes z_y NaN (no
out-of-bounds read), hence a NaN loss and gradient row. NaN anywhere in a row reaches
the loss through the sums of exp and the running max (both propagate it: _common.nan_max).
Triton's default fp fusion may evaluate a shifted logit z - M = s c - M as fma(s, c, -M),
unlike the CPU and CUDA kernels, which round s c first: at the row maximum the exponent is
then the product's rounding error, not 0, so that softmax entry is 1 + d with
|d| <= 2^-24 |z_max| in fp32 (2^-53 |z_max| in fp64), not exactly 1.
BLOCK_C = next_power_of_2(C) capped at 4096 on GPU (128 under the interpreter, so that
small test rows still take several chunks), num_warps = BLOCK_C / 256 in [1, 16], at most 8
for fp64 (sm_90: 16 warps leave 128 registers a thread, which the fp64 kernel at BLOCK_C =
4096 exceeds; with 8 it fits in 255 without spills). num_warps sets which elements each
thread sums and the shape of the cross-thread tree, so the order of the row sums follows it.

Precision: accumulation in the dtype of `loss` (fp32, fp64 for fp64 cos). Triton passes
Python floats as fp32 kernel arguments, so each scalar is sent as fp32 hi + lo parts and
rebuilt as hi + lo in the accumulation dtype (about 48 significant bits for fp64).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss.triton_kernels._common import (asin_terms, check_args, from_hi_lo, hi_lo, launch,
                                              online_lse_update, row_block_c, row_kernel_io,
                                              row_margins, row_num_warps, target_logit,
                                              uses_angle)


@triton.jit
def _margin_ce_kernel(
    cos_ptr, target_ptr, row_m2_ptr, row_m3_ptr, loss_ptr, grad_ptr,
    C, cos_row_stride, ignore_index,
    scale_hi, scale_lo, m1_hi, m1_lo, m2_hi, m2_lo, m3_hi, m3_lo, eps_hi, eps_lo, lam_hi, lam_lo,
    HAS_ROW_M2: tl.constexpr, HAS_ROW_M3: tl.constexpr, HAS_LSE_SQUARE: tl.constexpr,
    USE_ANGLE: tl.constexpr,
    DETACH_MARGIN: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_C: tl.constexpr,
    ASIN_TERMS: tl.constexpr,
):
    ACC = loss_ptr.dtype.element_ty  # fp32, or fp64 for fp64 cos
    row = tl.program_id(0).to(tl.int64)
    cos_row = cos_ptr + row * cos_row_stride

    scale = from_hi_lo(scale_hi, scale_lo, ACC)
    m1 = from_hi_lo(m1_hi, m1_lo, ACC)
    eps = from_hi_lo(eps_hi, eps_lo, ACC)
    m2, m3 = row_margins(row, True, row_m2_ptr, row_m3_ptr, m2_hi, m2_lo, m3_hi, m3_lo,
                         HAS_ROW_M2, HAS_ROW_M3, ACC)

    t = tl.load(target_ptr + row)
    ignored = t == ignore_index
    t_ok = (t >= 0) & (t < C)
    c_y = tl.load(cos_row + tl.where(t_ok, t, 0), mask=t_ok, other=0.0).to(ACC)

    # Target logit and its slope dz_y/dc_y (margin.h target_logit).
    z_y, slope = target_logit(c_y, scale, m1, m2, m3, USE_ANGLE, DETACH_MARGIN, ASIN_TERMS)
    z_y = tl.where(t_ok, z_y, float("nan"))

    # Pass 1: online log-sum-exp over j != y with the running max seeded by z_y; sum of z_j.
    offs = tl.arange(0, BLOCK_C)
    m_run = z_y
    s_oth = tl.full([], 0.0, ACC)  # sum_{j != y} exp(z_j - m_run)
    z_acc = tl.zeros([BLOCK_C], dtype=ACC)
    c_end = tl.where(ignored, 0, C)  # ignored rows read nothing
    for start in range(0, c_end, BLOCK_C):
        cols = start + offs
        valid = (cols < C) & (cols != t)
        z = scale * tl.load(cos_row + cols, mask=valid, other=0.0).to(ACC)
        z_acc += tl.where(valid, z, 0.0)
        m_run, s_oth = online_lse_update(m_run, s_oth, tl.where(valid, z, float("-inf")), 0)
    s_all = s_oth + tl.exp(z_y - m_run)  # lse = m_run + log(s_all)
    sum_z = tl.sum(z_acc, axis=0) + z_y
    # loss = (lse - z_y) + eps (z_y - sum_z / C); the eps term is skipped at eps = 0 as in margin.h.
    loss = (m_run - z_y) + tl.log(s_all)
    loss += tl.where(eps != 0.0, eps * (z_y - sum_z / C), 0.0)
    if HAS_LSE_SQUARE:  # lambda lse^2; its gradient is g softmax_j
        lam = from_hi_lo(lam_hi, lam_lo, ACC)
        lse = m_run + tl.log(s_all)
        loss += lam * lse * lse
        z_grad = 2.0 * lam * lse
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

    # Pass 2: d loss_i / d cos_ij.
    if COMPUTE_GRAD:
        uniform = eps / C
        inv_s = 1.0 / s_all
        d_y = (eps - uniform) - s_oth * inv_s  # p_y - 1 = -s_oth / s_all, no cancellation
        if HAS_LSE_SQUARE:
            d_y += z_grad * (tl.exp(z_y - m_run) * inv_s)
            inv_s = inv_s * (1.0 + z_grad)  # the j != y entries: (1 + g) softmax_j
        g_y = slope * d_y
        grad_row = grad_ptr + row * C  # grad is contiguous [N, C]
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            z = scale * tl.load(cos_row + cols, mask=cols < c_end, other=0.0).to(ACC)
            g = scale * (tl.exp(z - m_run) * inv_s - uniform)
            g = tl.where(cols == t, g_y, g)
            g = tl.where(ignored, 0.0, g)
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < C)


def margin_cross_entropy(cos: Tensor, target: Tensor, row_m2: Optional[Tensor], row_m3: Optional[Tensor],
                         scale: float, m1: float, m2: float, m3: float, detach_margin: bool,
                         label_smoothing: float, lse_square_scale: float, ignore_index: int,
                         compute_grad: bool) -> tuple[Tensor, Tensor]:
    """fusedloss::margin_cross_entropy (_schemas.py): per-row loss, and d loss_i / d cos_ij
    in the dtype of `cos` when compute_grad (else an empty tensor). Target values are not
    checked (a bad one gives a NaN row); the rest as the C++ kernel (check_args)."""
    check_args("margin_cross_entropy", cos=cos, target=target, row_m2=row_m2, row_m3=row_m3,
               label_smoothing=label_smoothing)
    cos, target, loss, grad, grad_arg = row_kernel_io(cos, target, compute_grad)
    n, c = cos.shape
    # Unused pointer arguments get `loss`: they sit in branches that the constexprs remove.
    m2_arg = row_m2.contiguous() if row_m2 is not None else loss
    m3_arg = row_m3.contiguous() if row_m3 is not None else loss
    block_c = row_block_c(c, cos.device)
    if n > 0:
        launch(
            _margin_ce_kernel, (n,), cos, target, m2_arg, m3_arg, loss, grad_arg,
            c, cos.stride(0), ignore_index,
            *hi_lo(scale), *hi_lo(m1), *hi_lo(m2), *hi_lo(m3), *hi_lo(label_smoothing),
            *hi_lo(lse_square_scale),
            HAS_ROW_M2=row_m2 is not None, HAS_ROW_M3=row_m3 is not None,
            HAS_LSE_SQUARE=lse_square_scale != 0.0, USE_ANGLE=uses_angle(row_m2, m1, m2),
            DETACH_MARGIN=detach_margin, COMPUTE_GRAD=compute_grad, BLOCK_C=block_c,
            ASIN_TERMS=asin_terms(loss.dtype),
            num_warps=min(row_num_warps(block_c), 8 if loss.dtype == torch.float64 else 16),
        )
    return loss, grad
