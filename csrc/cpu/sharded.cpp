// CPU kernels of the sharded margin cross-entropy (family "sharded"; contracts:
// python/fusedloss/_schemas.py, math: the "Sharded rows" section of
// csrc/include/fusedloss/margin.h). This rank holds the columns
// [class_start, class_start + C_local) of every row; target holds global ids, and a target on
// another shard is no error.
//
// sharded_margin_stats: rows in parallel, one read of each row: the online max-rescaled
// log-sum-exp of margin_row.h (accumulate_range) over the columns other than the target,
// with the sum of the cosines on the way; the target's margin logit from margin.h.
// sharded_margin_grad: one sweep over each row that writes s (a exp(s c_j - lse) - b), and
// the target column dz_y/dc_y d.
// The linear forms run the same two row kernels as epilogues of the block pipeline of
// linear_blocks.h on the cosine block x_hat w_hat^T: stats needs matmul 1 only, grad all
// three matmuls (the coef already holds the row weight, so the epilogue's weight is 1).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <fusedloss/margin.h>

#include "linear_blocks.h"
#include "margin_row.h"
#include "vec_math.h"

namespace fusedloss {
namespace cpu {
namespace {

// Targets must be below this (or ignore_index): any such id may live on another shard, and
// target - class_start cannot overflow.
constexpr int64_t kMaxTarget = int64_t(1) << 62;

constexpr int64_t kIgnoredRow = -2;       // local_target of a row with target == ignore_index
constexpr int64_t kTargetElsewhere = -1;  // ... of a row whose target is on another shard

// What the row kernels of one op call need to know, per row i.
template <typename acc_t>
struct Shard {
  const int64_t* target;
  const acc_t* row_m2;  // nullable
  const acc_t* row_m3;  // nullable
  margin::Params<acc_t> params;
  margin::Transform<acc_t> transform;  // softcap, inter-class filtering (margin.h)
  int64_t class_start;
  int64_t num_local;  // C_local
  int64_t ignore_index;

  // The local column of row i's target, kTargetElsewhere or kIgnoredRow.
  int64_t local_target(int64_t i) const {
    const int64_t y = target[i];
    if (y == ignore_index) return kIgnoredRow;
    const int64_t local = y - class_start;
    return local >= 0 && local < num_local ? local : kTargetElsewhere;
  }

  margin::Params<acc_t> row_params(int64_t i) const {
    margin::Params<acc_t> p = params;
    if (row_m2) p.m2 = row_m2[i];
    if (row_m3) p.m3 = row_m3[i];
    return p;
  }
};

// accumulate_range under a logit transform (margin.h): the logits of a chunk one by one into
// a buffer, then its maximum and sum of exponentials; st.sum_cos sums the logits z here.
template <typename scalar_t, typename acc_t>
void accumulate_transformed(const scalar_t* row, int64_t begin, int64_t end, acc_t scale,
                            const margin::Transform<acc_t>& tr, RowStats<acc_t>& st) {
  acc_t z[kChunk];
  for (int64_t b = begin; b < end; b += kChunk) {
    const int64_t n = std::min(kChunk, end - b);
    acc_t chunk_max = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      acc_t slope;
      z[j] = margin::transformed_logit(static_cast<acc_t>(row[b + j]), scale, tr, &slope);
      chunk_max = z[j] > chunk_max ? z[j] : chunk_max;
      st.sum_cos += z[j];
    }
    if (chunk_max > st.max) {
      st.sum_other *= std::exp(st.max - chunk_max);
      st.max = chunk_max;
    }
    for (int64_t j = 0; j < n; ++j) st.sum_other += std::exp(z[j] - st.max);
  }
}

// The columns [begin, end) of a row into st, transformed or not.
template <typename scalar_t, typename acc_t>
void accumulate_columns(const Shard<acc_t>& shard, const scalar_t* row, int64_t begin,
                        int64_t end, acc_t scale, RowStats<acc_t>& st) {
  if (shard.transform.active()) {
    accumulate_transformed(row, begin, end, scale, shard.transform, st);
  } else {
    accumulate_range(row, begin, end, scale, st);
  }
}

// out[0..3) = (lse_other, z_y or 0, sum_z) of row i (cosines `row`), (-inf, 0, 0) when ignored.
template <typename scalar_t, typename acc_t>
void stats_row(const Shard<acc_t>& shard, const scalar_t* row, int64_t i, acc_t* out) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t C = shard.num_local;
  const int64_t y = shard.local_target(i);
  if (y == kIgnoredRow) {
    out[0] = -kInf;
    out[1] = out[2] = acc_t(0);
    return;
  }
  const margin::Params<acc_t> p = shard.row_params(i);
  // The maximum starts at -inf, not at z_y (margin.h): only the other columns count.
  RowStats<acc_t> st{-kInf, acc_t(0), acc_t(0)};
  acc_t z_y = acc_t(0);
  if (y >= 0) {
    acc_t unused_slope = acc_t(1);
    z_y = margin::capped(margin::target_logit(static_cast<acc_t>(row[y]), p).value,
                         shard.transform.softcap, &unused_slope);
    accumulate_columns(shard, row, 0, y, p.scale, st);
    accumulate_columns(shard, row, y + 1, C, p.scale, st);
  } else {
    accumulate_columns(shard, row, 0, C, p.scale, st);
  }
  out[0] = st.max + std::log(st.sum_other);  // -inf + log 0 = -inf without other columns
  out[1] = z_y;
  out[2] = (shard.transform.active() ? st.sum_cos : p.scale * st.sum_cos) + z_y;
}

// grad_j = sharded_grad_other(flushed_softmax(x_j), scale, a, b) of margin.h (flushed_softmax:
// vec_math.h, as in write_softmax_grad).
template <typename scalar_t, typename acc_t, typename out_t>
FL_CPU_CLONES void write_coef_grad(const scalar_t* x, out_t* grad, int64_t n, acc_t scale,
                                   acc_t lse, acc_t a, acc_t b) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t e = flushed_softmax(static_cast<acc_t>(x[j]), scale, lse);
    grad[j] = static_cast<out_t>(margin::sharded_grad_other(e, scale, a, b));
  }
}

