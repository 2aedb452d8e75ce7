// CPU kernel of fusedloss::margin_linear_cross_entropy: the margin softmax cross-entropy
// (row math: csrc/include/fusedloss/margin.h, row kernel: margin_row.h) of
//
//   cos = x_hat w_hat^T,  x_hat_i = x_i / m_i,  w_hat_j = w_j / n_j,
//   m_i = max(||x_i||, eps),  n_j = max(||w_j||, eps),  eps = 1e-12  (as F.normalize)
//
// (normalize=False: cos = x w^T), without ever storing the N x C matrix.
//
// Gradient. Let G_ij = r_i d loss_i / d cos_ij: the gradient row that the logit-level row
// kernel writes, times the row weight r_i (row_grad, or 1). Without normalisation
// grad_x = G w and grad_w = G^T x. With it, d x_hat_i / d x_i = (I - [||x_i|| >= eps]
// x_hat_i x_hat_i^T) / m_i (where the max picks eps, m_i is a constant and only 1/m_i is
// left: clamp_min has zero gradient there, as in F.normalize's autograd), so
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
//   3. epilogue, rows in parallel: cos_ij = P_ij / n_j in place, the row kernel of
//      margin_row.h (loss_i, and d loss_i / d cos_ij written over the row in place), then
//      G'_ij = r_i G_ij / n_j in place;
//   4. matmul 2: V_blk = G'_blk w, then the projection above row by row into grad_x;
//   5. matmul 3: U' += G'_blk^T x_hat_blk (the first block writes U', later ones addmm_
//      into it; U' lives in grad_w itself, or in an fp32 C x D buffer for fp16 / bf16).
// After the last block, grad_w_j is projected column by column. So: three matmul passes
// in all, each a sequence of one GEMM per block; the N x C matrix exists one B x C block
// at a time. Peak extra memory: the outputs (for fp16 / bf16 also the fp32 accumulator of
// grad_w), the B x C block, and O(B D + C) more (plus a 4 MiB weight slice for fp16 / bf16).
//
// Block size: block_size rows, or (0) as many rows as make the B x C block about 32 MiB
// but at least 128, then evened out over the blocks. The floor is for the GEMMs: with few
// rows matmul 3 is a rank-B update of grad_w, which reads and writes all of grad_w once per
// block, and matmul 1 repacks all of w once per block. Measured on 2 cores (N = 1024,
// D = 512, C = 100k, fp32, the three GEMMs of all blocks, best of 4): 1.85 s at B = 79
// (a 32 MiB block), 1.31 s at B = 128 (51 MB), 1.22 s at B = 171.
//
// fp16 / bf16: every matmul runs in fp32. The block of x is converted (and normalised)
// into the fp32 B x D buffer; the weight is converted a slice of ~4 MiB of fp32 at a time
// (two passes per block, one for matmul 1 and one for matmul 2), never as a whole; grad_w
// is accumulated in an fp32 C x D buffer and converted at the end.
//
// Determinism: the result does not depend on `deterministic`: there are no atomics, the
// blocks run in a fixed order, every reduction (row statistics, per-row and per-column
// projections) is sequential within its row or column, and the GEMMs are MKL's, which are
// reproducible run to run for the same thread count on 64-byte-aligned buffers (ATen's).
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <fusedloss/margin.h>

#include "margin_row.h"
#include "memory.h"
#include "vec_math.h"

