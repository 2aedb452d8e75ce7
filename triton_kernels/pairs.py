"""Pair losses (multi-similarity, SupCon / InfoNCE, contrastive, batch-hard mining) in Triton:
the similarity matrix S = x ref^T is made tile by tile with tl.dot and folded at once into
per-row statistics. No N x M matrix or mask is stored, in the forward or the backward pass.

Contract: the schemas and comments of pair_extrema, pair_row_stats and pair_row_stats_backward
in fusedloss/_schemas.py. The per-pair math is derived in csrc/include/fusedloss/pairs.h; in brief:

Scores and pairs. x [N, D] queries, r [M, D] references, S_ij = x_i . r_j. The score v_ij is
S_ij (DISTANCE 0) or d_ij = sqrt(max(|x_i|^2 + |r_j|^2 - 2 S_ij, 0)) (DISTANCE 1; the max
keeps NaN, as pairs.h's). (i, j) is a
pair unless self_offset >= 0 and j = (self_offset + i) mod M; positive when the labels agree,
negative otherwise. The kinds write their formulas in v, so S for distance 0.

Near pairs (DISTANCE 1; derivation and error bounds in pairs.h, "Near-duplicate pairs"): where
d^2 < kappa (|x_i|^2 + |r_j|^2), kappa = 2^-6, the Gram form cancels, so `_score_tile` takes d^2
= sum_k (x_ik - r_jk)^2 from the differences instead: one compare per entry, and only in a
tile with such a pair a 3-D [BLOCK_Q, BLOCK_R, BLOCK_K] broadcast of differences over chunks
of BLOCK_K coordinates. The backward takes the near pairs out of W and of the sums of a (their
entries 0 there) and adds a_ij (x_i - r_j) from the differences (`_add_near_pair_terms`) in a
second pass over only the tiles that hold a near pair (`_near_pair_pass`).

Per-row statistics and their derivatives dstat/dv_ij (zero outside the pairs named):
  KIND 0, multi-similarity, hyper (alpha, beta, base, eps), with zp = -alpha (v - base) and
    zn = beta (v - base), over the kept pairs (with thresholds (max_neg_i, min_pos_i): a
    positive is kept iff v - eps < max_neg_i, a negative iff v + eps > min_pos_i; all without):
      P_i = log(1 + sum_pos exp(zp_ij)),   dP_i/dv_ij = -alpha exp(zp_ij - P_i)
      Q_i = log(1 + sum_neg exp(zn_ij)),   dQ_i/dv_ij =  beta exp(zn_ij - Q_i)
    The kernel keeps log sum exp(z) without the "1 +"; the combine below adds exp(0).
  KIND 1, SupCon / InfoNCE, hyper (t):
      L_i = log sum_pairs exp(v_ij / t),   dL_i/dv_ij = exp(v_ij / t - L_i) / t
      T_i = sum_pos v_ij / t,              dT_i/dv_ij = 1 / t,       and the count of positives
    A row without pairs gets L = -inf.
  KIND 2, contrastive, hyper (m_pos, m_neg), sigma = +1 (DISTANCE 1) or -1 (DISTANCE 0):
      l_pos = relu(sigma (v - m_pos)),     dl_pos/dv = sigma [not l_pos <= 0]
      l_neg = relu(sigma (m_neg - v)),     dl_neg/dv = -sigma [not l_neg <= 0]
    (relu' as torch's: 0 at 0, 1 at a NaN l, whose gradient passes on; pairs.h).
    stats: (sum l_pos, #(l_pos > 0), sum l_neg, #(l_neg > 0)).
  KIND 3, orthogonal projection, hyper (absolute), f(v) = v, or |v| when absolute:
      stats (sum_pos v, #pos, sum_neg f(v), #neg),   dstat_0/dv = [pos],
      dstat_2/dv = [neg] f'(v), f'(v) = 1 or sgn(v) (0 at 0, NaN at NaN, as torch's abs').
    The kernel folds the two sums; the counts depend on the labels alone and come from them
    in the launcher (`_pair_counts`: a sort of ref_labels and two searchsorted), which keeps
    the fp32 tile loop within 255 registers without spills.
Every log-sum-exp is online and max-rescaled: per row a running max m (starting at -inf) and
s = sum exp(z - m); a block with new max m' rescales s by exp(m - m'), with the shift taken as 0
while m' is still -inf, so that -inf - -inf never appears.

Backward. With g = grad_stats (the counts' columns ignored), G_ij = sum_k g_ik dstat_ik/dv_ij.
DISTANCE 0: dL/dS = G, so grad_x_i = sum_j G_ij r_j and grad_r_j = sum_i G_ij x_i.
DISTANCE 1: dd/dS = -1/d and dd/dx_i = (x_i - r_j) / d, so with a_ij = G_ij / d_ij (0 where
d_ij = 0, as torch.cdist's gradient; NaN where d_ij is NaN, as pairs.h's) and W = dL/dS = -a:
    grad_x_i = sum_j W_ij r_j + x_i sum_j a_ij,    grad_r_j = sum_i W_ij x_i + r_j sum_i a_ij.

Passes. Each recomputes its S tiles; deterministic run to run: no atomics, every sum in an
order fixed by the shapes, the block sizes and SPLIT, which follows the SM count (below): the
same bits on GPUs of one model and SM count with the same software. To fill the GPU when one
side is short (a memory bank: N = 256, M = 65,536), every kernel splits its inner loop into
SPLIT contiguous ranges of blocks (a third grid axis), chosen so that the grid has about twice
as many programs as the GPU has SMs (4 under the interpreter, so that tests take several
splits); torch combines the splits in order.
  pair_extrema: `_extrema_kernel`, grid (N / BLOCK_Q, SPLIT): a block of query rows walks its
    split's reference blocks keeping per row the smallest key and its first column for the
    positives and for the negatives, key = v for distance 0 and -d for distance 1 (so that the
    hardest positive has the smallest key), negated for the negatives. A later block, and in
    the combine a later split, replaces the pick only when strictly smaller: ties keep the
    first column. NaN counts as smaller than every number (torch.min's rule): a NaN score
    wins with its first column, so NaN reaches the losses built on the picks. The combine
    turns keys back into values.
  pair_row_stats: `_row_stats_kernel`, grid (N / BLOCK_Q, SPLIT): one pass of the split's
    reference blocks writing the running state per row, [SPLIT, N, 4]: (m, s) of each
    log-sum-exp (kinds 0, 1) and plain sums; the combine rescales the (m, s) pairs to their
    common max, adds exp(0) for kind 0's "1 +" term, and adds the sums.
  pair_row_stats_backward: `_grad_kernel` once per gradient asked for. grad_x, grid
    (N / BLOCK_Q, D / BLOCK_DO, SPLIT): a block of query rows and a block of output columns of
    D loops over the split's reference blocks, acc += W r (tl.dot), and sums a for the x_i
    term; grad_ref (REF_SIDE), grid (M / BLOCK_R, D / BLOCK_DO, SPLIT): a block of references
    loops over the query blocks, acc += W^T x. Both build the W tile with `_grad_tile` in the
    [query, reference] orientation. Distance 1 leaves the near pairs out of that loop and
    stores an int8 flag per program and inner block, 1 where the tile holds a near pair; once
    the sums are stored, `_near_pair_pass` (a noinline function: a real call, so that its
    registers are not held in the main loop) walks the split's flagged tiles in order, redoes
    each one's scores with the near distances from the differences, and adds the near pairs'
    terms to the stored sums. One split at distance 0 writes the gradient in the input dtype;
    otherwise the kernel writes [SPLIT, rows, D] (SPLIT = 1 included) in the accumulation
    dtype, added in split order and rounded to the input dtype by torch.
Memory: O((N + M) D) for the inputs and gradients, O(SPLIT N) for the forward partials and
O(SPLIT (N or M) D) for split gradients, O(N M D / (BLOCK_Q BLOCK_R BLOCK_DO)) bytes of
near-pair flags at distance 1; never O(N M).

Precision: S and every statistic accumulate in fp32 (fp64 for fp64 inputs); 16-bit tiles enter
tl.dot as they are (fp32 accumulate), and the W tile is rounded to the input dtype for the
backward product, as a 16-bit autograd graph rounds dL/dS. fp32 inputs follow
torch.backends.cuda.matmul.allow_tf32 as triton_kernels/margin_linear.py does; with tf32 the
Gram form's error is ~2^-11 (|x|^2 + |r|^2) rather than ~D 2^-24 of it, so the distances of
the pairs that are not near carry up to ~2^-11 / kappa = 3% (near pairs stay exact). Under
TRITON_INTERPRET=1, bf16 dot operands are widened to fp32 first (the interpreter multiplies
bf16 as raw bits; the widening is exact). Hyperparameters go to the kernels as fp32 hi + lo.

Block sizes. Under the interpreter (or for CPU tensors) 16 everywhere, so that small test
shapes span several blocks. On the GPU (sm_90), sizes that keep every kernel's register
spills within a few dozen bytes per thread (cuobjdump) under the launch's usual
specialization (16-byte aligned pointers; N, M, D and strides multiples of 16):

    dtype        BLOCK_Q x BLOCK_R   BLOCK_D   BLOCK_DO (backward)   warps
    fp16, bf16   64 x 64             64        <= 128                8
    fp32         64 x 64             32 (D = 1: 16)  <= 128          8
    fp64         32 x 32             16        <= 64                 4

BLOCK_K (near pairs only) keeps their 3-D tile at about 16 values per thread: 1 for 64 x 64 and
8 warps, 2 for 32 x 32 and 4 warps. The backward's near-pair terms run in a noinline call
(`_near_pair_pass`) after the main loop, so that their registers are not held across it:
that call's saved registers are most of the backward's stack at distance 1.

block_size > 0 sets BLOCK_Q = BLOCK_R: a power of two in [16, 128], capped per dtype at the
largest size whose variants compile without register spills (_common.cap_block, BLOCK_CAPS:
the table's sizes, 32 for fp64 and 64 otherwise; at 128, ptxas -v reports hundreds of bytes to
tens of KB of spills per thread).
"""
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss._ops import accumulation_dtype
from fusedloss.triton_kernels._common import (allow_tf32, cap_block, check_args, dot_tile,
                                              from_hi_lo, hi_lo, interpreted, launch, load_rows,
                                              nan_maximum, nan_min, online_lse_update, pow2_clamp,
                                              split_blocks, split_range, target_programs, wide)