// grad_j = dz_j/dc_j (a exp(z_j - lse) - b) under a logit transform (margin.h).
template <typename scalar_t, typename acc_t, typename out_t>
void write_transformed_grad(const scalar_t* x, out_t* grad, int64_t n, acc_t scale,
                            const margin::Transform<acc_t>& tr, acc_t lse, acc_t a, acc_t b) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t slope;
    const acc_t z = margin::transformed_logit(static_cast<acc_t>(x[j]), scale, tr, &slope);
    grad[j] = static_cast<out_t>(slope * (a * std::exp(z - lse) - b));
  }
}

// The gradient of the columns [0, n) of a row other than the target, transformed or not.
template <typename scalar_t, typename acc_t, typename out_t>
void write_columns_grad(const Shard<acc_t>& shard, const scalar_t* x, out_t* grad, int64_t n,
                        acc_t scale, acc_t lse, acc_t a, acc_t b) {
  if (shard.transform.active()) {
    write_transformed_grad(x, grad, n, scale, shard.transform, lse, a, b);
  } else {
    write_coef_grad(x, grad, n, scale, lse, a, b);
  }
}

// dL/dc of row i from coef = (lse, a, b, d) (zeros when ignored). grad may be row: every
// element is read before it is written.
template <typename scalar_t, typename acc_t, typename out_t>
void grad_row(const Shard<acc_t>& shard, const scalar_t* row, out_t* grad, int64_t i,
              const acc_t* coef) {
  const int64_t C = shard.num_local;
  const int64_t y = shard.local_target(i);
  if (y == kIgnoredRow) {
    std::fill(grad, grad + C, out_t(0));
    return;
  }
  const margin::Params<acc_t> p = shard.row_params(i);
  const acc_t lse = coef[0], a = coef[1], b = coef[2], d = coef[3];
  if (y < 0) {
    write_columns_grad(shard, row, grad, C, p.scale, lse, a, b);
    return;
  }
  const margin::TargetLogit<acc_t> t = margin::target_logit(static_cast<acc_t>(row[y]), p);
  acc_t slope = t.slope;
  margin::capped(t.value, shard.transform.softcap, &slope);
  write_columns_grad(shard, row, grad, y, p.scale, lse, a, b);
  write_columns_grad(shard, row + y + 1, grad + y + 1, C - y - 1, p.scale, lse, a, b);
  grad[y] = static_cast<out_t>(slope * d);
}

// ---------------------------------------------------------------------------------------
// Checks.

