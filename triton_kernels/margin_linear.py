"""Fused linear margin softmax cross-entropy (ArcFace, CosFace, SphereFace, combined,
ElasticFace on top of the classifier matmul) in Triton: the blocked matrix product with the
margin and the log-sum-exp fused into its tile epilogue. The N x C matrix of cosines is never
stored, in the forward or the backward pass.

Math
----
x = embeddings [N, D], w = weight [C, D], target y [N]. With normalize (as F.normalize)

    m_i = max(||x_i||, 1e-12),  n_j = max(||w_j||, 1e-12),  x^_i = x_i / m_i,  w^_j = w_j / n_j
    cos_ij = x^_i . w^_j = (x_i . w_j) / (m_i n_j)

(normalize=False: cos_ij = x_i . w_j, m = n = 1). Row i is then the row of the logit-level op,
derived in csrc/include/fusedloss/margin.h and implemented in triton_kernels/margin.py; the
target logit and its slope are _common.target_logit, shared with that kernel:

    z_ij = s cos_ij (j != y),  z_iy = s (psi(m1 theta + m2) - m3),  slope_i = dz_iy / dcos_iy
    M = max_j z_j,  S_o = sum_{j != y} exp(z_j - M),  S = S_o + exp(z_y - M)
    loss_i = (M - z_y) + log S + eps (z_y - sum_j z_j / C) + lambda (M + log S)^2

(the last term, PaLM's auxiliary lambda lse^2 with lambda = lse_square_scale, only when
lambda > 0; g_i = 2 lambda (M_i + log S_i), 0 without it). The gradient of
L = sum_i r_i loss_i (r = row_grad, ones when absent) with respect to cos is

    G_ij = r_i s ((1 + g_i) exp(z_ij - M_i) / S_i - eps / C)         (j != y_i)
    G_iy = r_i slope_i (eps - eps / C - S_o,i / S_i + g_i exp(z_iy - M_i) / S_i)

and through the matmul and the normalisation (d x^ / d x = (I - x^ x^T) / m where ||x|| > 1e-12,
I / 1e-12 where the norm is clamped):

    A_i = sum_j G_ij w^_j,   P_i = sum_j G_ij cos_ij  (= x^_i . A_i)
    grad_x_i = (A_i - [||x_i|| > 1e-12] P_i x^_i) / m_i
    grad_w_j = (B_j - [||w_j|| > 1e-12] Q_j w^_j) / n_j,   B_j = sum_i G_ij x^_i,  Q_j = sum_i G_ij cos_ij

(normalize=False: grad_x = A, grad_w = B with w^ = w, x^ = x.)

Algorithm
---------
Deterministic run to run: no atomics, every sum in a fixed order set by the shapes, the block
sizes and SPLIT. SPLIT follows the device's SM count (about two programs per SM), so the bits
repeat for the same shapes, dtypes, block_size, TF32 setting and software on GPUs of one
model and SM count, and may differ in the last bits on another SM count or a MIG slice.
`deterministic` is therefore accepted and has nothing to switch.

0. Norms (normalize only): 1/m [N] and 1/n [C] with torch ops, O((N + C) D).
1. `_target_kernel`, grid (N / BLOCK_N): cos_iy = x_i . w_{y_i} / (m_i n_{y_i}) as a gathered
   elementwise dot in the accumulation dtype, then z_iy and slope_i (`target_logit`), O(N D).
   A target outside [0, C) that is not ignore_index reads nothing and gets z_y = NaN, hence a
   NaN loss (and NaN gradients).
2. `_lse_kernel`, grid (N / BLOCK_N, SPLIT): each program walks the class blocks of its part
   of [0, C) (SPLIT parts, so that a small batch still fills the GPU), computes each
   [BLOCK_N, BLOCK_C] cos tile with tl.dot over D in BLOCK_D chunks, scales it by the norms
   and folds it into a per-row online log-sum-exp over j != y (running max from -inf, S_o,
   sum of z for label smoothing). The target column is left out of the tile sums: its logit is
   z_y of step 1. Writes the SPLIT partial (max, S_o, sum z) per row: [3, SPLIT, N].
3. Combine with torch ops, O(SPLIT N): M (the largest of the split maxima and z_y), S_o, S,
   the loss, and for the gradient the per-row coefficients (M, r s (1 + g) / S, r s eps / C,
   G_iy), zero on ignored rows. Saved between the passes: these 4 numbers per row (and the
   norms), nothing of size C or N x C.
4. Only when compute_grad, two kernels that recompute the cos tiles and G tile by tile:
   `_grad_kernel` with OUTER_IS_X, grid (N / BLOCK_O, D / BLOCK_DO, SPLIT): per row block and
   block of output columns of D, loops over the class blocks, accumulating A = G w^ (tl.dot)
   and P = sum_j G_ij cos_ij. The same kernel with the roles of x and w exchanged, grid
   (C / BLOCK_O, D / BLOCK_DO, SPLIT), loops over the row blocks and accumulates B = G^T x^
   and Q. With a single split (SPLIT = 1: enough outer rows to fill the GPU, so always for
   many classes) the kernel applies the projection and 1/m (1/n) itself and writes the
   gradient in the input dtype; otherwise the partial sums go to [SPLIT, rows, D] buffers in
   the accumulation dtype, which torch sums in order before the same projection.

Sharded mode (triton_kernels/sharded.py): the same steps on this rank's weight shard, whose
classes start at class_start. Step 1 with SHARDED gives z_y = 0 for a target in another shard;
step 2's partials, whose max starts at -inf, are this shard's lse_other and sum z; step 4
takes G from the combined per-row coefficients (lse, a, b, d) as coef = (lse, s a, s b, slope d)
and yields this shard's share of the embedding gradient. Every kernel locates the target
column as t - class_start (class_start = 0 here). The steps are public for that use:
`pipeline` (step 0), `target_logits` (1), `split_lse` (2) and `input_grads` (4).

Matmul work, in units of N C D multiply-adds: 1 in the forward; with compute_grad each of
the two gradient kernels adds ceil(D / BLOCK_DO) for recomputing the cos tiles plus 1 for
its product, so 5 in all when D <= BLOCK_DO (on the GPU 256 for fp32, 128 for fp16 and bf16,
32 for fp64), more for wider D (D = 512 in fp64: 2 x (16 + 1) + 1). SPLIT is chosen per kernel so that the grid has about
twice as many programs as the GPU has SMs; a split buffer therefore holds about
2 SMs x BLOCK_O x BLOCK_DO numbers (~17 MB on an H200), and the forward's O(SPLIT N).
Never an N x C buffer.

Precision
---------
Products and sums accumulate in fp32 (fp64 for fp64 inputs; tl.dot accepts fp64 operands
and the interpreter computes it exactly). 16-bit inputs enter tl.dot as they are; in the
backward the G tile and the normalised w^ (or x^) tile are rounded to the input dtype for
the second product, as a 16-bit autograd graph would round them. fp32 inputs follow
torch.backends.cuda.matmul.allow_tf32 (or fp32_precision == "tf32"): tl.dot with
input_precision "tf32", else "ieee". Triton's interpreter (3.9) multiplies bf16 dot operands
as their raw uint16 bits, so under TRITON_INTERPRET=1 bf16 operands are widened to fp32
before tl.dot (exact, as the GPU's bf16 MMA is). With normalize, the gradient of a zero row
is A / 1e-12 (as in autograd through F.normalize), which overflows fp16 to inf.

Block sizes
-----------
Under TRITON_INTERPRET=1 or for CPU tensors every block is 16 (the smallest tl.dot shape),
so that small test shapes still span several blocks and splits. On the GPU (sm_90), sizes
that keep register spills within a few dozen bytes per thread at D = 512 (ptxas -v):

    dtype        forward BLOCK_N x BLOCK_C x BLOCK_D   gradients BLOCK_O x BLOCK_I x BLOCK_D, BLOCK_DO
    fp16, bf16   128 x 64 x 64, 8 warps                 64 x 32 x 64, <= 128, 8 warps, 1 stage
    fp32         128 x 64 x 32, 8 warps                 64 x 32 x 32, <= 256, 8 warps
    fp64          64 x 64 x 16, 4 warps                 32 x 32 x 16, <= 32, 4 warps

`block_size` > 0 sets the number of embedding rows per block of the matmuls, rounded up to
a power of two in [16, 256] and capped per dtype at the largest size whose variants compile
without register spills (_common.cap_block, BLOCK_CAPS; the table's sizes): BLOCK_N of the
forward kernel (at most 64 for fp64, 128 otherwise), BLOCK_O of the grad_x kernel (at most 32
for fp64, 64 otherwise) and BLOCK_I of the grad_w kernel (at most 32). Above the caps, ptxas -v
reports hundreds of bytes to tens of KB of spills per thread.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss._ops import accumulation_dtype
from fusedloss.triton_kernels._common import (allow_tf32, asin_terms, cap_block, check_args,
                                              dot_tile, from_hi_lo, hi_lo, interpreted, launch,
                                              online_lse_update, pow2_clamp, row_margins,
                                              split_blocks, split_range, target_logit,
                                              target_programs, uses_angle, wide)

_NORM_EPS = 1e-12  # F.normalize's eps
_NORM_EPS_TL = tl.constexpr(_NORM_EPS)


@triton.jit
def _embedding_row_coefs(rows, ok, target_ptr, coef_ptr, N, num_classes, class_start,
                         ignore_index):
    """For embedding rows `rows` (valid where `ok`): whether each is live (not ignored), its
    target's column among the `num_classes` local classes (-1 when not local), and its four
    gradient coefficients (max, a, b, g_y), read from the [4, N] coef buffer."""
    t = tl.load(target_ptr + rows, mask=ok, other=ignore_index)
    live = ok & (t != ignore_index)
    t = t - class_start
    t = tl.where((t >= 0) & (t < num_classes), t, -1).to(tl.int32)
    n = wide(N)  # coef row k starts at k N
    row_max = tl.load(coef_ptr + rows, mask=ok, other=0.0)
    a = tl.load(coef_ptr + n + rows, mask=ok, other=0.0)
    b = tl.load(coef_ptr + 2 * n + rows, mask=ok, other=0.0)
    g_y = tl.load(coef_ptr + 3 * n + rows, mask=ok, other=0.0)
    return live, t, row_max, a, b, g_y


@triton.jit
def _target_kernel(
    x_ptr, w_ptr, rx_ptr, rw_ptr, target_ptr, row_m2_ptr, row_m3_ptr, zy_ptr, slope_ptr,
    N, C, D, x_stride, w_stride, class_start,
    scale_hi, scale_lo, m1_hi, m1_lo, m2_hi, m2_lo, m3_hi, m3_lo,
    NORMALIZE: tl.constexpr, HAS_ROW_M2: tl.constexpr, HAS_ROW_M3: tl.constexpr,
    USE_ANGLE: tl.constexpr, DETACH_MARGIN: tl.constexpr, SHARDED: tl.constexpr,
    ASIN_TERMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Step 1: z_y and dz_y/dcos_y for BLOCK_N rows, whose target column is t - class_start.

    A row whose target column is outside [0, C) gets z_y = NaN (a bad target of the whole
    problem), or with SHARDED z_y = 0 (its target lives in another rank's shard).
    """
    ACC: tl.constexpr = zy_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    t = tl.load(target_ptr + rows, mask=row_ok, other=-1) - class_start
    t_ok = row_ok & (t >= 0) & (t < C)
    t_safe = tl.where(t_ok, t, 0)  # no read outside [0, C)

    dot = tl.zeros([BLOCK_N], ACC)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks[None, :] < D
        xv = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :],
                     mask=row_ok[:, None] & k_ok, other=0.0)
        wv = tl.load(w_ptr + t_safe[:, None] * w_stride + ks[None, :],
                     mask=t_ok[:, None] & k_ok, other=0.0)
        dot += tl.sum(xv.to(ACC) * wv.to(ACC), axis=1)
    c_y = dot
    if NORMALIZE:
        c_y = (c_y * tl.load(rx_ptr + rows, mask=row_ok, other=0.0)
               * tl.load(rw_ptr + t_safe, mask=t_ok, other=0.0))

    scale = from_hi_lo(scale_hi, scale_lo, ACC)
    m1 = from_hi_lo(m1_hi, m1_lo, ACC)
    m2, m3 = row_margins(rows, row_ok, row_m2_ptr, row_m3_ptr, m2_hi, m2_lo, m3_hi, m3_lo,
                         HAS_ROW_M2, HAS_ROW_M3, ACC)
    z_y, slope = target_logit(c_y, scale, m1, m2, m3, USE_ANGLE, DETACH_MARGIN, ASIN_TERMS)
    if SHARDED:
        z_y = tl.where(t_ok, z_y, 0.0)
    else:
        z_y = tl.where(t_ok, z_y, float("nan"))
    tl.store(zy_ptr + rows, z_y, mask=row_ok)
    tl.store(slope_ptr + rows, slope + tl.zeros([BLOCK_N], ACC), mask=row_ok)


