// CUDA implementations of the fusedloss ops (schemas in csrc/ops.cpp): argument checks,
// device guard, current stream and outputs here; the kernels behind the plain launchers
// of csrc/cuda/launchers.h.
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

ScalarKind scalar_kind(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat;
    case at::kDouble: return ScalarKind::kDouble;
    case at::kHalf: return ScalarKind::kHalf;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": cos must be float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

// The optional per-row margin as a contiguous [N] tensor of the accumulation type, or an
// undefined tensor when absent.
at::Tensor per_row_margin(const std::optional<at::Tensor>& margin, const char* name,
                          const at::Tensor& cos, at::ScalarType acc_type) {
  if (!margin.has_value() || !margin->defined()) return at::Tensor();
  const at::Tensor& m = *margin;
  TORCH_CHECK(m.device() == cos.device(), "margin_cross_entropy: ", name, " is on ",
              m.device(), " but cos is on ", cos.device());
  TORCH_CHECK(m.dim() == 1 && m.size(0) == cos.size(0), "margin_cross_entropy: ", name,
              " must have shape [N] = [", cos.size(0), "], got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == acc_type, "margin_cross_entropy: ", name, " must be ",
              acc_type, " for cos of dtype ", cos.scalar_type(), ", got ", m.scalar_type());
  return m.contiguous();
}

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy_cuda(
    const at::Tensor& cos_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& row_m2_in, const std::optional<at::Tensor>& row_m3_in,
    double scale, double m1, double m2, double m3, bool detach_margin,
    double label_smoothing, double lse_square_scale, int64_t ignore_index, bool compute_grad) {
  constexpr const char* kOp = "margin_cross_entropy";
  TORCH_CHECK(cos_in.is_cuda(), kOp, ": cos must be a CUDA tensor, got ", cos_in.device());
  TORCH_CHECK(cos_in.dim() == 2, kOp, ": cos must have shape [N, C], got ", cos_in.sizes());
  const ScalarKind kind = scalar_kind(cos_in, kOp);
  TORCH_CHECK(target_in.device() == cos_in.device(), kOp, ": target is on ",
              target_in.device(), " but cos is on ", cos_in.device());
  TORCH_CHECK(target_in.scalar_type() == at::kLong, kOp, ": target must be int64, got ",
              target_in.scalar_type());
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == cos_in.size(0), kOp,
              ": target must have shape [N] = [", cos_in.size(0), "], got ",
              target_in.sizes());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
              ": label_smoothing must lie in [0, 1], got ", label_smoothing);

  const c10::cuda::CUDAGuard device_guard(cos_in.device());
  // Unit column stride is required; any row stride is used as it is.
  const at::Tensor cos = cos_in.size(1) > 1 && cos_in.stride(1) != 1 ? cos_in.contiguous()
                                                                      : cos_in;
  const at::Tensor target = target_in.contiguous();
  const at::ScalarType acc_type = kind == ScalarKind::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor row_m2 = per_row_margin(row_m2_in, "row_m2", cos, acc_type);
  const at::Tensor row_m3 = per_row_margin(row_m3_in, "row_m3", cos, acc_type);

  const int64_t rows = cos.size(0);
  const int64_t cols = cos.size(1);
  at::Tensor loss = at::empty({rows}, cos.options().dtype(acc_type));
  at::Tensor grad = compute_grad ? at::empty({rows, cols}, cos.options())
                                 : at::empty({0}, cos.options());
  if (rows == 0) return {loss, grad};

  MarginArgs args;
  args.kind = kind;
  args.cos = cos.data_ptr();
  args.rows = rows;
  args.cols = cols;
  args.row_stride = cos.stride(0);
  args.target = target.data_ptr<int64_t>();
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
  args.ignore_index = ignore_index;
  args.loss = loss.data_ptr();
  args.grad = compute_grad && grad.numel() > 0 ? grad.data_ptr() : nullptr;
  C10_CUDA_CHECK(launch_margin_cross_entropy(args, c10::cuda::getCurrentCUDAStream()));
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> spherical_z_loss_cuda(const at::Tensor& logits_in,
                                                         const at::Tensor& target_in, double a,
                                                         double b, int64_t ignore_index,
                                                         bool compute_grad) {
  constexpr const char* kOp = "spherical_z_loss";
  TORCH_CHECK(logits_in.is_cuda(), kOp, ": logits must be a CUDA tensor, got ",
              logits_in.device());
  TORCH_CHECK(logits_in.dim() == 2, kOp, ": logits must have shape [N, C], got ",
              logits_in.sizes());
  TORCH_CHECK(logits_in.scalar_type() == at::kFloat || logits_in.scalar_type() == at::kDouble ||
                  logits_in.scalar_type() == at::kHalf ||
                  logits_in.scalar_type() == at::kBFloat16,
              kOp, ": logits must be float32, float64, float16 or bfloat16, got ",
              logits_in.scalar_type());
  const ScalarKind kind = scalar_kind(logits_in, kOp);
  TORCH_CHECK(target_in.device() == logits_in.device(), kOp, ": target is on ",
              target_in.device(), " but logits is on ", logits_in.device());
  TORCH_CHECK(target_in.scalar_type() == at::kLong, kOp, ": target must be int64, got ",
              target_in.scalar_type());
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == logits_in.size(0), kOp,
              ": target must have shape [N] = [", logits_in.size(0), "], got ",
              target_in.sizes());

  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  // Unit column stride is required; any row stride is used as it is.
  const at::Tensor logits =
      logits_in.size(1) > 1 && logits_in.stride(1) != 1 ? logits_in.contiguous() : logits_in;
  const at::Tensor target = target_in.contiguous();
  const at::ScalarType acc_type = kind == ScalarKind::kDouble ? at::kDouble : at::kFloat;

  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(acc_type));
  at::Tensor grad = compute_grad ? at::empty({rows, cols}, logits.options())
                                 : at::empty({0}, logits.options());
  if (rows == 0) return {loss, grad};

  SphericalArgs args;
  args.kind = kind;
  args.logits = logits.data_ptr();
  args.rows = rows;
  args.cols = cols;
  args.row_stride = logits.stride(0);
  args.target = target.data_ptr<int64_t>();
  args.a = a;
  args.b = b;
  args.ignore_index = ignore_index;
  args.loss = loss.data_ptr();
  args.grad = compute_grad && grad.numel() > 0 ? grad.data_ptr() : nullptr;
  C10_CUDA_CHECK(launch_spherical_z_loss(args, c10::cuda::getCurrentCUDAStream()));
  return {loss, grad};
}

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("margin_cross_entropy", &fusedloss::cuda::margin_cross_entropy_cuda);
  m.impl("spherical_z_loss", &fusedloss::cuda::spherical_z_loss_cuda);
}
