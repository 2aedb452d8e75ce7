// CUDA implementations of the fusedloss ops (schemas in python/fusedloss/_schemas.py):
// argument checks, device guard, current stream and outputs here; the kernels behind the
// plain launchers of csrc/cuda/launchers.h. The checks raise as the CPU kernels' do: a bad
// shape or value ValueError (TORCH_CHECK_VALUE), a bad dtype TypeError (TORCH_CHECK_TYPE), a
// bad device RuntimeError (TORCH_CHECK).
#include <cmath>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs cuBLAS and
                                  // cuSPARSE headers, which a bare nvcc install lacks
#include <torch/library.h>

#include "launchers.h"

namespace fusedloss {
namespace cuda {
namespace {

ScalarKind scalar_kind(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat;
    case at::kDouble: return ScalarKind::kDouble;
    case at::kHalf: return ScalarKind::kHalf;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name,
                       " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

at::ScalarType accumulation_type(ScalarKind kind) {
  return kind == ScalarKind::kDouble ? at::kDouble : at::kFloat;
}

// The checks that every row op makes of its [N, C] input (named `name`) and its [N] int64
// target; returns the element type of the input.
ScalarKind check_row_loss_inputs(const at::Tensor& input, const char* name,
                                 const at::Tensor& target, const char* op) {
  TORCH_CHECK(input.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", input.device());
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": ", name, " must have shape [N, C], got ",
                    input.sizes());
  const ScalarKind kind = scalar_kind(input, op, name);
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(), " but ",
              name, " is on ", input.device());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0), op,
                    ": target must have shape [N] = [", input.size(0), "], got ", target.sizes());
  return kind;
}

// The tensors that a row kernel reads and writes, and the launcher arguments that point
// into them.
struct RowLossTensors {
  at::Tensor input;   // unit column stride; any row stride is used as it is
  at::Tensor target;  // contiguous
  at::Tensor loss;    // [N] of the accumulation type
  at::Tensor grad;    // [N, C] of the input's dtype, or empty without gradient
  RowLossArgs args;
};

// Call under a device guard for the input's device: the copies and outputs are made there.
RowLossTensors row_loss_tensors(ScalarKind kind, const at::Tensor& input_in,
                                const at::Tensor& target_in, int64_t ignore_index,
                                bool compute_grad) {
  RowLossTensors t;
  t.input = input_in.size(1) > 1 && input_in.stride(1) != 1 ? input_in.contiguous() : input_in;
  t.target = target_in.contiguous();
  const int64_t rows = t.input.size(0);
  const int64_t cols = t.input.size(1);
  t.loss = at::empty({rows}, t.input.options().dtype(accumulation_type(kind)));
  t.grad = compute_grad ? at::empty({rows, cols}, t.input.options())
                        : at::empty({0}, t.input.options());
  t.args.kind = kind;
  t.args.input = t.input.data_ptr();
  t.args.rows = rows;
  t.args.cols = cols;
  t.args.row_stride = t.input.stride(0);
  t.args.target = t.target.data_ptr<int64_t>();
  t.args.ignore_index = ignore_index;
  t.args.loss = t.loss.data_ptr();
  t.args.grad = compute_grad && t.grad.numel() > 0 ? t.grad.data_ptr() : nullptr;
  return t;
}

// The optional per-row margin as a contiguous [N] tensor of the accumulation type, or an
// undefined tensor when absent.
at::Tensor per_row_margin(const std::optional<at::Tensor>& margin, const char* name,
                          const at::Tensor& cos, at::ScalarType acc_type) {
  if (!margin.has_value() || !margin->defined()) return at::Tensor();
  const at::Tensor& m = *margin;
  TORCH_CHECK(m.device() == cos.device(), "margin_cross_entropy: ", name, " is on ",
              m.device(), " but cos is on ", cos.device());
  TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == cos.size(0), "margin_cross_entropy: ", name,
                    " must have shape [N] = [", cos.size(0), "], got ", m.sizes());
  TORCH_CHECK_TYPE(m.scalar_type() == acc_type, "margin_cross_entropy: ", name, " must be ",
                   acc_type, " for cos of dtype ", cos.scalar_type(), ", got ", m.scalar_type());
  return m.contiguous();
}

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy_cuda(
    const at::Tensor& cos_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& row_m2_in, const std::optional<at::Tensor>& row_m3_in,
    double scale, double m1, double m2, double m3, bool detach_margin,
    double label_smoothing, double lse_square_scale, int64_t ignore_index, bool compute_grad) {
  constexpr const char* kOp = "margin_cross_entropy";
  const ScalarKind kind = check_row_loss_inputs(cos_in, "cos", target_in, kOp);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
                    ": label_smoothing must lie in [0, 1], got ", label_smoothing);

  const c10::cuda::CUDAGuard device_guard(cos_in.device());
  const at::Tensor row_m2 = per_row_margin(row_m2_in, "row_m2", cos_in, accumulation_type(kind));
  const at::Tensor row_m3 = per_row_margin(row_m3_in, "row_m3", cos_in, accumulation_type(kind));
  const RowLossTensors t = row_loss_tensors(kind, cos_in, target_in, ignore_index, compute_grad);
  if (t.args.rows == 0) return {t.loss, t.grad};

  MarginArgs args;
  args.matrix = t.args;
  args.row_m2 = row_m2.defined() ? row_m2.data_ptr() : nullptr;
  args.row_m3 = row_m3.defined() ? row_m3.data_ptr() : nullptr;
  args.scale = scale;
  args.m1 = m1;
  args.m2 = m2;
  args.m3 = m3;
  args.use_angle = !(m1 == 1.0 && m2 == 0.0 && !row_m2.defined());
  args.detach_margin = detach_margin;
  args.label_smoothing = label_smoothing;
  args.lse_square_scale = lse_square_scale;
  C10_CUDA_CHECK(launch_margin_cross_entropy(args, c10::cuda::getCurrentCUDAStream()));
  return {t.loss, t.grad};
}

std::tuple<at::Tensor, at::Tensor> spherical_z_loss_cuda(const at::Tensor& logits_in,
                                                         const at::Tensor& target_in, double a,
                                                         double b, int64_t ignore_index,
                                                         bool compute_grad) {
  constexpr const char* kOp = "spherical_z_loss";
  const ScalarKind kind = check_row_loss_inputs(logits_in, "logits", target_in, kOp);
  TORCH_CHECK_VALUE(logits_in.size(1) >= 2, kOp,
                    ": needs C >= 2 classes (the spread of one output is zero by definition), "
                    "got logits of shape ", logits_in.sizes());
  TORCH_CHECK_VALUE(std::isfinite(a) && a > 0, kOp, ": a must be > 0 and finite, got ", a);
  TORCH_CHECK_VALUE(std::isfinite(b), kOp, ": b must be finite, got ", b);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const RowLossTensors t = row_loss_tensors(kind, logits_in, target_in, ignore_index, compute_grad);
  if (t.args.rows == 0) return {t.loss, t.grad};

  SphericalArgs args;
  args.matrix = t.args;
  args.a = a;
  args.b = b;
  C10_CUDA_CHECK(launch_spherical_z_loss(args, c10::cuda::getCurrentCUDAStream()));
  return {t.loss, t.grad};
}

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("margin_cross_entropy", &fusedloss::cuda::margin_cross_entropy_cuda);
  m.impl("spherical_z_loss", &fusedloss::cuda::spherical_z_loss_cuda);
}