# Logit transforms of the sharded ops and the stats engine (margin.h, "Logit transforms").
# The fused linear kernels take softcap and the threshold as constexpr values (SOFTCAP,
# FILTER; 0.0: off), so that their plain variants keep the signature and code they had; a
# value is a compile-time constant, fp32 when it meets fp64 data (the threshold then sits
# within 3e-9 of the asked one).

@triton.jit
def _ratio(num: tl.constexpr, den: tl.constexpr, ACC: tl.constexpr):
    """num / den rounded once in ACC (a float literal would be an fp32 constant)."""
    return tl.full([], num, ACC) / den


@triton.jit
def tanh(x):
    """tanh(x) in the dtype of x, without libdevice (which the interpreter cannot run): for
    |x| >= 0.1, (1 - u) / (1 + u) with u = exp(-2 |x|) (1 - u >= 0.18, so no cancellation);
    below, the odd Taylor series up to x^13 (the first omitted term is below 2e-17 of the
    value). NaN stays NaN, +-inf gives +-1."""
    ACC: tl.constexpr = x.dtype
    ax = tl.abs(x)
    u = tl.exp(-2.0 * ax)
    large = (1.0 - u) / (1.0 + u)
    x2 = ax * ax
    p = _ratio(21844, 6081075, ACC)
    p = p * x2 - _ratio(1382, 155925, ACC)
    p = p * x2 + _ratio(62, 2835, ACC)
    p = p * x2 - _ratio(17, 315, ACC)
    p = p * x2 + _ratio(2, 15, ACC)
    p = p * x2 - _ratio(1, 3, ACC)
    small = ax + ax * (p * x2)
    r = tl.where(ax < 0.1, small, large)
    return tl.where(x < 0, -r, r)