_NO_COLUMN = tl.constexpr(-1)  # the index of an empty extremum
_NEAR_FRACTION = tl.constexpr(2.0 ** -6)  # kappa of pairs.h: the Gram form serves above it


# ---------------------------------------------------------------------------------------
# Tiles shared by every pass


@triton.jit
def _direct_squared_distances(x_ptr, ref_ptr, rows, cols, N, M, D, x_stride, ref_stride,
                              BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_Q, BLOCK_R] of sum_k (x_ik - r_jk)^2 from the differences, in ACC: a 3-D
    [BLOCK_Q, BLOCK_R, BLOCK_K] broadcast per chunk of BLOCK_K coordinates."""
    d2 = tl.zeros([BLOCK_Q, BLOCK_R], ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xk = load_rows(x_ptr, rows, N, ks, D, x_stride, False).to(ACC)
        rk = load_rows(ref_ptr, cols, M, ks, D, ref_stride, False).to(ACC)
        diff = xk[:, None, :] - rk[None, :, :]
        d2 += tl.sum(diff * diff, axis=2)
    return d2


@triton.jit
def _score_tile(x_ptr, ref_ptr, nx_ptr, nr_ptr, rows, cols, skip, N, M, D, x_stride, ref_stride,
                DISTANCE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, DIRECT: tl.constexpr):
    """(v, near) on the [BLOCK_Q, BLOCK_R] tile: the scores v, S or the euclidean distance,
    and the mask of the near pairs (module docstring; all False for DISTANCE 0). The Gram
    form serves unless a pair of the tile is near; then, when DIRECT, the tile's near entries
    are redone from the differences (without DIRECT they keep the Gram form's value, for a
    caller that leaves them out)."""
    v = dot_tile(x_ptr, ref_ptr, rows, cols, N, M, D, x_stride, ref_stride,
                  BLOCK_Q, BLOCK_R, BLOCK_D, ACC, PRECISION, UPCAST)
    near = tl.zeros([BLOCK_Q, BLOCK_R], tl.int1)
    if DISTANCE == 1:
        nx = tl.load(nx_ptr + rows, mask=rows < N, other=0.0)
        nr = tl.load(nr_ptr + cols, mask=cols < M, other=0.0)
        norms = nx[:, None] + nr[None, :]
        d2 = nan_maximum(norms - 2.0 * v, 0.0)  # keeps NaN (pairs.h)
        paired = ((rows[:, None] < N) & (cols[None, :] < M)
                  & (cols.to(tl.int32)[None, :] != skip[:, None]))
        near = paired & (d2 < _NEAR_FRACTION * norms)
        if DIRECT:
            if tl.max(near.to(tl.int32)) > 0:
                direct = _direct_squared_distances(x_ptr, ref_ptr, rows, cols, N, M, D,
                                                   x_stride, ref_stride, BLOCK_Q, BLOCK_R,
                                                   BLOCK_K, ACC)
                d2 = tl.where(near, direct, d2)
        v = tl.sqrt(d2)
    return v, near


@triton.jit
def _hyper(h0_hi, h0_lo, h1_hi, h1_lo, h2_hi, h2_lo, h3_hi, h3_lo, ACC: tl.constexpr):
    """The four hyperparameters of a kind (unused ones 0), rebuilt from fp32 hi + lo pairs."""
    return (from_hi_lo(h0_hi, h0_lo, ACC), from_hi_lo(h1_hi, h1_lo, ACC),
            from_hi_lo(h2_hi, h2_lo, ACC), from_hi_lo(h3_hi, h3_lo, ACC))


@triton.jit
def _excluded_column(rows, M, self_offset):
    """Per row, the column that is no pair of it: (self_offset + i) mod M, or -1 for none
    (32-bit, as the column compares of the tiles are)."""
    return tl.where(self_offset >= 0, (self_offset + rows) % tl.maximum(M, 1), -1).to(tl.int32)


@triton.jit
def _pair_masks(row_labels, skip, ref_labels_ptr, rows, cols, N, M):
    """(positive, negative) masks of the [query, reference] tile."""
    col_ok = cols < M
    col_labels = tl.load(ref_labels_ptr + cols, mask=col_ok, other=0)
    pair = (rows[:, None] < N) & col_ok[None, :] & (cols.to(tl.int32)[None, :] != skip[:, None])
    same = row_labels[:, None] == col_labels[None, :]
    return pair & same, pair & (~same)


@triton.jit
def _row_block(labels_ptr, N, M, self_offset, BLOCK_Q: tl.constexpr):
    """(split, rows, row_ok, row_labels, skip) of a forward program: grid (N / BLOCK_Q, SPLIT)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < N
    row_labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    return (tl.program_id(1).to(tl.int64), rows, row_ok, row_labels,
            _excluded_column(rows, M, self_offset))


