// Row math of the spherical Z-loss (de Brebisson and Vincent, 2016), shared by the CPU
// and CUDA kernels.
//
// A row holds outputs o_k, k in [0, C), C >= 2, and a target c:
//
//   mu    = (1/C) sum_k o_k
//   sigma = max(sqrt((1/C) sum_k (o_k - mu)^2), kSigmaFloor)
//   z_c   = (o_c - mu) / sigma
//   loss  = softplus(a (b - z_c)) / a
//
// sigma is floored, not regularised with an epsilon under the square root, so the loss is
// exactly invariant to o -> alpha o + beta (alpha > 0) whenever the spread exceeds the
// floor. The variance is accumulated about the mean (a second pass over the row), never as
// E[o^2] - mu^2, which cancels when the mean is large against the spread.
//
// Gradient. With g = sigmoid(a (b - z_c)), dloss/dz_c = -g. Where sigma > floor,
// dsigma/do_k = (o_k - mu) / (C sigma), so
//
//   dz_c/do_k = [k = c] / sigma - 1 / (C sigma) - z_c (o_k - mu) / (C sigma^2)
//
// and the gradient of a row has the structure alpha + beta (o_k - m) + gamma [k = c]:
//
//   dloss/do_k = -g dz_c/do_k = alpha + beta (o_k - m) + gamma [k = c],
//   gamma = -g / sigma,   beta = g z_c / (C sigma^2),   alpha = g / (C sigma) - beta (mu - m).
//
// Where the floor holds sigma constant, the z_c (o_k - mu) term is absent (beta = 0).
//
// m is the mean as first rounded (pass 1) and mu - m = D / C its correction from the sum D
// of the deviations o_k - m (pass 2). The kernels never form o_k - mu from a rounded mu:
// when the mean is many times the spread, o_k - m is exact (the operands are close) and the
// small correction is subtracted apart, so z_c = ((o_c - m) - D / C) / sigma and the
// gradient keep full precision. The form alpha' + beta o_k would cancel there: its two terms
// are each about mean / spread times larger than their sum.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fusedloss {
namespace spherical {

using std::exp;
using std::log1p;
using std::sqrt;

// The floor on sigma. A row whose spread is below it (all outputs equal, to rounding) has
// no direction to push the target along; the floor keeps the loss finite there.
constexpr double kSigmaFloor = 1e-12;

template <typename acc_t>
struct RowGrad {
  acc_t alpha;
  acc_t beta;
  acc_t gamma;
};

// softplus(x) = log(1 + exp(x)), without overflow for large x.
template <typename acc_t>
FL_HOST_DEVICE acc_t softplus(acc_t x) {
  return x > acc_t(0) ? x + log1p(exp(-x)) : log1p(exp(x));
}

// sigma from the sum of squared deviations about the mean, floored.
template <typename acc_t>
FL_HOST_DEVICE acc_t floored_sigma(acc_t sum_sq_dev, int64_t num_classes) {
  const acc_t s = sqrt(sum_sq_dev / acc_t(num_classes));
  return (s > acc_t(kSigmaFloor) || s != s) ? s : acc_t(kSigmaFloor);  // NaN passes through
}

template <typename acc_t>
FL_HOST_DEVICE acc_t z_loss(acc_t z_target, acc_t a, acc_t b) {
  return softplus(a * (b - z_target)) / a;
}

template <typename acc_t>
FL_HOST_DEVICE RowGrad<acc_t> z_loss_grad(acc_t z_target, acc_t mean_correction, acc_t sigma,
                                          bool floored, acc_t a, acc_t b, int64_t num_classes) {
  const acc_t g = acc_t(1) / (acc_t(1) + exp(-a * (b - z_target)));  // sigmoid(a (b - z_c))
  const acc_t C = acc_t(num_classes);
  RowGrad<acc_t> r;
  r.gamma = -g / sigma;
  r.beta = floored ? acc_t(0) : g * z_target / (C * sigma * sigma);
  r.alpha = g / (C * sigma) - r.beta * mean_correction;
  return r;
}

}  // namespace spherical
}  // namespace fusedloss
