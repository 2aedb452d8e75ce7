// CPU kernels of fusedloss::multilabel_margin_stats and multilabel_margin_grad (math:
// csrc/include/fusedloss/multilabel.h).
//
// Rows run in parallel (at::parallel_for). Per row the local positives are sorted and made
// unique (at most 64); the row is then read segment by segment between them, so the positive
// columns are skipped, never subtracted. stats: one read of the row, the online log-sum-exp
// of margin_row.h with its running maximum started at -inf. grad: one read of the row and
// one write of the gradient, given the per-row coef. So forward + backward move three
// N x C arrays and hold one N x C buffer, the gradient, made in backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <fusedloss/margin.h>
#include <fusedloss/multilabel.h>

#include "margin_row.h"
#include "scores_op.h"

namespace fusedloss {
namespace cpu {
namespace {

// The arguments both kernels share; row i reads cos[i * row_stride + j] and targets[i * K + k].
template <typename scalar_t, typename acc_t>
struct Rows {
  const scalar_t* cos;
  int64_t row_stride;
  const int64_t* targets;
  int64_t K;
  margin::Params<acc_t> params;
  int64_t class_start;
  int64_t ignore_index;
  int64_t num_columns;  // C_local
};

// (lse_neg, lse_pos) of row i over the local columns.
template <typename scalar_t, typename acc_t>
void stats_row(const Rows<scalar_t, acc_t>& a, int64_t i, acc_t* out) {
  int64_t pos[multilabel::kMaxPositives];
  const int n = multilabel::local_positives(a.targets + i * a.K, a.K, a.ignore_index,
                                            a.class_start, a.num_columns, pos);
  const scalar_t* row = a.cos + i * a.row_stride;
  const acc_t s = a.params.scale;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  RowStats<acc_t> st{-inf, acc_t(0), acc_t(0)};
  int64_t start = 0;
  for (int q = 0; q <= n; ++q) {
    const int64_t end = q < n ? pos[q] : a.num_columns;
    accumulate_range(row, start, end, s, st);
    start = end + 1;
  }
  out[0] = st.sum_other > acc_t(0) ? st.max + std::log(st.sum_other) : -inf;
  margin::TargetLogit<acc_t> z[multilabel::kMaxPositives];
  for (int q = 0; q < n; ++q) z[q] = margin::target_logit(static_cast<acc_t>(row[pos[q]]), a.params);
  out[1] = multilabel::positives_lse(z, n);
}

// grad_j = weight * s * exp(s x_j - lse), vectorised (fast_exp), flushed below kFlushBelow.
template <typename scalar_t, typename acc_t>
FL_CPU_CLONES void write_negatives_grad(const scalar_t* x, scalar_t* grad, int64_t n, acc_t scale,
                                        acc_t lse, acc_t weight) {
  const acc_t ws = weight * scale;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    grad[j] = static_cast<scalar_t>(ws * flushed_softmax(static_cast<acc_t>(x[j]), scale, lse));
  }
}

// Gradient row i from coef[i] = (a_neg, lse_neg, a_pos, lse_pos).
template <typename scalar_t, typename acc_t>
void grad_row(const Rows<scalar_t, acc_t>& a, const acc_t* coef, int64_t i, scalar_t* out) {
  const int64_t C = a.num_columns;
  const acc_t a_neg = coef[0], lse_neg = coef[1], a_pos = coef[2], lse_pos = coef[3];
  if (a_neg == acc_t(0) && a_pos == acc_t(0)) {
    std::fill(out, out + C, scalar_t(0));
    return;
  }
  int64_t pos[multilabel::kMaxPositives];
  const int n = multilabel::local_positives(a.targets + i * a.K, a.K, a.ignore_index,
                                            a.class_start, C, pos);
  const scalar_t* row = a.cos + i * a.row_stride;
  int64_t start = 0;
  for (int q = 0; q <= n; ++q) {
    const int64_t end = q < n ? pos[q] : C;
    write_negatives_grad(row + start, out + start, end - start, a.params.scale, lse_neg, a_neg);
    if (q < n) {
      const auto z = margin::target_logit(static_cast<acc_t>(row[end]), a.params);
      out[end] = static_cast<scalar_t>(multilabel::positive_grad(z, a_pos, lse_pos));
    }
    start = end + 1;
  }
}

constexpr const char* kStats = "multilabel_margin_stats";
constexpr const char* kGrad = "multilabel_margin_grad";

// cos [N, C_local] floating; targets [N, K] int64, 1 <= K <= 64, every entry ignore_index or
// in [0, num_classes); the shard inside [0, num_classes).
void check_rows(const char* op, const at::Tensor& cos, const at::Tensor& targets, double scale,
                int64_t class_start, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_VALUE(cos.dim() == 2, op, ": cos must be 2-D [N, C], got ", cos.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(cos.scalar_type()), op,
                   ": cos must be a floating tensor, got ", cos.scalar_type());
  const int64_t N = cos.size(0);
  TORCH_CHECK_VALUE(targets.dim() == 2 && targets.size(0) == N, op,
                    ": targets must have shape [", N, ", K], got ", targets.sizes());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ",
                   targets.scalar_type());
  TORCH_CHECK(targets.device() == cos.device(), op, ": targets is on ", targets.device(),
              " but cos is on ", cos.device());
  TORCH_CHECK_VALUE(targets.size(1) >= 1 && targets.size(1) <= multilabel::kMaxPositives, op,
                    ": targets must have 1 to ", multilabel::kMaxPositives,
                    " columns (positives per row), got ", targets.size(1));
  TORCH_CHECK_VALUE(scale > 0, op, ": scale must be > 0, got ", scale);
  TORCH_CHECK_VALUE(class_start >= 0 && class_start + cos.size(1) <= num_classes, op,
                    ": the shard [class_start, class_start + C_local) = [", class_start, ", ",
                    class_start + cos.size(1), ") must lie in [0, num_classes = ", num_classes,
                    ")");
  const at::Tensor t = targets.contiguous();
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t e = 0; e < t.numel(); ++e) {
    TORCH_CHECK_VALUE(p[e] == ignore_index || (p[e] >= 0 && p[e] < num_classes), op,
                      ": targets[", e / t.size(1), ", ", e % t.size(1), "] = ", p[e],
                      " is outside [0, ", num_classes, ") and is not ignore_index (",
                      ignore_index, ")");
  }
}