@triton.jit
def transformed_logits(c, scale, softcap, threshold, SOFTCAP: tl.constexpr,
                       FILTER: tl.constexpr):
    """(z, dz/dc / s) of non-target cosines c under margin.h's logit transforms (softcap,
    inter-class filtering): (s c, 1) without either; the factor is 0 where filtered and
    1 - tanh^2 under the cap."""
    z = scale * c
    factor = tl.full(c.shape, 1.0, c.dtype)
    if FILTER:
        dirty = c > threshold
        z = tl.where(dirty, 0.0, z)
        factor = tl.where(dirty, 0.0, factor)
    if SOFTCAP:
        th = tanh(z / softcap)
        z = softcap * th
        factor = factor * (1.0 - th * th)
    return z, factor


@triton.jit
def capped_target(z_y, slope, softcap, SOFTCAP: tl.constexpr):
    """(h tanh(z_y / h), slope (1 - tanh^2)) with SOFTCAP, else (z_y, slope)."""
    if SOFTCAP:
        th = tanh(z_y / softcap)
        return softcap * th, slope * (1.0 - th * th)
    return z_y, slope


@triton.jit
def _lse_kernel(
    x_ptr, w_ptr, rx_ptr, rw_ptr, target_ptr, part_ptr,
    N, C, D, x_stride, w_stride, blocks_per_split, num_splits, class_start,
    scale_hi, scale_lo,
    NORMALIZE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr = 0.0, FILTER: tl.constexpr = 0.0,
):
    """Step 2: per-row online log-sum-exp over the classes j != y of one split, from cos tiles.

    The target column is t - class_start; columns j >= C and j = y are left out of the sums,
    so the partial (max, S_o, sum z) stands on its own: the single-process combine adds z_y,
    the sharded one reports it as this rank's lse_other. The running max starts at -inf (a
    split may hold no column j != y at all), and the sums are rescaled by a reference that
    is 0 while the max is still -inf, so that no -inf - -inf arises.
    """
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    t = tl.load(target_ptr + rows, mask=row_ok, other=-1) - class_start
    t32 = tl.where((t >= 0) & (t < C), t, -1).to(tl.int32)  # 32-bit compares in the tile
    scale = from_hi_lo(scale_hi, scale_lo, ACC)
    if NORMALIZE:
        row_factor = scale * tl.load(rx_ptr + rows, mask=row_ok, other=0.0)  # z = cos_raw s / (m n)

    m_run = tl.full([BLOCK_N], float("-inf"), ACC)
    s_oth = tl.zeros([BLOCK_N], ACC)  # sum_{j != y} exp(z_j - m_run) over this split
    z_sum = tl.zeros([BLOCK_N], ACC)  # sum_{j != y} z_j over this split
    c_begin, c_end = split_range(split, blocks_per_split, BLOCK_C, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        z = dot_tile(x_ptr, w_ptr, rows, cols.to(tl.int64), N, C, D, x_stride, w_stride,
                      BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION, UPCAST)
        if NORMALIZE:
            rw = tl.load(rw_ptr + cols, mask=cols < C, other=0.0)
            z = z * row_factor[:, None] * rw[None, :]
        else:
            z = z * scale
        if SOFTCAP != 0.0 or FILTER != 0.0:  # from z = s cos back to cos, for the transforms
            z, _ = transformed_logits(z / scale, scale, SOFTCAP, FILTER, SOFTCAP != 0.0,
                                      FILTER != 0.0)
        valid = (cols[None, :] < C) & (cols[None, :] != t32[:, None])
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(valid, z, 0.0), axis=1)
        m_run, s_oth = online_lse_update(m_run, s_oth, tl.where(valid, z, float("-inf")), 1)
    out = part_ptr + wide(split) * N + rows  # part: [3, num_splits, N]
    plane = wide(num_splits) * N
    tl.store(out, m_run, mask=row_ok)
    tl.store(out + plane, s_oth, mask=row_ok)
    tl.store(out + 2 * plane, z_sum, mask=row_ok)