@triton.jit
def _kept_by_thresholds(pos, neg, v, thr_ptr, rows, N, eps, HAS_THRESHOLDS: tl.constexpr):
    """Multi-similarity mining: a positive stays iff v - eps < max_neg, a negative iff
    v + eps > min_pos (thresholds [N, 2] = (max_neg, min_pos)); all pairs without thresholds."""
    if HAS_THRESHOLDS:
        row_ok = rows < N
        max_neg = tl.load(thr_ptr + 2 * rows, mask=row_ok, other=0.0).to(v.dtype)
        min_pos = tl.load(thr_ptr + 2 * rows + 1, mask=row_ok, other=0.0).to(v.dtype)
        pos = pos & (v - eps < max_neg[:, None])
        neg = neg & (v + eps > min_pos[:, None])
    return pos, neg


@triton.jit
def _projection_term(v, absolute):
    """Kind 3's f(v) of a negative pair: |v| when absolute (1), else v."""
    return tl.where(absolute != 0, tl.abs(v), v)


@triton.jit
def _projection_slope(v, absolute):
    """f'(v): sgn(v) when absolute (v * 0 keeps 0 at 0 and NaN at NaN), else 1."""
    sgn = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, v * 0.0))
    return tl.where(absolute != 0, sgn, 1.0)


@triton.jit
def _row_column(ptr, rows, N, K: tl.constexpr, k: tl.constexpr, ACC: tl.constexpr):
    """Column k of a row-major [N, K] matrix, for the given rows, in ACC."""
    return tl.load(ptr + rows * K + k, mask=rows < N, other=0.0).to(ACC)


# ---------------------------------------------------------------------------------------
# pair_extrema


@triton.jit
def _first_min(run_key, run_idx, key, cols):
    """Fold the tile `key` (+inf: no candidate) into a running minimum per row and its first
    column (32-bit): the tile's winner replaces the running one only when strictly smaller, so
    ties keep the earlier block and, within a block, the smallest column. NaN is smaller than
    everything, as in torch.min: a NaN candidate wins, the first NaN column of the row is its
    index, and a row whose candidates are all NaN ends with NaN and a column, not +inf and -1."""
    tile_min = nan_min(key, 1)
    tile_nan = tile_min != tile_min
    hit = (key == tile_min[:, None]) | ((key != key) & tile_nan[:, None])
    first = tl.min(tl.where(hit, cols.to(tl.int32)[None, :], 2**31 - 1), axis=1)
    better = (tile_min < run_key) | (tile_nan & (run_key == run_key))
    return tl.where(better, tile_min, run_key), tl.where(better, first, run_idx)


