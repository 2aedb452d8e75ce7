// The block pipeline of the fused linear margin kernels (margin_linear.cpp and the linear
// forms of sharded.cpp): a loss over
//
//   cos = x_hat w_hat^T,  x_hat_i = x_i / m_i,  w_hat_j = w_j / n_j,
//   m_i = max(||x_i||, eps),  n_j = max(||w_j||, eps),  eps = 1e-12  (as F.normalize)
//
// (normalize=False: cos = x w^T), without ever storing the N x C matrix. What a row of
// cosines becomes (a loss, per-row statistics, a gradient) is the epilogue's business; the
// pipeline does the matmuls, the normalisation and its gradient.
//
// Gradient. Let G_ij = r_i d loss_i / d cos_ij: the gradient row that the epilogue writes
// over the cosine row, with its row weight r_i. Without normalisation grad_x = G w and
// grad_w = G^T x. With it, d x_hat_i / d x_i = (I - [||x_i|| >= eps] x_hat_i x_hat_i^T) / m_i
// (where the max picks eps, m_i is a constant and only 1/m_i is left: clamp_min has zero
// gradient there, as in F.normalize's autograd), so
//
//   grad_x_i = (V_i - [||x_i|| >= eps] x_hat_i (x_hat_i . V_i)) / m_i,  V_i = sum_j G_ij w_hat_j
//   grad_w_j = (U_j - [||w_j|| >= eps] w_hat_j (w_hat_j . U_j)) / n_j,  U_j = sum_i G_ij x_hat_i
//
// The radial terms are the row and column sums of G * cos, which need no pass of their own:
// sum_j G_ij cos_ij = x_hat_i . V_i and sum_i G_ij cos_ij = w_hat_j . U_j. With the
// column-scaled G'_ij = G_ij / n_j both products become plain matmuls with the weight as
// stored (no normalised copy of it): V = G' w, and U' = G'^T x_hat = U / n (per row j), so
//
//   grad_w_j = U'_j - [||w_j|| >= eps] w_hat_j (w_hat_j . U'_j).
//
// Pipeline (Liger-style: the gradient is made during the forward pass). Rows go in blocks
// of B, in a fixed order; per block:
//   1. x_hat of the block (B x D, acc dtype; x itself when no conversion is needed);
//   2. matmul 1: P = x_hat_blk w^T into one reused B x C buffer (ATen's mm_out: MKL);
//   3. epilogue, rows in parallel: cos_ij = P_ij / n_j in place, then the epilogue of the
//      op on the row (with gradients: it writes d loss_i / d cos_ij over the row and returns
//      r_i), then G'_ij = r_i G_ij / n_j in place;
//   4. matmul 2: V_blk = G'_blk w, then the projection above row by row into grad_x;
//   5. matmul 3: U' += G'_blk^T x_hat_blk (the first block writes U', later ones addmm_
//      into it; U' lives in grad_w itself, or in an fp32 C x D buffer for fp16 / bf16).
// After the last block, grad_w_j is projected column by column. So: three matmul passes
// in all, each a sequence of one GEMM per block; the N x C matrix exists one B x C block
// at a time. Without gradients only steps 1 to 3 run. Peak extra memory: the outputs (for
// fp16 / bf16 also the fp32 accumulator of grad_w), the B x C block, and O(B D + C) more
// (plus a 4 MiB weight slice for fp16 / bf16).
//
// Block size: block_size rows, or (0) as many rows as make the B x C block about 32 MiB
// but at least 128, then evened out over the blocks. The floor is for the GEMMs: with few
// rows matmul 3 is a rank-B update of grad_w, which reads and writes all of grad_w once per
// block, and matmul 1 repacks all of w once per block: that traffic, O(C D) per block, is
// O(C D N / B) in all, and B >= 128 keeps it small against the O(N C D) of the products.
//
// fp16 / bf16: every matmul runs in fp32. The block of x is converted (and normalised)
// into the fp32 B x D buffer; the weight is converted a slice of ~4 MiB of fp32 at a time
// (two passes per block, one for matmul 1 and one for matmul 2), never as a whole; grad_w
// is accumulated in an fp32 C x D buffer and converted at the end.
//
// Determinism: there are no atomics, the blocks run in a fixed order, every reduction
// (row statistics, per-row and per-column projections) is sequential within its row or
// column, and the GEMMs are MKL's, which are reproducible run to run for the same thread
// count on 64-byte-aligned buffers (ATen's).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "memory.h"
#include "vec_math.h"

