"""Helpers shared by the Triton kernel modules: every kernel module takes what it shares with
another one from here, and none imports another kernel module's private names.

Host side
    hi_lo                a Python float as two fp32 kernel arguments, hi + lo
    interpreted          whether a launch runs under the interpreter (CPU tensors)
    row_layout, row_kernel_io, row_block_c, row_num_warps
                         operands, outputs and launch sizes of the row kernels (one program
                         per row of an [N, C] input, BLOCK_C columns at a time)
    uses_angle, asin_terms
                         the launch constants of the margin target logit
    allow_tf32, pow2_clamp, target_programs, split_blocks
                         precision and block sizes of the tiled (tl.dot) kernels, and the
                         split of an inner loop that fills the device
Device side (@triton.jit, called from the kernels)
    from_hi_lo           the scalar hi + lo in the accumulation dtype
    online_lse_update    one block of a running, max-rescaled log-sum-exp
    row_margins, target_logit (with acos_series, continuation_sign)
                         the margin target logit of csrc/include/fusedloss/margin.h
    load_rows, dot_tile, split_range
                         tiles of the tiled kernels
"""
import functools
import math
import struct
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss._ops import accumulation_dtype, triton_interpreted

# ---------------------------------------------------------------------------------------
# Scalars

def hi_lo(x: float) -> tuple[float, float]:
    """(hi, lo), both exactly representable in fp32, with hi + lo = x to about 48 significant
    bits: Triton passes a Python float as an fp32 kernel argument, and `from_hi_lo` rebuilds
    it in the accumulation dtype."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


@triton.jit
def from_hi_lo(hi, lo, ACC: tl.constexpr):
    """hi + lo, each cast to ACC before the addition (the inverse of `hi_lo`)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


# ---------------------------------------------------------------------------------------
# Online log-sum-exp

@triton.jit
def online_lse_update(m_run, s_run, z, AXIS: tl.constexpr):
    """The running log-sum-exp lse = m + log s, with the block z folded in along AXIS:

        m' = max(m, max_AXIS z),   r = m' (0 while m' = -inf),
        s' = s exp(m - r) + sum_AXIS exp(z - r).

    m_run and s_run have the shape of z reduced over AXIS (a scalar for a 1-D z); z = -inf
    marks an entry left out. The reference r is 0 while every entry so far is left out, so
    that -inf - -inf never arises: an empty sum stays (m, s) = (-inf, 0). NaN in z reaches
    s through exp (tl.max and tl.maximum may drop it from m)."""
    m_new = tl.maximum(m_run, tl.max(z, axis=AXIS))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = s_run * tl.exp(m_run - m_ref) + tl.sum(tl.exp(z - tl.expand_dims(m_ref, AXIS)),
                                                  axis=AXIS)
    return m_new, s_new


# ---------------------------------------------------------------------------------------
# Launch settings

def interpreted(device: torch.device) -> bool:
    """True when a launch on `device` runs under the Triton interpreter (CPU tensors, or
    TRITON_INTERPRET=1): launchers then pick small blocks, so that small test shapes span
    several blocks and splits."""
    return device.type == "cpu" or triton_interpreted()


def row_block_c(num_classes: int, device: torch.device) -> int:
    """BLOCK_C of a row kernel: next_power_of_2(C) in [16, 4096] on the GPU, in [16, 128]
    under the interpreter."""
    cap = 128 if interpreted(device) else 4096
    return max(min(triton.next_power_of_2(num_classes), cap), 16)