@triton.jit
def _extrema_kernel(
    x_ptr, labels_ptr, ref_ptr, ref_labels_ptr, nx_ptr, nr_ptr, key_ptr, index_ptr,
    N, M, D, x_stride, ref_stride, self_offset, blocks_per_split,
    DISTANCE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per row and split of the references, the smallest positive key and negated negative
    key and their first columns: key [SPLIT, N, 2], index [SPLIT, N, 2] (module docstring)."""
    ACC: tl.constexpr = key_ptr.dtype.element_ty
    split, rows, row_ok, row_labels, skip = _row_block(labels_ptr, N, M, self_offset, BLOCK_Q)
    pos_key = tl.full([BLOCK_Q], float("inf"), ACC)
    neg_key = tl.full([BLOCK_Q], float("inf"), ACC)
    pos_idx = tl.full([BLOCK_Q], _NO_COLUMN, tl.int32)
    neg_idx = tl.full([BLOCK_Q], _NO_COLUMN, tl.int32)
    c_begin, c_end = split_range(split, blocks_per_split, BLOCK_R, M)
    for c0 in range(c_begin, c_end, BLOCK_R):
        cols = c0 + tl.arange(0, BLOCK_R).to(tl.int64)
        key, _ = _score_tile(x_ptr, ref_ptr, nx_ptr, nr_ptr, rows, cols, skip, N, M, D, x_stride,
                             ref_stride, DISTANCE, BLOCK_Q, BLOCK_R, BLOCK_D, BLOCK_K, ACC,
                             PRECISION, UPCAST, True)
        if DISTANCE == 1:
            key = -key
        pos, neg = _pair_masks(row_labels, skip, ref_labels_ptr, rows, cols, N, M)
        pos_key, pos_idx = _first_min(pos_key, pos_idx, tl.where(pos, key, float("inf")), cols)
        neg_key, neg_idx = _first_min(neg_key, neg_idx, tl.where(neg, -key, float("inf")), cols)
    out = (split * N + rows) * 2
    tl.store(key_ptr + out, pos_key, mask=row_ok)
    tl.store(key_ptr + out + 1, neg_key, mask=row_ok)
    tl.store(index_ptr + out, pos_idx.to(tl.int64), mask=row_ok)
    tl.store(index_ptr + out + 1, neg_idx.to(tl.int64), mask=row_ok)


# ---------------------------------------------------------------------------------------
# pair_row_stats


@triton.jit
def _row_stats_kernel(
    x_ptr, labels_ptr, ref_ptr, ref_labels_ptr, nx_ptr, nr_ptr, thr_ptr, part_ptr,
    N, M, D, x_stride, ref_stride, self_offset, blocks_per_split,
    h0_hi, h0_lo, h1_hi, h1_lo, h2_hi, h2_lo, h3_hi, h3_lo,
    KIND: tl.constexpr, DISTANCE: tl.constexpr, HAS_THRESHOLDS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per row and split of the references, the running state part [SPLIT, N, 4] of loss KIND
    in one pass (module docstring): kind 0 (m_pos, s_pos, m_neg, s_neg), two log-sum-exps
    without their "1 +" term; kind 1 (m, s, sum_pos v / t, count); kind 2 the four sums;
    kind 3 (sum_pos v, 0, sum_neg f(v), 0), its counts made by the launcher."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    split, rows, row_ok, row_labels, skip = _row_block(labels_ptr, N, M, self_offset, BLOCK_Q)
    h0, h1, h2, h3 = _hyper(h0_hi, h0_lo, h1_hi, h1_lo, h2_hi, h2_lo, h3_hi, h3_lo, ACC)
    zero = tl.zeros([BLOCK_Q], ACC)
    a0 = zero + float("-inf") if KIND < 2 else zero  # a log-sum-exp's running max
    a1 = zero
    a2 = zero + float("-inf") if KIND == 0 else zero
    a3 = zero
    c_begin, c_end = split_range(split, blocks_per_split, BLOCK_R, M)
    for c0 in range(c_begin, c_end, BLOCK_R):
        cols = c0 + tl.arange(0, BLOCK_R).to(tl.int64)
        v, _ = _score_tile(x_ptr, ref_ptr, nx_ptr, nr_ptr, rows, cols, skip, N, M, D, x_stride,
                           ref_stride, DISTANCE, BLOCK_Q, BLOCK_R, BLOCK_D, BLOCK_K, ACC,
                           PRECISION, UPCAST, True)
        pos, neg = _pair_masks(row_labels, skip, ref_labels_ptr, rows, cols, N, M)
        if KIND == 0:  # hyper (alpha, beta, base, eps)
            pos, neg = _kept_by_thresholds(pos, neg, v, thr_ptr, rows, N, h3, HAS_THRESHOLDS)
            a0, a1 = online_lse_update(a0, a1, tl.where(pos, -h0 * (v - h2), float("-inf")), 1)
            a2, a3 = online_lse_update(a2, a3, tl.where(neg, h1 * (v - h2), float("-inf")), 1)
        elif KIND == 1:  # hyper (t)
            z = v / h0
            a0, a1 = online_lse_update(a0, a1, tl.where(pos | neg, z, float("-inf")), 1)
            a2 += tl.sum(tl.where(pos, z, 0.0), axis=1)
            a3 += tl.sum(pos.to(ACC), axis=1)
        elif KIND == 3:  # hyper (absolute); the counts come from the labels (launcher)
            a0 += tl.sum(tl.where(pos, v, 0.0), axis=1)
            a2 += tl.sum(tl.where(neg, _projection_term(v, h0), 0.0), axis=1)
        else:  # hyper (m_pos, m_neg)
            sigma = 1.0 if DISTANCE == 1 else -1.0
            l_pos = tl.where(pos, nan_maximum(sigma * (v - h0), 0.0), 0.0)  # relu keeping NaN
            l_neg = tl.where(neg, nan_maximum(sigma * (h1 - v), 0.0), 0.0)
            a0 += tl.sum(l_pos, axis=1)
            a1 += tl.sum((l_pos > 0).to(ACC), axis=1)
            a2 += tl.sum(l_neg, axis=1)
            a3 += tl.sum((l_neg > 0).to(ACC), axis=1)
    out = part_ptr + (split * N + rows) * 4
    tl.store(out, a0, mask=row_ok)
    tl.store(out + 1, a1, mask=row_ok)
    tl.store(out + 2, a2, mask=row_ok)
    tl.store(out + 3, a3, mask=row_ok)


# ---------------------------------------------------------------------------------------
# pair_row_stats_backward


@triton.jit
def _grad_tile(
    x_ptr, labels_ptr, ref_ptr, ref_labels_ptr, nx_ptr, nr_ptr, thr_ptr, stats_ptr, gstats_ptr,
    i0, outer, N, M, D, x_stride, ref_stride, self_offset, h0, h1, h2, h3,
    KIND: tl.constexpr, DISTANCE: tl.constexpr, HAS_THRESHOLDS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, REF_SIDE: tl.constexpr,
    NEAR_PASS: tl.constexpr,
):
    """(inner, W, a, near) of a gradient program's inner block from i0 on: its inner rows,
    and on the [query, reference] tile that they make with the outer rows (inner x outer for
    REF_SIDE), W = dL/dS, a = G / d and the mask of the near pairs (DISTANCE 1; for DISTANCE 0
    a is W and unused). G = sum_k g_ik dstat_ik / dv_ij, module docstring. The main pass
    (NEAR_PASS False) leaves the near pairs out of W and a (0 there) and takes no difference;
    the near-pair pass keeps a of the near pairs alone, from their distances redone from the
    differences."""
    K: tl.constexpr = 2 if KIND == 0 else (3 if KIND == 1 else 4)
    inner = i0 + tl.arange(0, BLOCK_Q if REF_SIDE else BLOCK_R).to(tl.int64)
    if REF_SIDE:
        rows, cols = inner, outer
    else:
        rows, cols = outer, inner
    row_labels = tl.load(labels_ptr + rows, mask=rows < N, other=0)
    skip = _excluded_column(rows, M, self_offset)
    v, near = _score_tile(x_ptr, ref_ptr, nx_ptr, nr_ptr, rows, cols, skip, N, M, D, x_stride,
                          ref_stride, DISTANCE, BLOCK_Q, BLOCK_R, BLOCK_D, BLOCK_K, ACC,
                          PRECISION, UPCAST, NEAR_PASS)
    pos, neg = _pair_masks(row_labels, skip, ref_labels_ptr, rows, cols, N, M)
    g0 = _row_column(gstats_ptr, rows, N, K, 0, ACC)[:, None]
    if KIND == 0:  # hyper (alpha, beta, base, eps)
        pos, neg = _kept_by_thresholds(pos, neg, v, thr_ptr, rows, N, h3, HAS_THRESHOLDS)
        g1 = _row_column(gstats_ptr, rows, N, K, 1, ACC)[:, None]
        lse_pos = _row_column(stats_ptr, rows, N, K, 0, ACC)[:, None]
        lse_neg = _row_column(stats_ptr, rows, N, K, 1, ACC)[:, None]
        z_pos = tl.where(pos, -h0 * (v - h2), float("-inf"))  # no exp of a pair left out
        z_neg = tl.where(neg, h1 * (v - h2), float("-inf"))
        g = tl.where(pos, -h0 * g0 * tl.exp(z_pos - lse_pos), 0.0)
        g += tl.where(neg, h1 * g1 * tl.exp(z_neg - lse_neg), 0.0)
    elif KIND == 1:  # hyper (t)
        g1 = _row_column(gstats_ptr, rows, N, K, 1, ACC)[:, None]
        lse = _row_column(stats_ptr, rows, N, K, 0, ACC)[:, None]
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # a row without pairs: no term to weigh
        z = tl.where(pos | neg, v / h0, float("-inf"))  # no exp of a pair left out
        g = tl.where(pos | neg, g0 * tl.exp(z - lse) / h0, 0.0)
        g += tl.where(pos, g1 / h0, 0.0)
    elif KIND == 3:  # hyper (absolute)
        g2 = _row_column(gstats_ptr, rows, N, K, 2, ACC)[:, None]
        g = tl.where(pos, g0, 0.0)
        g += tl.where(neg, g2 * _projection_slope(v, h0), 0.0)
    else:  # hyper (m_pos, m_neg)
        g2 = _row_column(gstats_ptr, rows, N, K, 2, ACC)[:, None]
        sigma = 1.0 if DISTANCE == 1 else -1.0
        g = tl.where(pos & ~(sigma * (v - h0) <= 0), sigma * g0, 0.0)  # NaN passes (pairs.h)
        g += tl.where(neg & ~(sigma * (h1 - v) <= 0), -sigma * g2, 0.0)
    a = g
    if DISTANCE == 1:
        a = tl.where(v == 0, 0.0, g / tl.where(v == 0, 1.0, v))  # NaN at a NaN d (pairs.h)
        a = tl.where(near, a, 0.0) if NEAR_PASS else tl.where(near, 0.0, a)
        g = -a
    return inner, g, a, near


@triton.jit
def _dot_operand(w, IN_TY: tl.constexpr, UPCAST: tl.constexpr):
    """The W tile as a tl.dot operand: rounded to the input dtype (widened to fp32 again under
    the interpreter for bf16)."""
    w = w.to(IN_TY)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit
def _add_near_pair_terms(acc, a_near, own_ptr, outer, own_len, own_stride, other_ptr, inner0,
                         d_out, D, other_stride, INNER: tl.constexpr, INNER_AXIS: tl.constexpr,
                         ACC: tl.constexpr):
    """acc + sum_n a_near[o, n] (own_o - other_n)[d_out]: the near pairs' part of a distance-1
    gradient, from the differences (module docstring); n runs over the tile's inner rows
    (axis INNER_AXIS of a_near, from inner0 on), o over its outer ones (own rows `outer`).
    Only a tile with a near pair does any of it; then one inner row at a time: its column
    of a_near picked by a masked sum (exact: one term and zeros), and skipped without one."""
    if tl.max((a_near != 0).to(tl.int32)) > 0:
        own = load_rows(own_ptr, outer, own_len, d_out, D, own_stride, False).to(ACC)
        ids = tl.arange(0, INNER)
        for n in range(INNER):
            if INNER_AXIS == 1:
                a_n = tl.sum(tl.where(ids[None, :] == n, a_near, 0.0), axis=1)
            else:
                a_n = tl.sum(tl.where(ids[:, None] == n, a_near, 0.0), axis=0)
            if tl.max((a_n != 0).to(tl.int32)) > 0:
                other_n = tl.load(other_ptr + wide(inner0 + n) * other_stride + d_out,
                                  mask=d_out < D, other=0.0).to(ACC)
                acc += a_n[:, None] * (own - other_n[None, :])
    return acc


@triton.jit
def _grad_program(x_ptr, ref_ptr, grad_ptr, flag_ptr, N, M, D, x_stride, ref_stride,
                  blocks_per_split, OUTER: tl.constexpr, INNER: tl.constexpr,
                  BLOCK_DO: tl.constexpr, REF_SIDE: tl.constexpr):
    """What a program of _grad_kernel works on: its outer rows and output columns, its own and
    the other input (rows, count, stride), the [begin, end) of its split's inner rows, the
    pointers of its output tile and of its row of near-pair flags, and the tile's mask."""
    if REF_SIDE:
        own_ptr, own_len, own_stride = ref_ptr, M, ref_stride
        other_ptr, other_len, other_stride = x_ptr, N, x_stride
    else:
        own_ptr, own_len, own_stride = x_ptr, N, x_stride
        other_ptr, other_len, other_stride = ref_ptr, M, ref_stride
    outer = tl.program_id(0).to(tl.int64) * OUTER + tl.arange(0, OUTER)
    d_out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    i_begin, i_end = split_range(tl.program_id(2), blocks_per_split, INNER, other_len)
    out = grad_ptr + (tl.program_id(2).to(tl.int64) * own_len + outer[:, None]) * D + d_out[None, :]
    flags = flag_ptr + ((tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1))
                        * tl.cdiv(other_len, INNER))
    return (outer, d_out, own_ptr, own_len, own_stride, other_ptr, other_len, other_stride,
            i_begin, i_end, out, flags, (outer[:, None] < own_len) & (d_out[None, :] < D))