at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_target_shape(const at::Tensor& target, int64_t N, const char* op) {
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, op, ": target must have shape [", N,
                    "], got ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
                   target.scalar_type());
  TORCH_CHECK(target.device().is_cpu(), op, ": target must be on the CPU, got ", target.device());
}

void check_cos(const at::Tensor& cos, const at::Tensor& target, const char* op) {
  TORCH_CHECK_VALUE(cos.dim() == 2, op, ": cos must be 2-D [N, C_local], got ", cos.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(cos.scalar_type()), op, ": cos must be a floating tensor, got ",
                   cos.scalar_type());
  check_target_shape(target, cos.size(0), op);
}

// class_start >= 0; every target ignore_index or in [0, 2^62) (target: contiguous).
void check_shard(const at::Tensor& target, int64_t class_start, int64_t ignore_index,
                 const char* op) {
  TORCH_CHECK_VALUE(class_start >= 0 && class_start < kMaxTarget, op,
                    ": class_start must be in [0, 2^62), got ", class_start);
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    TORCH_CHECK_VALUE(t[i] == ignore_index || (t[i] >= 0 && t[i] < kMaxTarget), op,
                      ": target[", i, "] = ", t[i],
                      " is negative (or >= 2^62) and is not ignore_index (", ignore_index, ")");
  }
}

// The row kernels take max_j (s c_j) as s max_j c_j.
void check_scale(double scale, const char* op) {
  TORCH_CHECK_VALUE(scale > 0, op, ": scale must be > 0, got ", scale);
}

// softcap >= 0 (0: none), and only without a margin; 0 <= threshold <= 1 (0: none).
void check_transform(double softcap, double threshold, double m1, double m2, double m3,
                     bool row_margins, const char* op) {
  TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(softcap), op,
                    ": softcap must be finite and >= 0 (0: none), got ", softcap);
  TORCH_CHECK_VALUE(softcap == 0 || (m1 == 1 && m2 == 0 && m3 == 0 && !row_margins), op,
                    ": softcap needs no margin (m1 = 1, m2 = m3 = 0, no row margins)");
  TORCH_CHECK_VALUE(threshold >= 0 && threshold <= 1, op,
                    ": filter_threshold must lie in [0, 1] (0: none), got ", threshold);
}

void check_coef(const at::Tensor& coef, int64_t N, at::ScalarType acc_type, const char* op) {
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == N && coef.size(1) == 4, op,
                    ": coef must have shape [", N, ", 4] (lse, a, b, d per row), got ", coef.sizes());
  TORCH_CHECK_TYPE(coef.scalar_type() == acc_type, op, ": coef must be ", acc_type, ", got ",
                   coef.scalar_type());
  TORCH_CHECK(coef.device().is_cpu(), op, ": coef must be on the CPU, got ", coef.device());
}

// What the four ops share besides their matrices, checked and contiguous.
struct ShardInputs {
  at::ScalarType acc_type;  // of stats, coef and the row margins: fp64 for fp64 input, else fp32
  at::Tensor target;
  std::optional<at::Tensor> row_m2, row_m3;
  double scale, m1, m2, m3, softcap, threshold;
  int64_t class_start, ignore_index;

  // The row kernels' view of a shard of num_local classes.
  template <typename acc_t>
  Shard<acc_t> shard(bool detach_margin, int64_t num_local) const {
    const bool use_angle = !(m1 == 1.0 && m2 == 0.0 && !row_m2.has_value());
    return {target.data_ptr<int64_t>(),
            optional_data<acc_t>(row_m2),
            optional_data<acc_t>(row_m3),
            {acc_t(scale), acc_t(m1), acc_t(m2), acc_t(m3), use_angle, detach_margin},
            {acc_t(softcap), acc_t(threshold)},
            class_start,
            num_local,
            ignore_index};
  }
};

// The checks every op makes after those of its matrix `rows` (cos or the embeddings, whose
// N rows and dtype the other inputs follow); coef only for the grad ops.
ShardInputs checked_shard_inputs(const at::Tensor& rows, const at::Tensor& target,
                                 const std::optional<at::Tensor>& row_m2,
                                 const std::optional<at::Tensor>& row_m3, const at::Tensor* coef,
                                 double scale, double m1, double m2, double m3, double softcap,
                                 double threshold, int64_t class_start, int64_t ignore_index,
                                 const char* op) {
  const int64_t N = rows.size(0);
  const at::ScalarType acc_type = acc_type_of(rows);
  check_row_tensor(row_m2, "row_m2", N, acc_type, op);
  check_row_tensor(row_m3, "row_m3", N, acc_type, op);
  if (coef != nullptr) check_coef(*coef, N, acc_type, op);
  ShardInputs in{acc_type, target.contiguous(), contiguous_or_none(row_m2),
                 contiguous_or_none(row_m3), scale, m1, m2, m3, softcap, threshold,
                 class_start, ignore_index};
  check_shard(in.target, class_start, ignore_index, op);
  check_scale(scale, op);
  check_transform(softcap, threshold, m1, m2, m3, row_m2.has_value() || row_m3.has_value(), op);
  return in;
}

