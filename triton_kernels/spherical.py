"""Spherical Z-loss (de Brebisson and Vincent, 2016) on logits: one Triton row kernel and
its launcher.

The math is derived in csrc/include/fusedloss/spherical.h. Per row, with outputs o_k,
k in [0, C), target c, and scalars a, b, the kernel computes

    m      = (1/C) sum_k o_k                                           (pass 1)
    D      = sum_k (o_k - m),   Q = sum_k (o_k - m)^2                   (pass 2)
    mu     = m + D / C,   sigma = max(sqrt(max(Q - D^2 / C, 0) / C), SIGMA_FLOOR)
    z_c    = ((o_c - m) - D / C) / sigma                   [= (o_c - mu) / sigma]
    loss   = softplus(a (b - z_c)) / a
    grad_k = alpha + beta (o_k - m) + gamma [k = c]                    (pass 3)
    with g = sigmoid(a (b - z_c)),  gamma = -g / sigma,  alpha = g / (C sigma) - beta D / C,
         beta = g z_c / (C sigma^2), or 0 where the floor holds   (spherical.h z_loss_grad)

with SIGMA_FLOOR = 1e-12 (spherical.h kSigmaFloor; defined in fusedloss.reference.spherical).

The variance is taken about the mean (a second pass), never as E[o^2] - mu^2. D, zero in
exact arithmetic, is the rounding error of pass 1: adding D / C to the mean and taking
D^2 / C off Q is the corrected two-pass algorithm (Chan, Golub and LeVeque), which keeps
mu and sigma accurate when the mean is many times the spread; z_c never forms o_c - mu
from the rounded mu. The clamp at 0 keeps NaN.

Kernel: one program per row. With C > BLOCK_C, each pass walks the row in BLOCK_C chunks
(three reads, the later ones hoping for L2); with C <= BLOCK_C (ONE_CHUNK), the row is
read once and kept in registers. Ignored rows read nothing and get loss 0 and a zero
gradient row. A target outside [0, C) that is not ignore_index reads nothing and makes
z_c NaN, hence a NaN loss and gradient row; it is never used as an index. NaN or inf in a
row reaches the sums, so the loss is NaN. BLOCK_C = next_power_of_2(C) capped at 4096 on
GPU (128 under the interpreter, so that small test rows still take several chunks),
num_warps = BLOCK_C / 256 in [1, 16].

Precision: accumulation in the dtype of `loss` (fp32, fp64 for fp64 logits); a and b
arrive as fp32 hi + lo pairs (_common.hi_lo) and are rebuilt in that dtype. softplus
uses log1p(u) = 2 atanh(u / (2 + u)) as a series, exact to rounding for u in [0, 1] from
+, *, / alone: tl.log has no log1p, and its fp32 lowering may be a fast approximation
whose absolute error would be a large relative error of a small loss.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss.reference.spherical import SIGMA_FLOOR
from fusedloss.triton_kernels._common import (check_args, from_hi_lo, hi_lo, launch, row_block_c,
                                              row_kernel_io, row_num_warps)

_SIGMA_FLOOR = tl.constexpr(SIGMA_FLOOR)  # the kernels' view of it (spherical.h kSigmaFloor)


@triton.jit
def _log1p_unit(u, ATANH_TERMS: tl.constexpr):
    """log(1 + u) for u in [0, 1] (NaN passes through): 2 atanh(s), s = u / (2 + u) in
    [0, 1/3], as 2 sum_n s^(2n+1) / (2n+1). The n-th term is below 9^-n s, so 9 terms
    reach fp32 and 17 fp64 rounding."""
    s = u / (2.0 + u)
    s2 = s * s
    power = s
    total = s
    for n in tl.static_range(1, ATANH_TERMS):
        power = power * s2
        total = total + power * (1.0 / (2 * n + 1))
    return 2.0 * total


@triton.jit
def _softplus(x, ATANH_TERMS: tl.constexpr):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), without overflow (spherical.h softplus)."""
    return tl.where(x > 0, x, 0.0) + _log1p_unit(tl.exp(-tl.abs(x)), ATANH_TERMS)


@triton.jit
def _row_result(sum_x, sum_dev, sum_sq, o_c, t_ok, C, a, b, ATANH_TERMS: tl.constexpr):
    """Loss and the gradient coefficients (alpha, beta, gamma) of a row from its pass-1 sum
    and its pass-2 sums about the pass-1 mean; z_c is NaN when the target is out of range."""
    floor = tl.full([], _SIGMA_FLOOR, sum_x.dtype)
    mean = sum_x / C
    q = sum_sq - sum_dev * (sum_dev / C)
    q = tl.where(q < 0.0, 0.0, q)  # keeps NaN
    s = tl.sqrt(q / C)
    sigma = tl.where((s > floor) | (s != s), s, floor)  # NaN passes (spherical.h floored_sigma)
    floored = sigma == floor
    # o_c - mu as (o_c - mean) - D / C: the first difference is exact next to the mean.
    z_c = tl.where(t_ok, ((o_c - mean) - sum_dev / C) / sigma, float("nan"))
    loss = _softplus(a * (b - z_c), ATANH_TERMS) / a
    g = 1.0 / (1.0 + tl.exp(-a * (b - z_c)))
    gamma = -g / sigma
    beta = tl.where(floored, 0.0, g * z_c / (C * sigma * sigma))
    alpha = g / (C * sigma) - beta * (sum_dev / C)
    return loss, alpha, beta, gamma


