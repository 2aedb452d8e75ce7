// CPU kernel of fusedloss::margin_linear_cross_entropy: the margin softmax cross-entropy
// (row math: csrc/include/fusedloss/margin.h, row kernel: margin_row.h) of the normalised
// embeddings and weight, through the block pipeline of linear_blocks.h (matmuls,
// normalisation and its gradient; the N x C matrix is never stored). The epilogue here is
// the row kernel: loss_i, and with gradients d loss_i / d cos_ij over the row in place,
// weighted by row_grad_i (or 1).
//
// Determinism: the result does not depend on `deterministic`: every run is (linear_blocks.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <fusedloss/margin.h>

#include "linear_blocks.h"
#include "margin_row.h"

namespace fusedloss {
namespace cpu {
namespace {

constexpr const char* kOp = "margin_linear_cross_entropy";

// The epilogue of linear_blocks.h: the row kernel of margin_row.h on row i of the block,
// with its gradient (when wanted) written over the cosines; returns the row weight r_i.
template <typename acc_t>
struct MarginEpilogue {
  RowArgs<acc_t, acc_t> args;  // strides 0; cos and grad are set per row
  bool grad;
  const acc_t* row_grad;  // nullable: r_i = 1

  acc_t operator()(acc_t* row, int64_t i) const {
    RowArgs<acc_t, acc_t> a = args;
    a.cos = row;
    a.grad = grad ? row : nullptr;
    margin_row(a, i);
    return row_grad ? row_grad[i] : acc_t(1);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_linear_cross_entropy(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& row_m2_in, const std::optional<at::Tensor>& row_m3_in,
    const std::optional<at::Tensor>& row_grad_in, double scale, double m1, double m2, double m3,
    bool detach_margin, double label_smoothing, double lse_square_scale, int64_t ignore_index,
    bool normalize, int64_t block_size, bool deterministic, bool compute_grad) {
  (void)deterministic;  // every run is deterministic (header comment)
  linear::check_inputs(x_in, w_in, target_in, block_size, kOp);
  const int64_t N = x_in.size(0), C = w_in.size(0);
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
  at::Tensor grad_x, grad_w;
  std::tie(grad_x, grad_w) = linear::gradient_outputs(x, w, compute_grad);
  if (N == 0) return {loss, grad_x, grad_w};
  const bool use_angle = !(m1 == 1.0 && m2 == 0.0 && !row_m2.has_value());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const margin::Params<acc_t> params{acc_t(scale), acc_t(m1), acc_t(m2), acc_t(m3), use_angle,
                                       detach_margin};
    const MarginEpilogue<acc_t> epilogue{
        RowArgs<acc_t, acc_t>{nullptr, 0, target.data_ptr<int64_t>(), optional_data<acc_t>(row_m2),
                              optional_data<acc_t>(row_m3), params, acc_t(label_smoothing),
                              acc_t(lse_square_scale), ignore_index, C, loss.data_ptr<acc_t>(),
                              nullptr, 0},
        compute_grad, optional_data<acc_t>(row_grad)};
    if (compute_grad) {
      linear::run_blocks<scalar_t, true>(x, w, normalize, block_size, epilogue, grad_x, grad_w);
    } else {
      linear::run_blocks<scalar_t, false>(x, w, normalize, block_size, epilogue, grad_x, grad_w);
    }
  });
  return {loss, grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("margin_linear_cross_entropy", &margin_linear_cross_entropy);
}

}  // namespace cpu
}  // namespace fusedloss
