// CPU kernel of fusedloss::spherical_z_loss (math and gradient:
// csrc/include/fusedloss/spherical.h).
//
// Rows run in parallel (at::parallel_for). Per row:
//   pass 1  the mean: a vectorised sum, per chunk of kChunk elements (8 KiB of fp32, in
//           L1), the chunk sums added in order, so the rounding error grows with the
//           number of chunks, not with C;
//   pass 2  the sum of squared deviations about that mean, never E[o^2] - mu^2, which
//           cancels when the mean is large against the spread. The same sweep adds the
//           deviations d_k = o_k - mu; their sum is zero up to the rounding of mu, and the
//           corrected two-pass formula (Chan, Golub and LeVeque, 1983)
//               mu  += sum(d) / C,    S = sum(d^2) - sum(d)^2 / C
//           removes that rounding from both the mean and the spread;
//   then    sigma, z_c and the loss from spherical.h;
//   pass 3  (compute_grad only) grad_k = alpha + beta o_k + gamma [k = c] with alpha, beta,
//           gamma from spherical.h, in the logits' dtype, so backward only scales it.
// Accumulation in fp32 (fp64 for fp64 logits); fp16 and bf16 are read and written in
// their own dtype. Ignored rows read nothing: loss 0 and a zero gradient row. NaN in a row
// reaches mu, hence z_c, the loss and every gradient entry of that row.
#include <algorithm>
#include <cmath>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <fusedloss/spherical.h>

#include "margin_row.h"  // check_targets, kChunk
#include "scores_op.h"
#include "vec_math.h"

namespace fusedloss {
namespace cpu {
namespace spherical_row {

// sum_i x_i over n elements.
template <typename scalar_t, typename acc_t>
FL_CPU_CLONES acc_t sum_of(const scalar_t* x, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t>(x[i]);
  return s;
}

template <typename acc_t>
struct DevSums {
  acc_t sum_dev;     // sum_i (x_i - shift)
  acc_t sum_sq_dev;  // sum_i (x_i - shift)^2
};

template <typename scalar_t, typename acc_t>
FL_CPU_CLONES DevSums<acc_t> dev_sums(const scalar_t* x, int64_t n, acc_t shift) {
  acc_t s = 0, s2 = 0;
#pragma omp simd reduction(+ : s, s2)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - shift;
    s += d;
    s2 += d * d;
  }
  return {s, s2};
}

// grad_i = alpha + beta (x_i - shift)
template <typename scalar_t, typename acc_t>
FL_CPU_CLONES void write_affine(const scalar_t* x, scalar_t* grad, int64_t n, acc_t alpha,
                                acc_t beta, acc_t shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    grad[i] = static_cast<scalar_t>(alpha + beta * (static_cast<acc_t>(x[i]) - shift));
  }
}

template <typename scalar_t, typename acc_t>
struct RowArgs {
  const scalar_t* logits;
  int64_t row_stride;
  const int64_t* target;
  acc_t a;
  acc_t b;
  int64_t ignore_index;
  int64_t num_classes;
  acc_t* loss;
  scalar_t* grad;  // nullable: no gradient wanted; rows of num_classes, contiguous
};

template <typename scalar_t, typename acc_t>
void z_loss_row(const RowArgs<scalar_t, acc_t>& p, int64_t i) {
  const int64_t C = p.num_classes;
  const int64_t c = p.target[i];
  scalar_t* grad_row = p.grad ? p.grad + i * C : nullptr;
  if (c == p.ignore_index) {
    p.loss[i] = acc_t(0);
    if (grad_row) std::fill(grad_row, grad_row + C, scalar_t(0));
    return;
  }
  const scalar_t* row = p.logits + i * p.row_stride;

  acc_t sum = 0;
  for (int64_t k = 0; k < C; k += kChunk) sum += sum_of<scalar_t, acc_t>(row + k, std::min(kChunk, C - k));
  const acc_t mean = sum / acc_t(C);  // m of spherical.h: the mean as first rounded

  acc_t sum_dev = 0, sum_sq_dev = 0;
  for (int64_t k = 0; k < C; k += kChunk) {
    const DevSums<acc_t> part = dev_sums<scalar_t, acc_t>(row + k, std::min(kChunk, C - k), mean);
    sum_dev += part.sum_dev;
    sum_sq_dev += part.sum_sq_dev;
  }
  const acc_t correction = sum_dev / acc_t(C);  // mu - m
  sum_sq_dev -= sum_dev * correction;
  sum_sq_dev = sum_sq_dev < acc_t(0) ? acc_t(0) : sum_sq_dev;  // NaN passes through

  // A NaN spread (a row holding inf or NaN) gives sigma = NaN, hence a NaN loss and gradient
  // row, as in the reference (whose clamp_min propagates NaN). floored_sigma passes NaN
  // through as well; the explicit test states the contract here.
  const acc_t sigma = std::isnan(sum_sq_dev) ? sum_sq_dev : spherical::floored_sigma(sum_sq_dev, C);
  const bool floored = sigma == acc_t(spherical::kSigmaFloor);
  // o_c - mu as (o_c - m) - (mu - m): the first difference is exact next to the mean.
  const acc_t z_c = ((static_cast<acc_t>(row[c]) - mean) - correction) / sigma;
  p.loss[i] = spherical::z_loss(z_c, p.a, p.b);
  if (!grad_row) return;

  const spherical::RowGrad<acc_t> g =
      spherical::z_loss_grad(z_c, correction, sigma, floored, p.a, p.b, C);
  for (int64_t k = 0; k < C; k += kChunk) {
    write_affine(row + k, grad_row + k, std::min(kChunk, C - k), g.alpha, g.beta, mean);
  }
  grad_row[c] = static_cast<scalar_t>(
      g.alpha + g.beta * (static_cast<acc_t>(row[c]) - mean) + g.gamma);
}

}  // namespace spherical_row

namespace {

constexpr const char* kOp = "spherical_z_loss";

std::tuple<at::Tensor, at::Tensor> spherical_z_loss(const at::Tensor& logits_in,
                                                    const at::Tensor& target_in, double a,
                                                    double b, int64_t ignore_index,
                                                    bool compute_grad) {
  check_scores_and_target(kOp, "logits", logits_in, target_in);
  TORCH_CHECK(target_in.device().is_cpu(), kOp, ": target must be on the CPU, got ",
              target_in.device());
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  TORCH_CHECK_VALUE(C >= 2, kOp,
                    ": needs C >= 2 classes (the spread of one output is zero by definition), "
                    "got logits of shape ", logits_in.sizes());
  TORCH_CHECK_VALUE(std::isfinite(a) && a > 0, kOp, ": a must be > 0 and finite, got ", a);
  TORCH_CHECK_VALUE(std::isfinite(b), kOp, ": b must be finite, got ", b);

  const at::Tensor logits = unit_column_stride(logits_in);
  const at::Tensor target = target_in.contiguous();
  check_targets(target, C, ignore_index, kOp);

  at::Tensor loss, grad;
  std::tie(loss, grad) = row_outputs(logits, compute_grad);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const spherical_row::RowArgs<scalar_t, acc_t> args{
        logits.data_ptr<scalar_t>(), logits.stride(0), target.data_ptr<int64_t>(), acc_t(a),
        acc_t(b), ignore_index, C, loss.data_ptr<acc_t>(),
        compute_grad ? grad.data_ptr<scalar_t>() : nullptr};
    for_each_row(N, C, [&](int64_t i) { spherical_row::z_loss_row(args, i); });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("spherical_z_loss", &spherical_z_loss);
}

}  // namespace cpu
}  // namespace fusedloss