@triton.jit
def _grad_kernel(
    out_ptr, in_ptr, r_out_ptr, r_in_ptr, norm_out_ptr, target_ptr, coef_ptr, part_ptr, proj_ptr,
    N_OUT, N_IN, N, D, out_stride, in_stride, blocks_per_split, class_start, ignore_index,
    scale_hi, scale_lo,
    OUTER_IS_X: tl.constexpr, NORMALIZE: tl.constexpr, FINAL: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr = 0.0, FILTER: tl.constexpr = 0.0,
):
    """Step 4: sum over the inner rows of one split of G (w^ or x^), and of G * cos.

    OUTER_IS_X: outer rows are embeddings (G rows), inner rows classes: A = G w^, P.
    Else outer rows are classes (G columns), inner rows embeddings: B = G^T x^, Q.
    coef [4, N] holds per embedding row M, r s / S, r s eps / C and G_iy (the sharded op passes
    lse, s a, s b and slope d: the same G). The target column of row i is t_i - class_start.
    FINAL (a single split): write the gradient itself, projection and 1/m included, in the
    dtype of the outer matrix to part [N_OUT, D]. Else the partial sums in the accumulation
    dtype to part [SPLIT, N_OUT, D] and proj [SPLIT, N_OUT], which torch then combines.
    """
    ACC: tl.constexpr = coef_ptr.dtype.element_ty
    IN_TY: tl.constexpr = in_ptr.dtype.element_ty
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    o_rows = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o_rows < N_OUT
    o_idx = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)  # 32-bit copy for the compares
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    scale = from_hi_lo(scale_hi, scale_lo, ACC)
    if NORMALIZE:
        r_o = tl.load(r_out_ptr + o_rows, mask=o_ok, other=0.0)
    if OUTER_IS_X:
        live_o, t_o, max_o, a_o, b_o, gy_o = _embedding_row_coefs(
            o_rows, o_ok, target_ptr, coef_ptr, N, N_IN, class_start, ignore_index)

    acc = tl.zeros([BLOCK_O, BLOCK_DO], ACC)
    proj = tl.zeros([BLOCK_O], ACC)
    i_begin, i_end = split_range(split, blocks_per_split, BLOCK_I, N_IN)
    for i0 in range(i_begin, i_end, BLOCK_I):
        i_idx = i0 + tl.arange(0, BLOCK_I)
        i_rows = i_idx.to(tl.int64)
        i_ok = i_idx < N_IN
        cos = dot_tile(out_ptr, in_ptr, o_rows, i_rows, N_OUT, N_IN, D, out_stride, in_stride,
                        BLOCK_O, BLOCK_I, BLOCK_D, ACC, PRECISION, UPCAST)
        if NORMALIZE:
            r_i = tl.load(r_in_ptr + i_rows, mask=i_ok, other=0.0)
            cos = cos * r_o[:, None] * r_i[None, :]
        # G tile (rows of G along axis 0 when OUTER_IS_X, along axis 1 otherwise); tl.where,
        # not a product with 0, so that ignored rows and padding never bring in inf or NaN.
        # z and dz/dcos / s under the logit transforms (s cos and 1 without them); the
        # coefficients a, b carry s already.
        if SOFTCAP != 0.0 or FILTER != 0.0:
            z, factor = transformed_logits(cos, scale, SOFTCAP, FILTER, SOFTCAP != 0.0,
                                           FILTER != 0.0)
        else:
            z = scale * cos
            factor = 1.0
        if OUTER_IS_X:
            g = factor * (a_o[:, None] * tl.exp(z - max_o[:, None]) - b_o[:, None])
            g = tl.where(i_idx[None, :] == t_o[:, None], gy_o[:, None], g)
            g = tl.where(live_o[:, None] & i_ok[None, :], g, 0.0)
        else:
            live_i, t_i, max_i, a_i, b_i, gy_i = _embedding_row_coefs(
                i_rows, i_ok, target_ptr, coef_ptr, N, N_OUT, class_start, ignore_index)
            g = factor * (a_i[None, :] * tl.exp(z - max_i[None, :]) - b_i[None, :])
            g = tl.where(o_idx[:, None] == t_i[None, :], gy_i[None, :], g)
            g = tl.where(o_ok[:, None] & live_i[None, :], g, 0.0)
        v = tl.load(in_ptr + i_rows[:, None] * in_stride + d_out[None, :],
                    mask=i_ok[:, None] & (d_out[None, :] < D), other=0.0)
        if NORMALIZE:
            proj += tl.sum(g * cos, axis=1)
            v = (v.to(ACC) * r_i[:, None]).to(IN_TY)  # the normalised rows, in the input dtype
        g = g.to(IN_TY)
        if UPCAST:
            v = v.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(g, v, acc, input_precision=PRECISION, out_dtype=ACC)

    out_mask = o_ok[:, None] & (d_out[None, :] < D)
    if FINAL:
        if NORMALIZE:  # (A - [||x|| > eps] P x^) / m
            unit = tl.load(out_ptr + o_rows[:, None] * out_stride + d_out[None, :], mask=out_mask,
                           other=0.0).to(ACC) * r_o[:, None]
            nrm = tl.load(norm_out_ptr + o_rows, mask=o_ok, other=0.0)
            proj = tl.where(nrm > tl.full([], _NORM_EPS_TL, ACC), proj, 0.0)
            acc = (acc - proj[:, None] * unit) * r_o[:, None]
        tl.store(part_ptr + o_rows[:, None] * D + d_out[None, :],
                 acc.to(part_ptr.dtype.element_ty), mask=out_mask)
    else:
        # part [SPLIT, N_OUT, D]
        out = part_ptr + (wide(split) * N_OUT + o_rows[:, None]) * D + d_out[None, :]
        tl.store(out, acc, mask=out_mask)
        if NORMALIZE:  # every D block computed the same P (or Q); the first one stores it
            tl.store(proj_ptr + wide(split) * N_OUT + o_rows, proj,
                     mask=tl.where(o_ok, pid_d, 1) == 0)