int64_t rows_grain(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// ---------------------------------------------------------------------------------------
// Logit level.

at::Tensor sharded_margin_stats(const at::Tensor& cos_in, const at::Tensor& target,
                                const std::optional<at::Tensor>& row_m2,
                                const std::optional<at::Tensor>& row_m3, double scale,
                                double m1, double m2, double m3, int64_t class_start,
                                int64_t ignore_index, double softcap, double filter_threshold) {
  constexpr const char* kOp = "sharded_margin_stats";
  check_cos(cos_in, target, kOp);
  const ShardInputs in =
      checked_shard_inputs(cos_in, target, row_m2, row_m3, nullptr, scale, m1, m2, m3, softcap,
                           filter_threshold, class_start, ignore_index, kOp);
  const int64_t N = cos_in.size(0), C = cos_in.size(1);
  const at::Tensor cos = cos_in.stride(1) == 1 ? cos_in : cos_in.contiguous();
  at::Tensor stats = at::empty({N, 3}, cos.options().dtype(in.acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The stats need no margin slope: detach_margin skips it.
    const Shard<acc_t> shard = in.shard<acc_t>(/*detach_margin=*/true, C);
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const int64_t stride = cos.stride(0);
    acc_t* out = stats.data_ptr<acc_t>();
    at::parallel_for(0, N, rows_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) stats_row(shard, cp + i * stride, i, out + 3 * i);
    });
  });
  return stats;
}

at::Tensor sharded_margin_grad(const at::Tensor& cos_in, const at::Tensor& target,
                               const std::optional<at::Tensor>& row_m2,
                               const std::optional<at::Tensor>& row_m3,
                               const at::Tensor& coef_in, double scale, double m1, double m2,
                               double m3, bool detach_margin, int64_t class_start,
                               int64_t ignore_index, double softcap, double filter_threshold) {
  constexpr const char* kOp = "sharded_margin_grad";
  check_cos(cos_in, target, kOp);
  const ShardInputs in =
      checked_shard_inputs(cos_in, target, row_m2, row_m3, &coef_in, scale, m1, m2, m3, softcap,
                           filter_threshold, class_start, ignore_index, kOp);
  const int64_t N = cos_in.size(0), C = cos_in.size(1);
  const at::Tensor cos = cos_in.stride(1) == 1 ? cos_in : cos_in.contiguous();
  const at::Tensor coef = coef_in.contiguous();
  at::Tensor grad = at::empty({N, C}, cos.options());
  advise_huge_pages(grad.data_ptr(), grad.nbytes());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Shard<acc_t> shard = in.shard<acc_t>(detach_margin, C);
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const int64_t stride = cos.stride(0);
    const acc_t* kp = coef.data_ptr<acc_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, rows_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        grad_row(shard, cp + i * stride, gp + i * C, i, kp + 4 * i);
      }
    });
  });
  return grad;
}

// sharded_margin_grad written into cos itself (inplace_backward): grad_row reads every element
// of a row before it writes it there.
void sharded_margin_grad_inplace(const at::Tensor& cos, const at::Tensor& target,
                                 const std::optional<at::Tensor>& row_m2,
                                 const std::optional<at::Tensor>& row_m3,
                                 const at::Tensor& coef_in, double scale, double m1, double m2,
                                 double m3, bool detach_margin, int64_t class_start,
                                 int64_t ignore_index, double softcap, double filter_threshold) {
  constexpr const char* kOp = "sharded_margin_grad_inplace";
  check_cos(cos, target, kOp);
  TORCH_CHECK_VALUE(cos.is_contiguous(), kOp, ": cos must be contiguous (its storage becomes "
                    "the gradient)");
  const ShardInputs in =
      checked_shard_inputs(cos, target, row_m2, row_m3, &coef_in, scale, m1, m2, m3, softcap,
                           filter_threshold, class_start, ignore_index, kOp);
  const int64_t N = cos.size(0), C = cos.size(1);
  const at::Tensor coef = coef_in.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Shard<acc_t> shard = in.shard<acc_t>(detach_margin, C);
    scalar_t* cp = cos.data_ptr<scalar_t>();
    const acc_t* kp = coef.data_ptr<acc_t>();
    at::parallel_for(0, N, rows_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) grad_row(shard, cp + i * C, cp + i * C, i, kp + 4 * i);
    });
  });
}