def row_num_warps(block_c: int) -> int:
    """num_warps of a row kernel: BLOCK_C / 256 in [1, 16]."""
    return max(1, min(block_c // 256, 16))


def row_layout(rows: Tensor) -> Tensor:
    """`rows` [N, C] itself when its columns have unit stride (any row stride; any layout of
    a single column), else a contiguous copy."""
    return rows if rows.stride(1) == 1 or rows.shape[1] <= 1 else rows.contiguous()


def row_kernel_io(rows: Tensor, target: Tensor, compute_grad: bool):
    """The operands and outputs of a row kernel (one program per row of `rows` [N, C]):
    (`rows` in row_layout, a contiguous `target`, the per-row loss [N] in the accumulation
    dtype, the gradient [N, C] contiguous in the dtype of `rows` (empty unless compute_grad),
    the pointer to pass for the gradient: `loss` when there is none, since the COMPUTE_GRAD
    constexpr removes every use of it)."""
    rows = row_layout(rows)
    n, c = rows.shape
    loss = torch.empty(n, dtype=accumulation_dtype(rows), device=rows.device)
    grad = torch.empty((n, c), dtype=rows.dtype, device=rows.device) if compute_grad \
        else rows.new_empty(0)
    return rows, target.contiguous(), loss, grad, grad if compute_grad else loss


def uses_angle(row_m2: Optional[Tensor], m1: float, m2: float) -> bool:
    """USE_ANGLE of the target logit: whether theta = acos(c_y) enters it (m1 != 1, m2 != 0,
    or per-row m2); else z_y = s (c_y - m3)."""
    return row_m2 is not None or m1 != 1.0 or m2 != 0.0


def asin_terms(acc: torch.dtype) -> int:
    """ASIN_TERMS of acos_series: terms of the asin series that reach the rounding of the
    accumulation dtype (fp64: 25, fp32: 10)."""
    return 25 if acc == torch.float64 else 10


def allow_tf32() -> bool:
    """Whether fp32 tl.dot operands go through tf32, as torch.backends.cuda.matmul says."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses the legacy flag once fp32_precision has been set
        return getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32"


def pow2_clamp(n: int, low: int, high: int) -> int:
    """next_power_of_2(n) clamped to [low, high]."""
    return min(max(triton.next_power_of_2(n), low), high)


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The number of SMs of the CUDA device `device`."""
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def target_programs(device: torch.device) -> int:
    """How many programs a grid should have before its inner loops are split: twice the
    number of SMs on the GPU, 4 under the interpreter (tests then take several splits)."""
    if interpreted(device):
        return 4
    return 2 * sm_count(device)


def split_blocks(outer_programs: int, inner_blocks: int, target: int) -> tuple[int, int]:
    """(number of splits, inner blocks per split): enough contiguous splits of an inner loop
    of `inner_blocks` blocks that outer_programs * splits reaches `target`, every split
    non-empty."""
    want = max(1, min(inner_blocks, triton.cdiv(target, max(outer_programs, 1))))
    per = triton.cdiv(inner_blocks, want)
    return triton.cdiv(inner_blocks, per), per


# ---------------------------------------------------------------------------------------
# Margin target logit (csrc/include/fusedloss/margin.h target_logit)

_PI = tl.constexpr(math.pi)
_THETA_EPS = tl.constexpr(0.01)  # margin.h kThetaEps
_SIN_THETA_EPS = tl.constexpr(math.sin(0.01))


@triton.jit
def acos_series(x, ASIN_TERMS: tl.constexpr):
    """arccos for x in [-1, 1] (NaN passes through) from +, *, / and sqrt only.

    Neither tl.math (Triton 3.9) nor the interpreter offers acos or atan, and
    libdevice.acos does not run under TRITON_INTERPRET=1. Range reduction keeps the
    asin argument u within [-1/2, 1/2]:
        |x| <= 1/2:  acos x = pi/2 - asin x
        x > 1/2:     acos x = 2 asin sqrt((1 - x) / 2)
        x < -1/2:    acos x = pi - 2 asin sqrt((1 + x) / 2)
    1 - |x| is exact for |x| >= 1/2, so acos stays accurate to a few ulp next to
    x = +-1, where acos x ~ sqrt(2 (1 - x)). asin u = sum_n b_n u^(2n+1) / (2n+1) with
    b_0 = 1, b_n = b_(n-1) (2n - 1) / (2n): all terms positive, the n-th below 4^-n u,
    so 10 terms reach fp32 and 25 fp64 rounding.
    """
    ax = tl.abs(x)
    big = ax > 0.5
    u = tl.where(big, tl.sqrt((1.0 - ax) * 0.5), x)
    u2 = u * u
    term = u
    asin_u = u
    for n in tl.static_range(1, ASIN_TERMS):
        term = term * u2 * ((2 * n - 1) / (2 * n))
        asin_u = asin_u + term * (1.0 / (2 * n + 1))
    return tl.where(big, tl.where(x > 0, 2.0 * asin_u, _PI - 2.0 * asin_u), 0.5 * _PI - asin_u)


@triton.jit
def continuation_sign(phi):
    """(-1)^k and k for k = floor(phi / pi): the piece of psi that phi falls in."""
    k = tl.floor(phi / _PI)
    half = k * 0.5
    return tl.where(half == tl.floor(half), 1.0, -1.0), k


@triton.jit
def target_logit(c_y, scale, m1, m2, m3, USE_ANGLE: tl.constexpr, DETACH_MARGIN: tl.constexpr,
                 ASIN_TERMS: tl.constexpr):
    """z_y and dz_y/dc_y (margin.h target_logit) in the dtype of c_y, elementwise: c_y may be
    a scalar or a block (one entry per row); m2 and m3 scalars or blocks like c_y.

        theta = acos(clamp(c_y, -1, 1)),  phi = m1 theta + m2,  k = floor(phi / pi)
        z_y = s ((-1)^k cos(phi) - 2k - m3)                       (s (c_y - m3) without USE_ANGLE)
        dz_y/dc_y = s m1 (-1)^k' sin(phi') / sin(theta'),  theta' = clamp(theta, 0.01, pi - 0.01),
                    phi' = m1 theta' + m2, k' = floor(phi' / pi)    (s with DETACH_MARGIN or
                                                                     without USE_ANGLE)
    """
    ACC = c_y.dtype
    if USE_ANGLE:
        c_cl = tl.where(c_y < -1.0, -1.0, tl.where(c_y > 1.0, 1.0, c_y))  # keeps NaN
        theta = acos_series(c_cl, ASIN_TERMS)
        phi = m1 * theta + m2
        sign, k = continuation_sign(phi)
        z_y = scale * (sign * tl.cos(phi) - 2.0 * k - m3)
        if DETACH_MARGIN:
            slope = scale
        else:
            # tl.full makes the constants in ACC directly (a Python float in tl.where may
            # be rounded through fp32 first). sin(theta) = sqrt((1 - c)(1 + c)) rather than
            # sin(acos(c)): 1 -+ c is exact next to c = +-1, where fp32 theta ~ pi carries
            # an absolute error that would be relative in sin(theta).
            lo = tl.full([], _THETA_EPS, ACC)
            hi = tl.full([], _PI - _THETA_EPS, ACC)
            clamped = (theta < lo) | (theta > hi)
            theta_c = tl.where(theta < lo, lo, tl.where(theta > hi, hi, theta))
            sin_theta_c = tl.where(clamped, tl.full([], _SIN_THETA_EPS, ACC),
                                   tl.sqrt((1.0 - c_cl) * (1.0 + c_cl)))
            phi_c = m1 * theta_c + m2
            sign_c, k_c = continuation_sign(phi_c)
            slope = scale * m1 * sign_c * tl.sin(phi_c) / sin_theta_c
    else:
        z_y = scale * (c_y - m3)
        slope = scale
    return z_y, slope


@triton.jit
def row_margins(rows, row_ok, row_m2_ptr, row_m3_ptr, m2_hi, m2_lo, m3_hi, m3_lo,
                HAS_ROW_M2: tl.constexpr, HAS_ROW_M3: tl.constexpr, ACC: tl.constexpr):
    """m2 and m3 of `rows` (a row index or a block of them, read where row_ok): their
    ElasticFace draws row_m2[rows], row_m3[rows] where given, else the shared scalars from
    their fp32 hi + lo pairs; in ACC."""
    if HAS_ROW_M2:
        m2 = tl.load(row_m2_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    else:
        m2 = from_hi_lo(m2_hi, m2_lo, ACC)
    if HAS_ROW_M3:
        m3 = tl.load(row_m3_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    else:
        m3 = from_hi_lo(m3_hi, m3_lo, ACC)
    return m2, m3


# ---------------------------------------------------------------------------------------
# Tiles of the tiled (tl.dot) kernels

@triton.jit
def load_rows(ptr, rows, n_rows, cols, n_cols, row_stride, UPCAST: tl.constexpr):
    """Tile [len(rows), len(cols)] of a row-major matrix; zero outside [0, n_rows) x [0, n_cols).
    UPCAST (interpreter only, whose tl.dot multiplies bf16 as raw bits) widens it to fp32,
    which is exact."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def dot_tile(a_ptr, b_ptr, a_rows, b_rows, n_a, n_b, D, a_stride, b_stride,
             BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
             ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_A, BLOCK_B] tile of a b^T over the whole of D (BLOCK_D at a time, in order),
    accumulated in ACC; rows outside [0, n_a) or [0, n_b) give 0."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        a = load_rows(a_ptr, a_rows, n_a, ks, D, a_stride, UPCAST)
        b = load_rows(b_ptr, b_rows, n_b, ks, D, b_stride, UPCAST)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def split_range(split, blocks_per_split, BLOCK: tl.constexpr, total):
    """[begin, end): the part of an inner loop over [0, total) that split `split` walks
    (blocks_per_split blocks of BLOCK; see split_blocks)."""
    begin = split * blocks_per_split * BLOCK
    return begin, tl.minimum(begin + blocks_per_split * BLOCK, total)