# ---------------------------------------------------------------------------------------
# Launcher


def _config(dtype: torch.dtype, d: int, device: torch.device, block_size: int) -> dict:
    """Block sizes and launch options (module docstring, "Block sizes")."""
    if interpreted(device):
        cfg = dict(fwd_n=16, fwd_c=16, fwd_d=16, fwd_warps=1, fwd_stages=1,
                   tgt_n=16, tgt_d=16, tgt_warps=1,
                   g_o=16, g_i=16, g_d=16, g_do=16, g_warps=1, g_stages=1)
    elif dtype == torch.float64:
        cfg = dict(fwd_n=64, fwd_c=64, fwd_d=16, fwd_warps=4, fwd_stages=2,
                   tgt_n=16, tgt_d=32, tgt_warps=4,
                   g_o=32, g_i=32, g_d=16, g_do=pow2_clamp(d, 16, 32), g_warps=4, g_stages=2)
    elif dtype == torch.float32:
        cfg = dict(fwd_n=128, fwd_c=64, fwd_d=32, fwd_warps=8, fwd_stages=3,
                   tgt_n=16, tgt_d=64, tgt_warps=4,
                   g_o=64, g_i=32, g_d=32, g_do=pow2_clamp(d, 16, 256), g_warps=8, g_stages=2)
    else:  # fp16, bf16
        cfg = dict(fwd_n=128, fwd_c=64, fwd_d=64, fwd_warps=8, fwd_stages=3,
                   tgt_n=16, tgt_d=64, tgt_warps=4,
                   g_o=64, g_i=32, g_d=64, g_do=pow2_clamp(d, 16, 128), g_warps=8, g_stages=1)
    cfg.update(g_o_x=cfg["g_o"], g_i_w=cfg["g_i"])  # embedding-row blocks of the gradient kernels
    if block_size > 0:  # embedding rows per block of the matmuls, capped (cap_block)
        rows = pow2_clamp(block_size, 16, 256)
        cfg.update(fwd_n=cap_block(rows, dtype, "linear_rows"),
                   g_o_x=cap_block(rows, dtype, "linear_grad_x"),
                   g_i_w=cap_block(rows, dtype, "linear_grad_w"))
    return cfg