@triton.jit
def _spherical_z_loss_kernel(
    logits_ptr, target_ptr, loss_ptr, grad_ptr,
    C, row_stride, ignore_index,
    a_hi, a_lo, b_hi, b_lo,
    COMPUTE_GRAD: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    ATANH_TERMS: tl.constexpr,
):
    ACC = loss_ptr.dtype.element_ty  # fp32, or fp64 for fp64 logits
    row = tl.program_id(0).to(tl.int64)
    in_row = logits_ptr + row * row_stride
    grad_row = grad_ptr + row * C  # grad is contiguous [N, C]
    a = from_hi_lo(a_hi, a_lo, ACC)
    b = from_hi_lo(b_hi, b_lo, ACC)

    t = tl.load(target_ptr + row)
    ignored = t == ignore_index
    t_ok = (t >= 0) & (t < C) & ~ignored
    c_end = tl.where(t_ok, C, 0)  # ignored rows and bad targets read nothing
    o_c = tl.load(in_row + tl.where(t_ok, t, 0), mask=t_ok, other=0.0).to(ACC)
    offs = tl.arange(0, BLOCK_C)

    if ONE_CHUNK:
        # The whole row in one block, read once.
        in_bounds = offs < c_end
        x = tl.load(in_row + offs, mask=in_bounds, other=0.0).to(ACC)
        sum_x = tl.sum(x, axis=0)
        d = tl.where(in_bounds, x - sum_x / C, 0.0)
        loss, alpha, beta, gamma = _row_result(sum_x, tl.sum(d, axis=0), tl.sum(d * d, axis=0),
                                               o_c, t_ok, C, a, b, ATANH_TERMS)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
        if COMPUTE_GRAD:
            g = alpha + beta * (x - sum_x / C)
            g = tl.where(offs == t, g + gamma, g)
            g = tl.where(ignored, 0.0, g)
            tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < C)
    else:
        # Pass 1: the mean.
        x_acc = tl.zeros([BLOCK_C], dtype=ACC)
        for start in range(0, c_end, BLOCK_C):
            cols = start + offs
            x_acc += tl.load(in_row + cols, mask=cols < c_end, other=0.0).to(ACC)
        sum_x = tl.sum(x_acc, axis=0)
        mean = sum_x / C
        # Pass 2: deviations from the mean and their squares.
        d_acc = tl.zeros([BLOCK_C], dtype=ACC)
        sq_acc = tl.zeros([BLOCK_C], dtype=ACC)
        for start in range(0, c_end, BLOCK_C):
            cols = start + offs
            in_bounds = cols < c_end
            x = tl.load(in_row + cols, mask=in_bounds, other=0.0).to(ACC)
            d = tl.where(in_bounds, x - mean, 0.0)
            d_acc += d
            sq_acc += d * d
        loss, alpha, beta, gamma = _row_result(sum_x, tl.sum(d_acc, axis=0), tl.sum(sq_acc, axis=0),
                                               o_c, t_ok, C, a, b, ATANH_TERMS)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
        # Pass 3: d loss_i / d o_ik.
        if COMPUTE_GRAD:
            for start in range(0, C, BLOCK_C):
                cols = start + offs
                x = tl.load(in_row + cols, mask=cols < c_end, other=0.0).to(ACC)
                g = alpha + beta * (x - mean)
                g = tl.where(cols == t, g + gamma, g)
                g = tl.where(ignored, 0.0, g)
                tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < C)


def spherical_z_loss(logits: Tensor, target: Tensor, a: float, b: float, ignore_index: int,
                     compute_grad: bool) -> tuple[Tensor, Tensor]:
    """fusedloss::spherical_z_loss (_schemas.py): per-row loss, and d loss_i / d logits_ij
    in the dtype of `logits` when compute_grad (else an empty tensor). Target values are not
    checked (a bad one gives a NaN row); the rest as the C++ kernel (check_args)."""
    check_args("spherical_z_loss", logits=logits, target=target, a=a, b=b)
    logits, target, loss, grad, grad_arg = row_kernel_io(logits, target, compute_grad)
    n, c = logits.shape
    block_c = row_block_c(c, logits.device)
    if n > 0:
        launch(
            _spherical_z_loss_kernel, (n,), logits, target, loss, grad_arg,
            c, logits.stride(0), ignore_index,
            *hi_lo(a), *hi_lo(b),
            COMPUTE_GRAD=compute_grad, ONE_CHUNK=c <= block_c, BLOCK_C=block_c,
            ATANH_TERMS=17 if loss.dtype == torch.float64 else 9,
            num_warps=row_num_warps(block_c),
        )
    return loss, grad