namespace fusedloss {
namespace cpu {
namespace {

constexpr const char* kOp = "margin_linear_cross_entropy";
constexpr double kNormEps = 1e-12;                 // F.normalize's default eps
constexpr int64_t kBlockBytes = int64_t(32) << 20;  // target size of the B x C block
constexpr int64_t kMinBlockRows = 128;              // unless block_size says otherwise
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

// Rows per block: block_size, or a B x C block of about kBlockBytes but at least
// kMinBlockRows rows; then the same number of blocks with rows evened out over them (e.g.
// 1000 rows, at most 128 each: 8 blocks of 125 rows, not 7 of 128 and one of 104).
int64_t rows_per_block(int64_t N, int64_t C, int64_t block_size, int64_t acc_bytes) {
  int64_t b = block_size > 0
                  ? block_size
                  : std::max(kMinBlockRows, kBlockBytes / (std::max<int64_t>(C, 1) * acc_bytes));
  b = std::min(b, std::max<int64_t>(N, 1));
  const int64_t blocks = (N + b - 1) / b;
  return blocks > 0 ? (N + blocks - 1) / blocks : b;
}

template <typename scalar_t>
void run(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
         const std::optional<at::Tensor>& row_m2, const std::optional<at::Tensor>& row_m3,
         const std::optional<at::Tensor>& row_grad, const margin::Params<at::opmath_type<scalar_t>>& params,
         double label_smoothing, double lse_square_scale, int64_t ignore_index, bool normalize,
         int64_t block_size, bool compute_grad, at::Tensor& loss, at::Tensor& grad_x, at::Tensor& grad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;  // fp16 / bf16
  const int64_t N = x.size(0), D = x.size(1), C = w.size(0);
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t eps = acc_t(kNormEps);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();

  // Norms of the weight rows: n_j = max(||w_j||, eps) and 1 / n_j.
  at::Tensor w_norm, w_inv;
  if (normalize) {
    w_norm = at::empty({C}, acc_opts);
    w_inv = at::empty({C}, acc_opts);
    acc_t* norm = w_norm.data_ptr<acc_t>();
    acc_t* inv = w_inv.data_ptr<acc_t>();
    at::parallel_for(0, C, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        norm[j] = std::sqrt(sum_squares<scalar_t, acc_t>(wp + j * D, D));
        inv[j] = acc_t(1) / std::max(norm[j], eps);
      }
    });
  }

  // grad_w accumulates U' (normalize) or G^T x, in acc dtype; the first block writes it
  // (so no zeroing pass), on huge pages where Linux has them (memory.h).
  at::Tensor gw_acc;
  if (compute_grad) {
    gw_acc = kConvert ? at::empty({C, D}, acc_opts) : grad_w;
    advise_huge_pages(gw_acc.data_ptr(), gw_acc.nbytes());
  }

  const int64_t B = rows_per_block(N, C, block_size, sizeof(acc_t));
  at::Tensor blk = at::empty({B, C}, acc_opts);
  const bool own_x = normalize || kConvert;  // x_hat (or converted x) in a B x D buffer
  at::Tensor xb = own_x ? at::empty({B, D}, acc_opts) : at::Tensor();
  at::Tensor x_norm = at::empty({B}, acc_opts);
  const bool own_vx = compute_grad && own_x;
  at::Tensor vx = own_vx ? at::empty({B, D}, acc_opts) : at::Tensor();
  const int64_t slice = std::min<int64_t>(C, std::max<int64_t>(1, kWeightSliceBytes / (std::max<int64_t>(D, 1) * 4)));
  at::Tensor w_slice = kConvert ? at::empty({slice, D}, acc_opts) : at::Tensor();