@triton.jit
def _grad_kernel(
    x_ptr, labels_ptr, ref_ptr, ref_labels_ptr, nx_ptr, nr_ptr, thr_ptr, stats_ptr, gstats_ptr,
    grad_ptr, flag_ptr, N, M, D, x_stride, ref_stride, self_offset, blocks_per_split,
    h0_hi, h0_lo, h1_hi, h1_lo, h2_hi, h2_lo, h3_hi, h3_lo,
    KIND: tl.constexpr, DISTANCE: tl.constexpr, HAS_THRESHOLDS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    REF_SIDE: tl.constexpr,
):
    """One gradient, grad [SPLIT, outer rows, D], over the inner blocks of one split.
    grad_x (REF_SIDE False): the outer rows are the queries i, the inner ones the references j,
        grad[split, i, d_out] = sum_j W_ij r_j[d_out] (+ x_i[d_out] sum_j a_ij);
    grad_ref (REF_SIDE True): the outer rows are the references j, the inner ones the queries,
        grad[split, j, d_out] = sum_i W_ij x_i[d_out] (+ r_j[d_out] sum_i a_ij).
    Both build the W tile with _grad_tile in the [query, reference] orientation; grad_ref
    multiplies its transpose. Distance 1 leaves the near pairs out here and flags the tiles
    that hold one (flag_ptr: one int8 per program and inner block); after the sums are stored
    (in ACC), _near_pair_pass adds the flagged tiles' near-pair terms to them."""
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    IN_TY: tl.constexpr = x_ptr.dtype.element_ty
    OUTER: tl.constexpr = BLOCK_R if REF_SIDE else BLOCK_Q
    INNER: tl.constexpr = BLOCK_Q if REF_SIDE else BLOCK_R
    INNER_AXIS: tl.constexpr = 0 if REF_SIDE else 1  # of the [query, reference] tiles
    (outer, d_out, own_ptr, own_len, own_stride, other_ptr, other_len, other_stride, i_begin,
     i_end, out, flags, out_mask) = _grad_program(x_ptr, ref_ptr, grad_ptr, flag_ptr, N, M, D,
                                                  x_stride, ref_stride, blocks_per_split, OUTER,
                                                  INNER, BLOCK_DO, REF_SIDE)
    h0, h1, h2, h3 = _hyper(h0_hi, h0_lo, h1_hi, h1_lo, h2_hi, h2_lo, h3_hi, h3_lo, ACC)
    acc = tl.zeros([OUTER, BLOCK_DO], ACC)
    diag = tl.zeros([OUTER], ACC)
    for i0 in range(i_begin, i_end, INNER):
        inner, w, a, near = _grad_tile(
            x_ptr, labels_ptr, ref_ptr, ref_labels_ptr, nx_ptr, nr_ptr, thr_ptr, stats_ptr,
            gstats_ptr, i0, outer, N, M, D, x_stride, ref_stride, self_offset, h0, h1, h2, h3,
            KIND, DISTANCE, HAS_THRESHOLDS, BLOCK_Q, BLOCK_R, BLOCK_D, BLOCK_K, ACC, PRECISION,
            UPCAST, REF_SIDE, False)
        other = load_rows(other_ptr, inner, other_len, d_out, D, other_stride, UPCAST)
        w = _dot_operand(w, IN_TY, UPCAST)
        if REF_SIDE:
            w = tl.trans(w)
        acc = tl.dot(w, other, acc, input_precision=PRECISION, out_dtype=ACC)
        if DISTANCE == 1:
            diag += tl.sum(a, axis=INNER_AXIS)
            tl.store(flags + i0 // INNER, tl.max(near.to(tl.int8)))
    if DISTANCE == 1:
        own = load_rows(own_ptr, outer, own_len, d_out, D, own_stride, False).to(ACC)
        acc += own * diag[:, None]
    tl.store(out, acc.to(grad_ptr.dtype.element_ty), mask=out_mask)
    if DISTANCE == 1:
        tl.debug_barrier()  # the stored sums and flags, seen by every thread of the program
        _near_pair_pass(
            x_ptr, labels_ptr, ref_ptr, ref_labels_ptr, nx_ptr, nr_ptr, thr_ptr, stats_ptr,
            gstats_ptr, grad_ptr, flag_ptr, N, M, D, x_stride, ref_stride, self_offset,
            blocks_per_split, h0, h1, h2, h3, KIND, HAS_THRESHOLDS, BLOCK_Q, BLOCK_R, BLOCK_D,
            BLOCK_K, BLOCK_DO, PRECISION, UPCAST, REF_SIDE)


@triton.jit(noinline=True)
def _near_pair_pass(
    x_ptr, labels_ptr, ref_ptr, ref_labels_ptr, nx_ptr, nr_ptr, thr_ptr, stats_ptr, gstats_ptr,
    grad_ptr, flag_ptr, N, M, D, x_stride, ref_stride, self_offset, blocks_per_split,
    h0, h1, h2, h3, KIND: tl.constexpr, HAS_THRESHOLDS: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    REF_SIDE: tl.constexpr,
):
    """The distance-1 gradient tile of a _grad_kernel program (stored in ACC) += the near
    pairs' terms a_ij (x_i - r_j) from the differences, over the inner blocks that its main
    pass flagged, in order (module docstring). A function of its own, called with scalar
    arguments only, so that the rare near-pair code holds no registers in the main loop."""
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    OUTER: tl.constexpr = BLOCK_R if REF_SIDE else BLOCK_Q
    INNER: tl.constexpr = BLOCK_Q if REF_SIDE else BLOCK_R
    INNER_AXIS: tl.constexpr = 0 if REF_SIDE else 1
    (outer, d_out, own_ptr, own_len, own_stride, other_ptr, other_len, other_stride, i_begin,
     i_end, out, flags, out_mask) = _grad_program(x_ptr, ref_ptr, grad_ptr, flag_ptr, N, M, D,
                                                  x_stride, ref_stride, blocks_per_split, OUTER,
                                                  INNER, BLOCK_DO, REF_SIDE)
    acc = tl.load(out, mask=out_mask, other=0.0)
    for i0 in range(i_begin, i_end, INNER):
        if tl.load(flags + i0 // INNER) != 0:
            _, _, a_near, _ = _grad_tile(
                x_ptr, labels_ptr, ref_ptr, ref_labels_ptr, nx_ptr, nr_ptr, thr_ptr, stats_ptr,
                gstats_ptr, i0, outer, N, M, D, x_stride, ref_stride, self_offset, h0, h1, h2,
                h3, KIND, 1, HAS_THRESHOLDS, BLOCK_Q, BLOCK_R, BLOCK_D, BLOCK_K, ACC, PRECISION,
                UPCAST, REF_SIDE, True)
            acc = _add_near_pair_terms(acc, a_near, own_ptr, outer, own_len, own_stride,
                                       other_ptr, i0, d_out, D, other_stride, INNER, INNER_AXIS,
                                       ACC)
    tl.store(out, acc, mask=out_mask)


# ---------------------------------------------------------------------------------------
# Launchers


def _config(x: Tensor, block_size: int) -> dict:
    """Block sizes and launch options (module docstring)."""
    d = x.shape[1]
    if interpreted(x.device):
        cfg = dict(q=16, r=16, d=16, do=16, warps=1, stages=1)
    elif x.dtype == torch.float64:
        cfg = dict(q=32, r=32, d=16, do=pow2_clamp(d, 16, 64), warps=4, stages=2)
    elif x.dtype == torch.float32:
        # the gradient kernel's tl.dot in ieee fp32 (tf32 off) holds more registers: 1 stage
        # keeps it within 255 a thread. BLOCK_D = 16 for D = 1 (a constant to Triton): one D
        # block either way, the padding columns only add exact zero products.
        cfg = dict(q=64, r=64, d=16 if d == 1 else 32, do=pow2_clamp(d, 16, 128), warps=8,
                   stages=3,
                   grad_stages=3 if allow_tf32() else 1)
    else:
        cfg = dict(q=64, r=64, d=64, do=pow2_clamp(d, 16, 128), warps=8, stages=3)
    if block_size > 0:  # capped (cap_block)
        rows = cap_block(pow2_clamp(block_size, 16, 128), x.dtype, "pair_rows")
        cfg.update(q=rows, r=rows)
    # BLOCK_K of the near pairs' 3-D differences: about 16 values per thread on the GPU.
    threads = 32 * cfg["warps"]
    cfg["k"] = 16 if interpreted(x.device) else max(1, 16 * threads // (cfg["q"] * cfg["r"]))
    return cfg


class _Launch:
    """What every kernel of one call shares: the inputs in kernel layout, squared norms for
    the euclidean distance, hyperparameters as fp32 pairs, and the launch options."""

    def __init__(self, x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, distance: int,
                 self_offset: int, block_size: int, hyper: Sequence[float] = ()):
        self.x = x if x.stride(-1) == 1 else x.contiguous()
        self.ref = ref if ref.stride(-1) == 1 else ref.contiguous()
        self.labels = labels.contiguous()
        self.ref_labels = ref_labels.contiguous()
        self.n, self.d = self.x.shape
        self.m = self.ref.shape[0]
        self.acc = accumulation_dtype(x)
        if distance == 1:
            self.nx = self.x.to(self.acc).square().sum(1)
            self.nr = self.ref.to(self.acc).square().sum(1)
        else:  # unused: the DISTANCE 1 branches are compiled out
            self.nx = self.nr = self.labels
        self.self_offset = self_offset
        self.cfg = _config(self.x, block_size)
        self.hyper = [part for h in (list(hyper) + [0.0] * 4)[:4] for part in hi_lo(float(h))]
        precision = "tf32" if x.dtype == torch.float32 and allow_tf32() else "ieee"
        self.meta = dict(DISTANCE=distance, BLOCK_Q=self.cfg["q"], BLOCK_R=self.cfg["r"],
                         BLOCK_D=self.cfg["d"], BLOCK_K=self.cfg["k"], PRECISION=precision,
                         UPCAST=interpreted(x.device) and x.dtype == torch.bfloat16,
                         num_warps=self.cfg["warps"], num_stages=self.cfg["stages"])

    def inputs(self) -> tuple:
        return self.x, self.labels, self.ref, self.ref_labels, self.nx, self.nr

    def shape_args(self) -> tuple:
        return (self.n, self.m, self.d, self.x.stride(0), self.ref.stride(0), self.self_offset)

    def row_blocks(self) -> int:
        return triton.cdiv(self.n, self.cfg["q"])

    def splits(self, outer_programs: int, inner_len: int, inner_block: int) -> tuple[int, int]:
        """(splits, blocks per split) of an inner loop over inner_len rows in inner_block
        blocks, so that outer_programs x splits programs fill the device."""
        inner_blocks = max(triton.cdiv(inner_len, inner_block), 1)
        return split_blocks(outer_programs, inner_blocks, target_programs(self.x.device))


def pair_extrema(x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, distance: int,
                 self_offset: int, block_size: int) -> tuple[Tensor, Tensor]:
    """fusedloss::pair_extrema (_schemas.py): values [N, 2] (fp32, fp64 for fp64) and first
    indices [N, 2] of each row's hardest positive and negative. Arguments checked as the C++
    kernel checks them (check_args)."""
    check_args("pair_extrema", x=x, labels=labels, ref=ref, ref_labels=ref_labels,
               distance=distance, self_offset=self_offset, block_size=block_size)
    run = _Launch(x, labels, ref, ref_labels, distance, self_offset, block_size)
    splits, per_split = run.splits(run.row_blocks(), run.m, run.cfg["r"])
    keys = torch.empty((splits, run.n, 2), dtype=run.acc, device=x.device)
    index = torch.empty((splits, run.n, 2), dtype=torch.int64, device=x.device)
    if run.n > 0:
        launch(_extrema_kernel, (run.row_blocks(), splits),
            *run.inputs(), keys, index, *run.shape_args(), per_split, **run.meta)
    # Splits hold increasing columns: a later one wins only when strictly harder (NaN the
    # hardest of all, the first NaN winning, as in _first_min).
    best_key, best_index = keys[0], index[0]
    for key, idx in zip(keys[1:], index[1:]):
        better = (key < best_key) | (key.isnan() & ~best_key.isnan())
        best_key = torch.where(better, key, best_key)
        best_index = torch.where(better, idx, best_index)
    # Keys back to values: distance 0 (min_pos S, max_neg S), distance 1 (max_pos d, min_neg d).
    sign = -1.0 if distance == 1 else 1.0
    values = torch.stack([sign * best_key[:, 0], -sign * best_key[:, 1]], 1)
    return values, best_index.clone() if splits == 1 else best_index


def _combine_lse(m: Tensor, s: Tensor, plus_one: bool) -> Tensor:
    """log(sum over splits of s exp(m)) from [SPLIT, N] partial log-sum-exps (m = -inf, s = 0
    for an empty one), with a term exp(0) added when plus_one; -inf when everything is empty."""
    if plus_one:
        m = torch.cat([torch.zeros_like(m[:1]), m])
        s = torch.cat([torch.ones_like(s[:1]), s])
    top = m.amax(0)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    return shift + torch.log((s * torch.exp(m - shift)).sum(0))


def _pair_counts(labels: Tensor, ref_labels: Tensor, self_offset: int,
                 dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(positive, negative) pairs of each row, from the labels alone: the references with the
    row's label and the others, less the excluded column (self_offset >= 0)."""
    m = ref_labels.shape[0]
    ordered = ref_labels.sort().values
    same = (torch.searchsorted(ordered, labels, right=True)
            - torch.searchsorted(ordered, labels, right=False))
    other = m - same
    if self_offset >= 0 and m > 0:
        rows = torch.arange(labels.shape[0], device=labels.device)
        own = ref_labels[(self_offset + rows) % m] == labels
        same, other = same - own.long(), other - (~own).long()
    return same.to(dtype), other.to(dtype)


def _combine_stats(part: Tensor, kind: int, run: "_Launch") -> Tensor:
    """The statistics [N, K] of `kind` from the per-split states part [SPLIT, N, 4]."""
    if kind == 3:
        pos, neg = _pair_counts(run.labels, run.ref_labels, run.self_offset, part.dtype)
        return torch.stack([part[..., 0].sum(0), pos, part[..., 2].sum(0), neg], 1)
    if kind == 0:
        return torch.stack([_combine_lse(part[..., 0], part[..., 1], True),
                            _combine_lse(part[..., 2], part[..., 3], True)], 1)
    if kind == 1:
        return torch.stack([_combine_lse(part[..., 0], part[..., 1], False),
                            part[..., 2].sum(0), part[..., 3].sum(0)], 1)
    return part.sum(0)


def pair_row_stats(x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor,
                   thresholds: Optional[Tensor], kind: int, distance: int, hyper: Sequence[float],
                   self_offset: int, block_size: int) -> Tensor:
    """fusedloss::pair_row_stats (_schemas.py): per-row statistics [N, K] of loss `kind`
    (fp32, fp64 for fp64). Arguments checked as the C++ kernel checks them (check_args)."""
    check_args("pair_row_stats", x=x, labels=labels, ref=ref, ref_labels=ref_labels,
               distance=distance, self_offset=self_offset, block_size=block_size, kind=kind,
               hyper=hyper, thresholds=thresholds)
    run = _Launch(x, labels, ref, ref_labels, distance, self_offset, block_size, hyper)
    splits, per_split = run.splits(run.row_blocks(), run.m, run.cfg["r"])
    part = torch.empty((splits, run.n, 4), dtype=run.acc, device=x.device)
    thr = thresholds.contiguous() if thresholds is not None else part  # unused without
    if run.n > 0:
        launch(_row_stats_kernel, (run.row_blocks(), splits),
            *run.inputs(), thr, part, *run.shape_args(), per_split, *run.hyper,
            KIND=kind, HAS_THRESHOLDS=thresholds is not None, **run.meta)
    return _combine_stats(part, kind, run)


def pair_row_stats_backward(grad_stats: Tensor, stats: Tensor, x: Tensor, labels: Tensor,
                            ref: Tensor, ref_labels: Tensor, thresholds: Optional[Tensor],
                            kind: int, distance: int, hyper: Sequence[float], self_offset: int,
                            block_size: int, x_grad: bool, ref_grad: bool) -> tuple[Tensor, Tensor]:
    """fusedloss::pair_row_stats_backward (_schemas.py): the gradients of
    sum_ik grad_stats_ik stats_ik with respect to x and ref, in their dtypes (an empty tensor
    for each one not asked for). Arguments checked as the C++ kernel checks them (check_args)."""
    check_args("pair_row_stats_backward", x=x, labels=labels, ref=ref, ref_labels=ref_labels,
               distance=distance, self_offset=self_offset, block_size=block_size, kind=kind,
               hyper=hyper, thresholds=thresholds, grad_stats=grad_stats, stats=stats)
    run = _Launch(x, labels, ref, ref_labels, distance, self_offset, block_size, hyper)
    gstats = grad_stats.to(run.acc).contiguous()
    stats = stats.to(run.acc).contiguous()
    thr = thresholds.contiguous() if thresholds is not None else stats  # unused without
    args = (*run.inputs(), thr, stats, gstats)
    meta = dict(run.meta, KIND=kind, HAS_THRESHOLDS=thresholds is not None,
                BLOCK_DO=run.cfg["do"], num_stages=run.cfg.get("grad_stages", run.cfg["stages"]))
    d_blocks = triton.cdiv(run.d, run.cfg["do"])

    def grad(ref_side: bool, outer: Tensor, outer_block: int, inner_len: int,
             inner_block: int) -> Tensor:
        """One gradient: written by the kernel in the input dtype (one split, distance 0), or
        as per-split partial sums in the accumulation dtype that are added here in split
        order."""
        rows = outer.shape[0]
        if rows == 0 or run.d == 0:
            return torch.zeros_like(outer, memory_format=torch.contiguous_format)
        outer_blocks = triton.cdiv(rows, outer_block)
        splits, per_split = run.splits(outer_blocks * d_blocks, inner_len, inner_block)
        shape = (rows, run.d) if splits == 1 else (splits, rows, run.d)
        # distance 1 adds its near pairs' terms to the stored sums: those stay in ACC
        in_acc = splits > 1 or distance == 1
        out = torch.empty(shape, dtype=run.acc if in_acc else outer.dtype, device=x.device)
        # distance 1: the main pass's near-pair flag of each program's inner blocks
        flags = (torch.empty(outer_blocks * d_blocks * triton.cdiv(inner_len, inner_block),
                             dtype=torch.int8, device=x.device) if distance == 1 else out)
        launch(_grad_kernel, (outer_blocks, d_blocks, splits),
            *args, out, flags, *run.shape_args(), per_split, *run.hyper, REF_SIDE=ref_side,
            **meta)
        return (out if splits == 1 else out.sum(0)).to(outer.dtype)

    grad_x = (grad(False, run.x, run.cfg["q"], run.m, run.cfg["r"]) if x_grad
              else x.new_empty(0))
    grad_ref = (grad(True, run.ref, run.cfg["r"], run.n, run.cfg["q"]) if ref_grad
                else ref.new_empty(0))
    return grad_x, grad_ref