class Pipeline(NamedTuple):
    """One call's inputs, made ready for the kernels, and its launch settings."""
    x: Tensor  # embeddings [N, D], unit stride along D
    w: Tensor  # weight [C, D], unit stride along D
    target: Tensor
    acc: torch.dtype  # fp32, or fp64 for fp64 inputs
    cfg: dict
    precision: str
    upcast: bool
    n_target: int
    normalize: bool
    # 1 / max(||x_i||, eps) [N], 1 / max(||w_j||, eps) [C] and the norms ||x_i||, ||w_j||;
    # without normalize all four are one placeholder that the kernels do not read.
    rx: Tensor
    rw: Tensor
    norm_x: Tensor
    norm_w: Tensor


def pipeline(embeddings: Tensor, weight: Tensor, target: Tensor, normalize: bool,
             block_size: int) -> Pipeline:
    """Step 0: layouts, block sizes, and the norms."""
    x = embeddings if embeddings.stride(-1) == 1 else embeddings.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    dev = x.device
    acc = accumulation_dtype(x)
    if normalize:
        norm_x = torch.linalg.vector_norm(x, dim=1, dtype=acc)
        norm_w = torch.linalg.vector_norm(w, dim=1, dtype=acc)
        rx = 1.0 / norm_x.clamp_min(_NORM_EPS)
        rw = 1.0 / norm_w.clamp_min(_NORM_EPS)
    else:
        rx = rw = norm_x = norm_w = torch.zeros(1, dtype=acc, device=dev)
    return Pipeline(
        x=x, w=w, target=target.contiguous(), acc=acc,
        cfg=_config(x.dtype, x.shape[1], dev, block_size),
        precision="tf32" if (x.dtype == torch.float32 and allow_tf32()) else "ieee",
        upcast=interpreted(dev) and x.dtype == torch.bfloat16, n_target=target_programs(dev),
        normalize=normalize, rx=rx, rw=rw, norm_x=norm_x, norm_w=norm_w)


