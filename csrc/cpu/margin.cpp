// CPU kernel of fusedloss::margin_cross_entropy (math: csrc/include/fusedloss/margin.h).
//
// Rows run in parallel (at::parallel_for), each through the row kernel of margin_row.h:
// one read of the row for its statistics (online log-sum-exp) and, when the gradient is
// wanted, a second sweep over the row (now in L2) that writes it, so backward only has
// to scale it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <fusedloss/margin.h>

#include "margin_row.h"
#include "memory.h"

namespace fusedloss {
namespace cpu {
namespace {

constexpr const char* kOp = "margin_cross_entropy";

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy(
    const at::Tensor& cos_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& row_m2_in, const std::optional<at::Tensor>& row_m3_in,
    double scale, double m1, double m2, double m3, bool detach_margin, double label_smoothing,
    double lse_square_scale, int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK_VALUE(cos_in.dim() == 2, "margin_cross_entropy: cos must be 2-D [N, C], got ",
                    cos_in.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(cos_in.scalar_type()),
                   "margin_cross_entropy: cos must be a floating tensor, got ", cos_in.scalar_type());
  TORCH_CHECK_VALUE(target_in.dim() == 1 && target_in.size(0) == cos_in.size(0),
                    "margin_cross_entropy: target must have shape [", cos_in.size(0), "], got ",
                    target_in.sizes());
  TORCH_CHECK_TYPE(target_in.scalar_type() == at::kLong,
                   "margin_cross_entropy: target must be int64, got ", target_in.scalar_type());
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "margin_cross_entropy: label_smoothing must lie in [0, 1], got ", label_smoothing);
  const int64_t N = cos_in.size(0), C = cos_in.size(1);
  const auto acc_type = cos_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_row_tensor(row_m2_in, "row_m2", N, acc_type, kOp);
  check_row_tensor(row_m3_in, "row_m3", N, acc_type, kOp);

  const at::Tensor cos = cos_in.stride(1) == 1 ? cos_in : cos_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  check_targets(target, C, ignore_index, kOp);
  const auto row_m2 = contiguous_or_none(row_m2_in);
  const auto row_m3 = contiguous_or_none(row_m3_in);

  at::Tensor loss = at::empty({N}, cos.options().dtype(acc_type));
  at::Tensor grad = compute_grad ? at::empty({N, C}, cos.options()) : at::empty({0}, cos.options());
  if (compute_grad) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  const bool use_angle = !(m1 == 1.0 && m2 == 0.0 && !row_m2.has_value());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), "margin_cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RowArgs<scalar_t, acc_t> args{
        cos.data_ptr<scalar_t>(), cos.stride(0), target.data_ptr<int64_t>(),
        optional_data<acc_t>(row_m2), optional_data<acc_t>(row_m3),
        margin::Params<acc_t>{acc_t(scale), acc_t(m1), acc_t(m2), acc_t(m3), use_angle, detach_margin},
        acc_t(label_smoothing), acc_t(lse_square_scale), ignore_index, C, loss.data_ptr<acc_t>(),
        compute_grad ? grad.data_ptr<scalar_t>() : nullptr, C};
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) margin_row(args, i);
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("margin_cross_entropy", &margin_cross_entropy);
}

}  // namespace cpu
}  // namespace fusedloss