namespace fusedloss {
namespace cpu {
namespace linear {

constexpr double kNormEps = 1e-12;                       // F.normalize's default eps
constexpr int64_t kBlockBytes = int64_t(32) << 20;       // target size of the B x C block
constexpr int64_t kMinBlockRows = 128;                   // unless block_size says otherwise
constexpr int64_t kWeightSliceBytes = int64_t(4) << 20;  // fp32 weight slice (fp16 / bf16)

// sum_k x_k^2 in acc_t.
template <typename scalar_t, typename acc_t>
FL_CPU_CLONES acc_t sum_squares(const scalar_t* x, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) {
    const acc_t v = static_cast<acc_t>(x[k]);
    s += v * v;
  }
  return s;
}

// out_k = x_k / divisor (the F.normalize of one row, or a plain conversion for divisor 1).
template <typename scalar_t, typename acc_t>
FL_CPU_CLONES void divide_row(const scalar_t* x, acc_t* out, int64_t n, acc_t divisor) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<acc_t>(x[k]) / divisor;
}

// row_j /= max(norm_j, eps): the cosines, rounded once from P_ij as x_hat_i . w_hat_j is
// (a product with 1 / n_j would round twice, and for D = 1 give 1 - ulp instead of 1, where
// arccos is steepest).
template <typename acc_t>
FL_CPU_CLONES void divide_by_norms(acc_t* row, const acc_t* norm, acc_t eps, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] /= (norm[j] > eps ? norm[j] : eps);
}

// row_j *= factor * col_j
template <typename acc_t>
FL_CPU_CLONES void scale_by_columns(acc_t* row, const acc_t* col, int64_t n, acc_t factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= factor * col[j];
}

template <typename acc_t>
FL_CPU_CLONES void scale_row(acc_t* row, int64_t n, acc_t factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= factor;
}

// out_k = (v_k - coef u_k) / divisor with u = src / src_div and coef = u . v when `radial`
// (else 0): the gradient through one F.normalize (header comment). With radial = false and
// divisor = 1 a plain conversion of v.
template <typename src_t, typename acc_t, typename out_t>
FL_CPU_CLONES void project_row(const acc_t* v, const src_t* src, acc_t src_div, bool radial,
                               acc_t divisor, out_t* out, int64_t n) {
  acc_t dot = 0;
  if (radial) {
#pragma omp simd reduction(+ : dot)
    for (int64_t k = 0; k < n; ++k) dot += (static_cast<acc_t>(src[k]) / src_div) * v[k];
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const acc_t u = static_cast<acc_t>(src[k]) / src_div;
    out[k] = static_cast<out_t>((v[k] - dot * u) / divisor);
  }
}

// How the gradient through the F.normalize of a row with norm norms[i] is projected (header
// comment): the radial term applies when ||x|| >= eps, and the row was divided by
// max(||x||, eps). Without normalisation: no radial term and a divisor of 1.
template <typename acc_t>
struct RowNormalisation {
  bool radial;
  acc_t divisor;
};

template <typename acc_t>
inline RowNormalisation<acc_t> row_normalisation(bool normalize, const acc_t* norms, int64_t i,
                                                  acc_t eps) {
  if (!normalize) return {false, acc_t(1)};
  return {norms[i] >= eps, std::max(norms[i], eps)};
}

// Rows per block: block_size, or a B x C block of about kBlockBytes but at least
// kMinBlockRows rows; then the same number of blocks with rows evened out over them (e.g.
// 1000 rows, at most 128 each: 8 blocks of 125 rows, not 7 of 128 and one of 104).
inline int64_t rows_per_block(int64_t N, int64_t C, int64_t block_size, int64_t acc_bytes) {
  int64_t b = block_size > 0
                  ? block_size
                  : std::max(kMinBlockRows, kBlockBytes / (std::max<int64_t>(C, 1) * acc_bytes));
  b = std::min(b, std::max<int64_t>(N, 1));
  const int64_t blocks = (N + b - 1) / b;
  return blocks > 0 ? (N + blocks - 1) / blocks : b;
}

