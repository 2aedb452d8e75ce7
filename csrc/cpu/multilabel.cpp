// CPU kernel of fusedloss::multilabel_margin_cross_entropy (math:
// csrc/include/fusedloss/multilabel.h).
//
// Rows run in parallel (at::parallel_for). Per row the positives are sorted and made unique
// (at most 64), then the row is read once, segment by segment between them, with the online
// log-sum-exp of margin_row.h seeded with the extra exp(0) term: the positive columns are
// skipped, never subtracted. When the gradient is wanted a second sweep (the row now in L2)
// writes s exp(s c_j - L_neg) over the same segments and the K positive entries, so backward
// only scales it, and forward + backward hold one N x C buffer.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <fusedloss/margin.h>
#include <fusedloss/multilabel.h>

#include "margin_row.h"
#include "scores_op.h"

namespace fusedloss {
namespace cpu {
namespace {

constexpr const char* kOp = "multilabel_margin_cross_entropy";

template <typename scalar_t, typename acc_t>
struct MultilabelArgs {
  const scalar_t* cos;
  int64_t row_stride;
  const int64_t* targets;  // [N, K] contiguous
  int64_t K;
  margin::Params<acc_t> params;
  int64_t ignore_index;
  int64_t num_classes;
  acc_t* loss;
  scalar_t* grad;  // nullable: no gradient wanted; contiguous [N, C]
};

template <typename scalar_t, typename acc_t>
void multilabel_row(const MultilabelArgs<scalar_t, acc_t>& a, int64_t i) {
  const int64_t C = a.num_classes;
  int64_t pos[multilabel::kMaxPositives];
  const int n = multilabel::sorted_positives(a.targets + i * a.K, a.K, a.ignore_index, pos);
  scalar_t* grad_row = a.grad ? a.grad + i * C : nullptr;
  if (n == 0) {
    a.loss[i] = acc_t(0);
    if (grad_row) std::fill(grad_row, grad_row + C, scalar_t(0));
    return;
  }
  const scalar_t* row = a.cos + i * a.row_stride;
  const acc_t s = a.params.scale;

  // L_neg: segments [start, pos[q]) between the positives, state seeded with exp(0) = 1.
  RowStats<acc_t> st{acc_t(0), acc_t(1), acc_t(0)};
  int64_t start = 0;
  for (int q = 0; q < n; ++q) {
    accumulate_range(row, start, pos[q], s, st);
    start = pos[q] + 1;
  }
  accumulate_range(row, start, C, s, st);
  const acc_t loss_neg = st.max + std::log(st.sum_other);

  margin::TargetLogit<acc_t> z[multilabel::kMaxPositives];
  for (int q = 0; q < n; ++q) z[q] = margin::target_logit(static_cast<acc_t>(row[pos[q]]), a.params);
  const acc_t loss_pos = multilabel::positives_loss(z, n);
  a.loss[i] = loss_neg + loss_pos;
  if (!grad_row) return;

  start = 0;
  for (int q = 0; q < n; ++q) {
    write_softmax_grad(row + start, grad_row + start, pos[q] - start, s, loss_neg, acc_t(0),
                       acc_t(0));
    grad_row[pos[q]] = static_cast<scalar_t>(multilabel::positive_grad(z[q], loss_pos));
    start = pos[q] + 1;
  }
  write_softmax_grad(row + start, grad_row + start, C - start, s, loss_neg, acc_t(0), acc_t(0));
}

// targets [N, K] int64, 1 <= K <= 64, every entry ignore_index or in [0, C).
void check_multilabel_targets(const at::Tensor& targets, int64_t N, int64_t C,
                              int64_t ignore_index) {
  TORCH_CHECK_VALUE(targets.dim() == 2 && targets.size(0) == N, kOp,
                    ": targets must have shape [", N, ", K], got ", targets.sizes());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, kOp, ": targets must be int64, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.size(1) >= 1 && targets.size(1) <= multilabel::kMaxPositives, kOp,
                    ": targets must have 1 to ", multilabel::kMaxPositives,
                    " columns (positives per row), got ", targets.size(1));
  const at::Tensor t = targets.contiguous();
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t e = 0; e < t.numel(); ++e) {
    TORCH_CHECK_VALUE(p[e] == ignore_index || (p[e] >= 0 && p[e] < C), kOp, ": targets[",
                      e / t.size(1), ", ", e % t.size(1), "] = ", p[e], " is outside [0, ", C,
                      ") and is not ignore_index (", ignore_index, ")");
  }
}

std::tuple<at::Tensor, at::Tensor> multilabel_margin_cross_entropy(
    const at::Tensor& cos_in, const at::Tensor& targets_in, double scale, double m1, double m2,
    double m3, bool detach_margin, int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK_VALUE(cos_in.dim() == 2, kOp, ": cos must be 2-D [N, C], got ", cos_in.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(cos_in.scalar_type()), kOp,
                   ": cos must be a floating tensor, got ", cos_in.scalar_type());
  TORCH_CHECK(targets_in.device() == cos_in.device(), kOp, ": targets is on ",
              targets_in.device(), " but cos is on ", cos_in.device());
  TORCH_CHECK_VALUE(scale > 0, kOp, ": scale must be > 0, got ", scale);
  const int64_t N = cos_in.size(0), C = cos_in.size(1);
  check_multilabel_targets(targets_in, N, C, ignore_index);
  const at::Tensor cos = unit_column_stride(cos_in);
  const at::Tensor targets = targets_in.contiguous();

  at::Tensor loss, grad;
  std::tie(loss, grad) = row_outputs(cos, compute_grad);
  const bool use_angle = !(m1 == 1.0 && m2 == 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    MultilabelArgs<scalar_t, acc_t> args{
        cos.data_ptr<scalar_t>(), cos.stride(0), targets.data_ptr<int64_t>(), targets.size(1),
        margin::Params<acc_t>{acc_t(scale), acc_t(m1), acc_t(m2), acc_t(m3), use_angle,
                              detach_margin},
        ignore_index, C, loss.data_ptr<acc_t>(),
        compute_grad ? grad.data_ptr<scalar_t>() : nullptr};
    for_each_row(N, C, [&](int64_t i) { multilabel_row(args, i); });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("multilabel_margin_cross_entropy", &multilabel_margin_cross_entropy);
}

}  // namespace cpu
}  // namespace fusedloss