def target_logits(p: Pipeline, row_m2: Optional[Tensor], row_m3: Optional[Tensor], scale: float,
                  m1: float, m2: float, m3: float, detach_margin: bool, class_start: int,
                  sharded: bool) -> tuple[Tensor, Tensor]:
    """Step 1: z_y [N] and dz_y/dcos_y [N] (see _target_kernel for rows whose target column
    t - class_start is not in [0, C))."""
    (n, d), c = p.x.shape, p.w.shape[0]
    z_y = torch.empty(n, dtype=p.acc, device=p.x.device)
    slope = torch.empty_like(z_y)
    placeholder = p.rx
    cfg = p.cfg
    launch(_target_kernel, (triton.cdiv(n, cfg["tgt_n"]),),
        p.x, p.w, p.rx, p.rw, p.target,
        row_m2.contiguous() if row_m2 is not None else placeholder,
        row_m3.contiguous() if row_m3 is not None else placeholder,
        z_y, slope, n, c, d, p.x.stride(0), p.w.stride(0), class_start,
        *hi_lo(scale), *hi_lo(m1), *hi_lo(m2), *hi_lo(m3),
        NORMALIZE=p.normalize, HAS_ROW_M2=row_m2 is not None, HAS_ROW_M3=row_m3 is not None,
        USE_ANGLE=uses_angle(row_m2, m1, m2), DETACH_MARGIN=detach_margin,
        SHARDED=sharded, ASIN_TERMS=asin_terms(p.acc),
        BLOCK_N=cfg["tgt_n"], BLOCK_D=cfg["tgt_d"], num_warps=cfg["tgt_warps"], num_stages=2,
    )
    return z_y, slope


def split_lse(p: Pipeline, scale: float, class_start: int, with_sum: bool,
              softcap: float = 0.0, threshold: float = 0.0) -> Tensor:
    """Step 2: the partials [3, SPLIT, N] (max, S_o, sum z over j != y) of each split of the
    classes; sum z only when with_sum (else the third row is 0); z under the logit transforms
    when softcap or threshold is set (the sharded ops)."""
    (n, d), c = p.x.shape, p.w.shape[0]
    cfg = p.cfg
    row_blocks = triton.cdiv(n, cfg["fwd_n"])
    splits, per_split = split_blocks(row_blocks, triton.cdiv(c, cfg["fwd_c"]), p.n_target)
    part = torch.empty((3, splits, n), dtype=p.acc, device=p.x.device)
    launch(_lse_kernel, (row_blocks, splits),
        p.x, p.w, p.rx, p.rw, p.target, part, n, c, d, p.x.stride(0), p.w.stride(0), per_split,
        splits, class_start, *hi_lo(scale),
        NORMALIZE=p.normalize, HAS_SMOOTHING=with_sum, SOFTCAP=float(softcap),
        FILTER=float(threshold),
        BLOCK_N=cfg["fwd_n"], BLOCK_C=cfg["fwd_c"], BLOCK_D=cfg["fwd_d"],
        PRECISION=p.precision, UPCAST=p.upcast, num_warps=cfg["fwd_warps"],
        num_stages=cfg["fwd_stages"],
    )
    return part