// The checks every linear op makes of embeddings [N, D], weight [C, D] and target [N].
inline void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                         int64_t block_size, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": embeddings must be 2-D [N, D], got ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": weight must be 2-D [C, D], got ", w.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": embeddings must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), op,
                   ": embeddings and weight must share a dtype, got ", x.scalar_type(), " and ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), op,
                    ": embeddings [N, D] and weight [C, D] must share D, got ", x.sizes(),
                    " and ", w.sizes());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == x.size(0), op,
                    ": target must have shape [", x.size(0), "], got ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
                   target.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && target.device().is_cpu(), op,
              ": embeddings, weight and target must be on the CPU, got ", x.device(), ", ",
              w.device(), " and ", target.device());
  TORCH_CHECK_VALUE(block_size >= 0, op,
                    ": block_size must be >= 0 (0: the kernel chooses), got ", block_size);
}

// grad_x [N, D] and grad_w [C, D] for the pipeline with gradients (grad_w written by the
// first block, so zeros only when there is none), empty tensors without.
inline std::tuple<at::Tensor, at::Tensor> gradient_outputs(const at::Tensor& x,
                                                           const at::Tensor& w, bool grad) {
  if (!grad) return {at::empty({0}, x.options()), at::empty({0}, w.options())};
  const int64_t N = x.size(0), D = x.size(1), C = w.size(0);
  return {at::empty({N, D}, x.options()),
          N == 0 ? at::zeros({C, D}, w.options()) : at::empty({C, D}, w.options())};
}

