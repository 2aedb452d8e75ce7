// CPU kernel of fusedloss::margin_cross_entropy (math: csrc/include/fusedloss/margin.h).
//
// Rows run in parallel (at::parallel_for), each through the row kernel of margin_row.h:
// one read of the row for its statistics (online log-sum-exp) and, when the gradient is
// wanted, a second sweep over the row (now in L2) that writes it, so backward only has
// to scale it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <fusedloss/margin.h>

#include "margin_row.h"
#include "scores_op.h"

namespace fusedloss {
namespace cpu {
namespace {

constexpr const char* kOp = "margin_cross_entropy";

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy(
    const at::Tensor& cos_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& row_m2_in, const std::optional<at::Tensor>& row_m3_in,
    double scale, double m1, double m2, double m3, bool detach_margin, double label_smoothing,
    double lse_square_scale, int64_t ignore_index, bool compute_grad) {
  check_scores_and_target(kOp, "cos", cos_in, target_in);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "margin_cross_entropy: label_smoothing must lie in [0, 1], got ", label_smoothing);
  const int64_t N = cos_in.size(0), C = cos_in.size(1);
  const auto acc_type = accumulation_type(cos_in);
  check_row_tensor(row_m2_in, "row_m2", N, acc_type, kOp);
  check_row_tensor(row_m3_in, "row_m3", N, acc_type, kOp);

  const at::Tensor cos = unit_column_stride(cos_in);
  const at::Tensor target = target_in.contiguous();
  check_targets(target, C, ignore_index, kOp);
  const auto row_m2 = contiguous_or_none(row_m2_in);
  const auto row_m3 = contiguous_or_none(row_m3_in);

  at::Tensor loss, grad;
  std::tie(loss, grad) = row_outputs(cos, compute_grad);
  const bool use_angle = !(m1 == 1.0 && m2 == 0.0 && !row_m2.has_value());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), "margin_cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RowArgs<scalar_t, acc_t> args{
        cos.data_ptr<scalar_t>(), cos.stride(0), target.data_ptr<int64_t>(),
        optional_data<acc_t>(row_m2), optional_data<acc_t>(row_m3),
        margin::Params<acc_t>{acc_t(scale), acc_t(m1), acc_t(m2), acc_t(m3), use_angle, detach_margin},
        acc_t(label_smoothing), acc_t(lse_square_scale), ignore_index, C, loss.data_ptr<acc_t>(),
        compute_grad ? grad.data_ptr<scalar_t>() : nullptr, C};
    for_each_row(N, C, [&](int64_t i) { margin_row(args, i); });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("margin_cross_entropy", &margin_cross_entropy);
}

}  // namespace cpu
}  // namespace fusedloss