// ---------------------------------------------------------------------------------------
// Linear forms: the row kernels above as epilogues of linear_blocks.h.

template <typename acc_t>
struct StatsEpilogue {
  Shard<acc_t> shard;
  acc_t* stats;
  void operator()(acc_t* row, int64_t i) const { stats_row(shard, row, i, stats + 3 * i); }
};

template <typename acc_t>
struct GradEpilogue {
  Shard<acc_t> shard;
  const acc_t* coef;
  acc_t operator()(acc_t* row, int64_t i) const {
    grad_row(shard, row, row, i, coef + 4 * i);
    return acc_t(1);  // coef holds the row weight already
  }
};

at::Tensor sharded_margin_linear_stats(const at::Tensor& x_in, const at::Tensor& w_in,
                                       const at::Tensor& target,
                                       const std::optional<at::Tensor>& row_m2,
                                       const std::optional<at::Tensor>& row_m3, double scale,
                                       double m1, double m2, double m3, bool normalize,
                                       int64_t class_start, int64_t ignore_index,
                                       int64_t block_size, double softcap,
                                       double filter_threshold) {
  constexpr const char* kOp = "sharded_margin_linear_stats";
  linear::check_inputs(x_in, w_in, target, block_size, kOp);
  const ShardInputs in =
      checked_shard_inputs(x_in, target, row_m2, row_m3, nullptr, scale, m1, m2, m3, softcap,
                           filter_threshold, class_start, ignore_index, kOp);
  const int64_t N = x_in.size(0), C = w_in.size(0);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  at::Tensor stats = at::empty({N, 3}, x.options().dtype(in.acc_type));
  if (N == 0) return stats;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StatsEpilogue<acc_t> epilogue{in.shard<acc_t>(/*detach_margin=*/true, C),
                                        stats.data_ptr<acc_t>()};
    at::Tensor no_grad_x, no_grad_w;
    linear::run_blocks<scalar_t, false>(x, w, normalize, block_size, epilogue, no_grad_x,
                                        no_grad_w);
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor> sharded_margin_linear_grad(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& target,
    const std::optional<at::Tensor>& row_m2, const std::optional<at::Tensor>& row_m3,
    const at::Tensor& coef_in, double scale, double m1, double m2, double m3, bool detach_margin,
    bool normalize, int64_t class_start, int64_t ignore_index, int64_t block_size, double softcap,
    double filter_threshold) {
  constexpr const char* kOp = "sharded_margin_linear_grad";
  linear::check_inputs(x_in, w_in, target, block_size, kOp);
  const ShardInputs in =
      checked_shard_inputs(x_in, target, row_m2, row_m3, &coef_in, scale, m1, m2, m3, softcap,
                           filter_threshold, class_start, ignore_index, kOp);
  const int64_t N = x_in.size(0), C = w_in.size(0);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const at::Tensor coef = coef_in.contiguous();
  at::Tensor grad_x, grad_w;
  std::tie(grad_x, grad_w) = linear::gradient_outputs(x, w, /*grad=*/true);
  if (N == 0) return {grad_x, grad_w};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradEpilogue<acc_t> epilogue{in.shard<acc_t>(detach_margin, C), coef.data_ptr<acc_t>()};
    linear::run_blocks<scalar_t, true>(x, w, normalize, block_size, epilogue, grad_x, grad_w);
  });
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("sharded_margin_stats", &sharded_margin_stats);
  m.impl("sharded_margin_grad", &sharded_margin_grad);
  m.impl("sharded_margin_grad_inplace", &sharded_margin_grad_inplace);
  m.impl("sharded_margin_linear_stats", &sharded_margin_linear_stats);
  m.impl("sharded_margin_linear_grad", &sharded_margin_linear_grad);
}

}  // namespace cpu
}  // namespace fusedloss