// Runs the pipeline of the header comment over contiguous x [N, D], w [C, D] (N >= 1).
// `epilogue(row, i)` gets row i's C cosines (acc_t, in place). With kGrad it overwrites
// them with d loss_i / d cos_ij and returns the row weight r_i (the pipeline scales the row
// by it), and grad_x, grad_w are filled; without, its return value is not used.
template <typename scalar_t, bool kGrad, typename Epilogue>
void run_blocks(const at::Tensor& x, const at::Tensor& w, bool normalize, int64_t block_size,
                const Epilogue& epilogue, at::Tensor& grad_x, at::Tensor& grad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;  // fp16 / bf16
  const int64_t N = x.size(0), D = x.size(1), C = w.size(0);
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t eps = acc_t(kNormEps);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const int64_t row_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));

  // Norms of the weight rows: n_j = max(||w_j||, eps) and 1 / n_j.
  at::Tensor w_norm, w_inv;
  if (normalize) {
    w_norm = at::empty({C}, acc_opts);
    w_inv = at::empty({C}, acc_opts);
    acc_t* norm = w_norm.data_ptr<acc_t>();
    acc_t* inv = w_inv.data_ptr<acc_t>();
    at::parallel_for(0, C, row_grain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        norm[j] = std::sqrt(sum_squares<scalar_t, acc_t>(wp + j * D, D));
        inv[j] = acc_t(1) / std::max(norm[j], eps);
      }
    });
  }

  // grad_w accumulates U' (normalize) or G^T x, in acc dtype; the first block writes it
  // (so no zeroing pass), on huge pages where Linux has them (memory.h).
  at::Tensor gw_acc;
  if constexpr (kGrad) {
    gw_acc = kConvert ? at::empty({C, D}, acc_opts) : grad_w;
    advise_huge_pages(gw_acc.data_ptr(), gw_acc.nbytes());
  }

  const int64_t B = rows_per_block(N, C, block_size, sizeof(acc_t));
  at::Tensor blk = at::empty({B, C}, acc_opts);
  const bool own_x = normalize || kConvert;  // x_hat (or converted x) in a B x D buffer
  at::Tensor xb = own_x ? at::empty({B, D}, acc_opts) : at::Tensor();
  at::Tensor x_norm = at::empty({B}, acc_opts);
  const bool own_vx = kGrad && own_x;
  at::Tensor vx = own_vx ? at::empty({B, D}, acc_opts) : at::Tensor();
  const int64_t slice = std::min<int64_t>(
      C, std::max<int64_t>(1, kWeightSliceBytes / (std::max<int64_t>(D, 1) * 4)));
  at::Tensor w_slice = kConvert ? at::empty({slice, D}, acc_opts) : at::Tensor();

  const acc_t* inv_n = normalize ? w_inv.data_ptr<acc_t>() : nullptr;
  const acc_t* w_norm_p = normalize ? w_norm.data_ptr<acc_t>() : nullptr;
  acc_t* blk_p = blk.data_ptr<acc_t>();

  for (int64_t i0 = 0; i0 < N; i0 += B) {
    const int64_t rows = std::min(B, N - i0);
    at::Tensor blk_v = blk.narrow(0, 0, rows);

    // 1. x_hat of the block (or x converted to fp32).
    at::Tensor x_src;
    if (own_x) {
      acc_t* xbp = xb.data_ptr<acc_t>();
      acc_t* xn = x_norm.data_ptr<acc_t>();
      at::parallel_for(0, rows, row_grain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const scalar_t* xi = xp + (i0 + r) * D;
          xn[r] = normalize ? std::sqrt(sum_squares<scalar_t, acc_t>(xi, D)) : acc_t(1);
          divide_row(xi, xbp + r * D, D, row_normalisation(normalize, xn, r, eps).divisor);
        }
      });
      x_src = xb.narrow(0, 0, rows);
    } else {
      x_src = x.narrow(0, i0, rows);
    }

    // 2. matmul 1: P = x_src w^T.
    if constexpr (kConvert) {
      for (int64_t c0 = 0; c0 < C; c0 += slice) {
        const int64_t cn = std::min(slice, C - c0);
        at::Tensor ws = w_slice.narrow(0, 0, cn);
        ws.copy_(w.narrow(0, c0, cn));
        at::Tensor out = blk_v.narrow(1, c0, cn);
        at::mm_out(out, x_src, ws.t());
      }
    } else {
      at::mm_out(blk_v, x_src, w.t());
    }

    // 3. epilogue: cos in place, then the op's epilogue, then G' in place.
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        acc_t* row = blk_p + r * C;
        if (normalize) divide_by_norms(row, w_norm_p, eps, C);
        if constexpr (kGrad) {
          const acc_t ri = epilogue(row, i0 + r);
          if (normalize) {
            scale_by_columns(row, inv_n, C, ri);
          } else if (ri != acc_t(1)) {
            scale_row(row, C, ri);
          }
        } else {
          epilogue(row, i0 + r);
        }
      }
    });
    if constexpr (!kGrad) continue;

    // 4. matmul 2: V = G' w, then grad_x (projected when normalising).
    if (!own_vx) {
      at::Tensor gx = grad_x.narrow(0, i0, rows);
      at::mm_out(gx, blk_v, w);
    } else {
      at::Tensor vx_v = vx.narrow(0, 0, rows);
      if constexpr (kConvert) {
        for (int64_t c0 = 0; c0 < C; c0 += slice) {
          const int64_t cn = std::min(slice, C - c0);
          at::Tensor ws = w_slice.narrow(0, 0, cn);
          ws.copy_(w.narrow(0, c0, cn));
          if (c0 == 0) {
            at::mm_out(vx_v, blk_v.narrow(1, c0, cn), ws);
          } else {
            vx_v.addmm_(blk_v.narrow(1, c0, cn), ws);
          }
        }
      } else {
        at::mm_out(vx_v, blk_v, w);
      }
      const acc_t* vxp = vx.data_ptr<acc_t>();
      const acc_t* xbp = xb.data_ptr<acc_t>();
      const acc_t* xn = x_norm.data_ptr<acc_t>();
      scalar_t* gxp = grad_x.data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const RowNormalisation<acc_t> x_r = row_normalisation(normalize, xn, r, eps);
          project_row(vxp + r * D, xbp + r * D, acc_t(1), x_r.radial, x_r.divisor,
                      gxp + (i0 + r) * D, D);
        }
      });
    }

    // 5. matmul 3: U' += G'^T x_src (U' = for the first block).
    if (i0 == 0) {
      at::mm_out(gw_acc, blk_v.t(), x_src);
    } else {
      gw_acc.addmm_(blk_v.t(), x_src);
    }
  }

  // grad_w: the projection of U' (normalize), or the conversion of the fp32 accumulator.
  if (kGrad && (normalize || kConvert)) {
    const acc_t* up = gw_acc.data_ptr<acc_t>();
    scalar_t* gwp = grad_w.data_ptr<scalar_t>();
    at::parallel_for(0, C, row_grain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const RowNormalisation<acc_t> w_j = row_normalisation(normalize, w_norm_p, j, eps);
        project_row(up + j * D, wp + j * D, w_j.divisor, w_j.radial, acc_t(1), gwp + j * D, D);
      }
    });
  }
}

}  // namespace linear
}  // namespace cpu
}  // namespace fusedloss