def input_grads(p: Pipeline, coef: Tensor, scale: float, class_start: int,
                ignore_index: int, softcap: float = 0.0,
                threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """Step 4: the gradients with respect to embeddings and weight of sum_ij G_ij cos_ij, G
    given per row by coef [4, N] (see _grad_kernel), in the dtypes of the inputs; G of the
    transformed logits when softcap or threshold is set (the sharded ops)."""
    (n, d), c = p.x.shape, p.w.shape[0]
    cfg, dev, acc, normalize = p.cfg, p.x.device, p.acc, p.normalize
    scale_args = hi_lo(scale)
    transforms = dict(SOFTCAP=float(softcap), FILTER=float(threshold))

    def grad_pass(outer, inner, r_out, r_in, norm_out, n_out, n_in, outer_is_x, block_o, block_i):
        o_blocks, d_blocks = triton.cdiv(n_out, block_o), triton.cdiv(d, cfg["g_do"])
        g_splits, g_per = split_blocks(o_blocks * d_blocks, triton.cdiv(n_in, block_i), p.n_target)
        final = g_splits == 1  # the kernel writes the gradient itself
        if final:
            g_part = torch.empty((n_out, d), dtype=outer.dtype, device=dev)
        else:
            g_part = torch.empty((g_splits, n_out, d), dtype=acc, device=dev)
        g_proj = torch.empty((g_splits, n_out), dtype=acc, device=dev) if normalize else p.rx
        if d > 0:
            launch(_grad_kernel, (o_blocks, d_blocks, g_splits),
                outer, inner, r_out, r_in, norm_out, p.target, coef, g_part, g_proj,
                n_out, n_in, n, d, outer.stride(0), inner.stride(0), g_per, class_start,
                ignore_index, *scale_args,
                OUTER_IS_X=outer_is_x, NORMALIZE=normalize, FINAL=final, BLOCK_O=block_o,
                BLOCK_I=block_i, BLOCK_D=cfg["g_d"], BLOCK_DO=cfg["g_do"], PRECISION=p.precision,
                UPCAST=p.upcast, num_warps=cfg["g_warps"], num_stages=cfg["g_stages"],
                **transforms,
            )
        if final:
            return g_part
        total = g_part.sum(0)
        if not normalize:
            return total.to(outer.dtype)
        proj = torch.where(norm_out > _NORM_EPS, g_proj.sum(0), torch.zeros_like(norm_out))
        unit = outer.to(acc) * r_out[:, None]
        return ((total - proj[:, None] * unit) * r_out[:, None]).to(outer.dtype)

    grad_x = grad_pass(p.x, p.w, p.rx, p.rw, p.norm_x, n, c, True, cfg["g_o_x"], cfg["g_i"])
    grad_w = grad_pass(p.w, p.x, p.rw, p.rx, p.norm_w, c, n, False, cfg["g_o"], cfg["g_i_w"])
    return grad_x, grad_w


def margin_linear_cross_entropy(
    embeddings: Tensor, weight: Tensor, target: Tensor, row_m2: Optional[Tensor],
    row_m3: Optional[Tensor], row_grad: Optional[Tensor], scale: float, m1: float, m2: float,
    m3: float, detach_margin: bool, label_smoothing: float, lse_square_scale: float,
    ignore_index: int, normalize: bool, block_size: int, deterministic: bool, compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """fusedloss::margin_linear_cross_entropy (_schemas.py): per-row loss [N] (fp32, fp64 for
    fp64) and, when compute_grad, the gradients of sum_i row_grad_i loss_i with respect to
    embeddings and weight in their dtypes (else two empty tensors). Target values are not
    checked (a bad one gives a NaN row); the rest as the C++ kernel (check_args).
    `deterministic` changes nothing (every pass here is deterministic)."""
    check_args("margin_linear_cross_entropy", embeddings=embeddings, weight=weight,
               target=target, row_m2=row_m2, row_m3=row_m3, row_grad=row_grad,
               label_smoothing=label_smoothing, block_size=block_size)
    p = pipeline(embeddings, weight, target, normalize, block_size)
    x, w, target, acc = p.x, p.w, p.target, p.acc
    n, c = x.shape[0], w.shape[0]
    empty = x.new_empty(0)
    loss = torch.zeros(n, dtype=acc, device=x.device)
    if n == 0:
        if compute_grad:
            return loss, torch.zeros_like(x), torch.zeros_like(w)
        return loss, empty, w.new_empty(0)

    z_y, slope = target_logits(p, row_m2, row_m3, scale, m1, m2, m3, detach_margin,
                                class_start=0, sharded=False)
    part = split_lse(p, scale, class_start=0, with_sum=label_smoothing != 0.0)

    # 3. Combine the splits and the target logit: loss, and the per-row coefficients of G.
    part_max, part_oth, part_z = part.unbind(0)
    row_max = torch.maximum(part_max.amax(0), z_y)  # a bad target's NaN z_y propagates
    s_oth = (part_oth * torch.exp(part_max - row_max)).sum(0)
    s_all = s_oth + torch.exp(z_y - row_max)
    row_loss = (row_max - z_y) + torch.log(s_all)
    if label_smoothing != 0.0:
        row_loss = row_loss + label_smoothing * (z_y - (part_z.sum(0) + z_y) / c)  # part_z: j != y
    if lse_square_scale != 0.0:  # lambda lse^2; its gradient is g softmax_j, g = 2 lambda lse
        lse = row_max + torch.log(s_all)
        row_loss = row_loss + lse_square_scale * lse * lse
    live = target != ignore_index
    loss = torch.where(live, row_loss, torch.zeros_like(row_loss))
    if not compute_grad:
        return loss, empty, w.new_empty(0)

    r = row_grad.to(acc) if row_grad is not None else torch.ones_like(row_loss)
    inv_s = 1.0 / s_all
    uniform = label_smoothing / c
    zero = torch.zeros_like(row_loss)
    d_y = (label_smoothing - uniform) - s_oth * inv_s
    p_scale = inv_s
    if lse_square_scale != 0.0:
        z_grad = 2.0 * lse_square_scale * lse
        d_y = d_y + z_grad * (torch.exp(z_y - row_max) * inv_s)
        p_scale = inv_s * (1.0 + z_grad)
    coef = torch.stack([
        torch.where(live, row_max, zero),
        torch.where(live, r * scale * p_scale, zero),
        torch.where(live, r * (scale * uniform), zero),
        torch.where(live, r * slope * d_y, zero),
    ])
    grad_x, grad_w = input_grads(p, coef, scale, class_start=0, ignore_index=ignore_index)
    return loss, grad_x, grad_w