template <typename scalar_t, typename acc_t>
Rows<scalar_t, acc_t> rows_of(const at::Tensor& cos, const at::Tensor& targets, double scale,
                              double m1, double m2, double m3, bool detach_margin,
                              int64_t class_start, int64_t ignore_index) {
  return {cos.data_ptr<scalar_t>(), cos.stride(0), targets.data_ptr<int64_t>(), targets.size(1),
          margin::Params<acc_t>{acc_t(scale), acc_t(m1), acc_t(m2), acc_t(m3),
                                !(m1 == 1.0 && m2 == 0.0), detach_margin},
          class_start, ignore_index, cos.size(1)};
}

at::Tensor multilabel_margin_stats(const at::Tensor& cos_in, const at::Tensor& targets_in,
                                   double scale, double m1, double m2, double m3,
                                   bool detach_margin, int64_t class_start, int64_t num_classes,
                                   int64_t ignore_index) {
  check_rows(kStats, cos_in, targets_in, scale, class_start, num_classes, ignore_index);
  const at::Tensor cos = unit_column_stride(cos_in);
  const at::Tensor targets = targets_in.contiguous();
  const int64_t N = cos.size(0), C = cos.size(1);
  at::Tensor stats = at::empty({N, 2}, cos.options().dtype(accumulation_type(cos)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), kStats, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = rows_of<scalar_t, acc_t>(cos, targets, scale, m1, m2, m3, detach_margin,
                                            class_start, ignore_index);
    acc_t* out = stats.data_ptr<acc_t>();
    for_each_row(N, C, [&](int64_t i) { stats_row(a, i, out + 2 * i); });
  });
  return stats;
}

at::Tensor multilabel_margin_grad(const at::Tensor& cos_in, const at::Tensor& targets_in,
                                  const at::Tensor& coef_in, double scale, double m1, double m2,
                                  double m3, bool detach_margin, int64_t class_start,
                                  int64_t num_classes, int64_t ignore_index) {
  check_rows(kGrad, cos_in, targets_in, scale, class_start, num_classes, ignore_index);
  const auto acc_type = accumulation_type(cos_in);
  const int64_t N = cos_in.size(0), C = cos_in.size(1);
  TORCH_CHECK_VALUE(coef_in.dim() == 2 && coef_in.size(0) == N && coef_in.size(1) == 4, kGrad,
                    ": coef must have shape [", N, ", 4] (a_neg, lse_neg, a_pos, lse_pos per "
                    "row), got ", coef_in.sizes());
  TORCH_CHECK_TYPE(coef_in.scalar_type() == acc_type, kGrad, ": coef must be ", acc_type,
                   ", got ", coef_in.scalar_type());
  TORCH_CHECK(coef_in.device() == cos_in.device(), kGrad, ": coef is on ", coef_in.device(),
              " but cos is on ", cos_in.device());
  const at::Tensor cos = unit_column_stride(cos_in);
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor coef = coef_in.contiguous();
  at::Tensor grad = at::empty({N, C}, cos.options());
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), kGrad, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = rows_of<scalar_t, acc_t>(cos, targets, scale, m1, m2, m3, detach_margin,
                                            class_start, ignore_index);
    const acc_t* c = coef.data_ptr<acc_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    for_each_row(N, C, [&](int64_t i) { grad_row(a, c + 4 * i, i, g + i * C); });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("multilabel_margin_stats", &multilabel_margin_stats);
  m.impl("multilabel_margin_grad", &multilabel_margin_grad);
}

}  // namespace cpu
}  // namespace fusedloss