  const acc_t* inv_n = normalize ? w_inv.data_ptr<acc_t>() : nullptr;
  const acc_t* w_norm_p = normalize ? w_norm.data_ptr<acc_t>() : nullptr;
  const acc_t* r_grad = optional_data<acc_t>(row_grad);
  const acc_t* m2p = optional_data<acc_t>(row_m2);
  const acc_t* m3p = optional_data<acc_t>(row_m3);
  const int64_t* tp = target.data_ptr<int64_t>();
  acc_t* blk_p = blk.data_ptr<acc_t>();
  const int64_t row_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));

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
          divide_row(xi, xbp + r * D, D, normalize ? std::max(xn[r], eps) : acc_t(1));
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

    // 3. epilogue: cos, loss, G' in place.
    const RowArgs<acc_t, acc_t> args{blk_p, C, tp + i0, m2p ? m2p + i0 : nullptr,
                                     m3p ? m3p + i0 : nullptr, params, acc_t(label_smoothing),
                                     acc_t(lse_square_scale), ignore_index, C, loss.data_ptr<acc_t>() + i0,
                                     compute_grad ? blk_p : nullptr, C};
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        acc_t* row = blk_p + r * C;
        if (normalize) divide_by_norms(row, w_norm_p, eps, C);
        const bool counted = margin_row(args, r);
        if (!compute_grad || !counted) continue;
        const acc_t ri = r_grad ? r_grad[i0 + r] : acc_t(1);
        if (normalize) {
          scale_by_columns(row, inv_n, C, ri);
        } else if (r_grad) {
          scale_row(row, C, ri);
        }
      }
    });
    if (!compute_grad) continue;

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
          const bool radial = normalize && xn[r] >= eps;
          const acc_t m = normalize ? std::max(xn[r], eps) : acc_t(1);
          project_row(vxp + r * D, xbp + r * D, acc_t(1), radial, m, gxp + (i0 + r) * D, D);
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
  if (compute_grad && (normalize || kConvert)) {
    const acc_t* up = gw_acc.data_ptr<acc_t>();
    scalar_t* gwp = grad_w.data_ptr<scalar_t>();
    const acc_t* wn = normalize ? w_norm.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, C, row_grain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const bool radial = normalize && wn[j] >= eps;
        const acc_t n = normalize ? std::max(wn[j], eps) : acc_t(1);
        project_row(up + j * D, wp + j * D, n, radial, acc_t(1), gwp + j * D, D);
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_linear_cross_entropy(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& row_m2_in, const std::optional<at::Tensor>& row_m3_in,
    const std::optional<at::Tensor>& row_grad_in, double scale, double m1, double m2, double m3,
    bool detach_margin, double label_smoothing, double lse_square_scale, int64_t ignore_index,
    bool normalize, int64_t block_size, bool deterministic, bool compute_grad) {
  (void)deterministic;  // every run is deterministic (header comment)
  TORCH_CHECK(x_in.dim() == 2, kOp, ": embeddings must be 2-D [N, D], got ", x_in.sizes());
  TORCH_CHECK(w_in.dim() == 2, kOp, ": weight must be 2-D [C, D], got ", w_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), kOp,
              ": embeddings must be a floating tensor, got ", x_in.scalar_type());
  TORCH_CHECK(w_in.scalar_type() == x_in.scalar_type(), kOp,
              ": embeddings and weight must share a dtype, got ", x_in.scalar_type(), " and ",
              w_in.scalar_type());
  TORCH_CHECK_VALUE(w_in.size(1) == x_in.size(1), kOp,
                    ": embeddings [N, D] and weight [C, D] must share D, got ", x_in.sizes(),
                    " and ", w_in.sizes());
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == x_in.size(0), kOp,
              ": target must have shape [", x_in.size(0), "], got ", target_in.sizes());
  TORCH_CHECK(target_in.scalar_type() == at::kLong, kOp, ": target must be int64, got ",
              target_in.scalar_type());
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu() && target_in.device().is_cpu(),
              kOp, ": embeddings, weight and target must be on the CPU, got ", x_in.device(), ", ",
              w_in.device(), " and ", target_in.device());
  TORCH_CHECK_VALUE(block_size >= 0, kOp, ": block_size must be >= 0 (0: the kernel chooses), got ",
                    block_size);
  const int64_t N = x_in.size(0), D = x_in.size(1), C = w_in.size(0);
  const auto acc_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_row_tensor(row_m2_in, "row_m2", N, acc_type, kOp);
  check_row_tensor(row_m3_in, "row_m3", N, acc_type, kOp);
  check_row_tensor(row_grad_in, "row_grad", N, acc_type, kOp);

  const at::Tensor target = target_in.contiguous();
  check_targets(target, C, ignore_index, kOp);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const auto row_m2 = contiguous_or_none(row_m2_in);
  const auto row_m3 = contiguous_or_none(row_m3_in);
  const auto row_grad = contiguous_or_none(row_grad_in);

  at::Tensor loss = at::empty({N}, x.options().dtype(acc_type));
  at::Tensor grad_x = compute_grad ? at::empty({N, D}, x.options()) : at::empty({0}, x.options());
  // grad_w: written by the first block (below), zero when there is none.
  at::Tensor grad_w = !compute_grad ? at::empty({0}, w.options())
                      : N == 0      ? at::zeros({C, D}, w.options())
                                    : at::empty({C, D}, w.options());
  if (N == 0) return {loss, grad_x, grad_w};
  const bool use_angle = !(m1 == 1.0 && m2 == 0.0 && !row_m2.has_value());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const margin::Params<acc_t> params{acc_t(scale), acc_t(m1), acc_t(m2), acc_t(m3), use_angle,
                                       detach_margin};
    run<scalar_t>(x, w, target, row_m2, row_m3, row_grad, params, label_smoothing,
                  lse_square_scale, ignore_index, normalize, block_size, compute_grad, loss,
                  grad_x, grad_w);
  });
  return {loss, grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("margin_linear_cross_entropy", &margin_linear_cross_entropy);
}

}  // namespace cpu
}  // namespace fusedloss
