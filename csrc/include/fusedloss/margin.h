// Row math of the margin softmax cross-entropy, shared by the CPU and CUDA kernels.
//
// A row holds cosines c_j, j in [0, C), and a target class y. Logits:
//
//   z_j = s * c_j                          for j != y
//   z_y = s * (psi(phi) - m3),   phi = m1 * theta + m2,   theta = arccos(clamp(c_y, -1, 1))
//
// psi continues cos past pi the way SphereFace does, so that the target logit is
// continuous and monotonically decreasing in theta for every m1 >= 1 and every m2:
//
//   psi(phi) = (-1)^k cos(phi) - 2k,   k = floor(phi / pi)
//
// For phi in [0, pi] this is cos(phi); on [pi, 2 pi] it is -2 - cos(phi), the point
// reflection of cos about (pi, -1); and so on. Each piece is decreasing, and pieces k-1
// and k both equal 1 - 2k at phi = k pi with zero slope there: psi is C^1 and monotone.
//
// When m1 = 1 and m2 = 0 (CosFace, or no margin) z_y = s * (c_y - m3) directly: no
// arccos, no clamp.
//
// Derivative of the target logit with respect to c_y ("exact" margin gradient):
//
//   dz_y/dc_y = s * psi'(phi) * m1 * dtheta/dc_y
//             = s * (-1)^(k+1) sin(phi) * m1 * (-1 / sin(theta))
//             = s * m1 * (-1)^k sin(phi) / sin(theta)          (>= 0 everywhere)
//
// It diverges as theta -> 0 or pi, so it is evaluated at theta clamped to
// [kThetaEps, pi - kThetaEps]; the loss value always uses the unclamped theta. With
// kThetaEps = 0.01 rad the factor is at most m1 / sin(0.01) ~ 100 m1, far from fp16
// overflow even at s = 64. With the "detached" margin gradient the margin is a constant
// shift of the target logit and dz_y/dc_y = s.
//
// Cross-entropy with label smoothing eps (as torch.nn.functional.cross_entropy):
//
//   lse  = log sum_j exp(z_j)
//   loss = lse - (1 - eps) z_y - (eps / C) sum_j z_j
//   dloss/dz_j = softmax_j - eps / C - (1 - eps) [j = y]
//   dloss/dc_j = s * dloss/dz_j (j != y),   dloss/dc_y = dz_y/dc_y * dloss/dz_y
//
// Kernels keep a row as M = max_j z_j, S_o = sum_{j != y} exp(z_j - M) and
// S = S_o + exp(z_y - M), and never round lse = M + log S itself: in fp32 at |z| ~ 64 that
// rounding alone is ~4e-6, which the margin slope (up to ~100 s) turns into a visible
// gradient error. So
//
//   loss       = (M - z_y) + log S + eps (z_y - sum_j z_j / C)
//   dloss/dc_j = s (exp(z_j - M) / S - eps / C)                        (j != y)
//   dloss/dc_y = dz_y/dc_y (eps - eps / C - S_o / S)
//
// the last because softmax_y - 1 = -S_o / S, which keeps 1 - p_y accurate when p_y ~ 1.
//
// Auxiliary term (PaLM's "z-loss", lse_square_scale = lambda >= 0, default 0): each row
// may add lambda lse^2, which pulls the log-partition function towards 0 so that the
// logits do not drift (this is not spherical_z_loss, a different loss on the logits: see
// spherical.h). Here lse is the log-sum-exp of the margin-adjusted logits z. With
//
//   d(lambda lse^2)/dz_j = 2 lambda lse softmax_j =: g softmax_j
//
// the row becomes
//
//   loss       = (M - z_y) + log S + eps (z_y - sum_j z_j / C) + lambda (M + log S)^2
//   dloss/dc_j = s ((1 + g) exp(z_j - M) / S - eps / C)                 (j != y)
//   dloss/dc_y = dz_y/dc_y (eps - eps / C - S_o / S + g exp(z_y - M) / S)
//
// For this term the rounded lse = M + log S is fine: it enters the loss as lambda lse^2
// (relative error ~1e-7) and the gradient only through g, whose rounding error (~1e-7 g)
// is a relative error of the small correction g softmax_j, not of the cross-entropy
// gradient. The term holds no new sum over the row: M and S are already there. Ignored
// rows carry no term. Label smoothing is independent of it (the term is added to the loss).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fusedloss {
namespace margin {

// Host code: the float overloads of <cmath>, not the double C functions.
using std::acos;
using std::cos;
using std::exp;
using std::floor;
using std::log;
using std::sin;
using std::sqrt;
using std::tanh;

// Half-width of the theta range excluded when evaluating the margin derivative.
constexpr double kThetaEps = 0.01;
constexpr double kPi = 3.14159265358979323846;

// The margin hyperparameters of one row.
template <typename acc_t>
struct Params {
  acc_t scale;
  acc_t m1;
  acc_t m2;
  acc_t m3;
  bool use_angle;      // false for m1 = 1, m2 = 0: z_y = s (c_y - m3), no arccos
  bool detach_margin;  // true: dz_y/dc_y = s
};

template <typename acc_t>
struct TargetLogit {
  acc_t value;  // z_y
  acc_t slope;  // dz_y / dc_y
};

// Clamp that lets NaN through (std::min/max and fmin/fmax may drop it).
template <typename acc_t>
FL_HOST_DEVICE acc_t clamp_keep_nan(acc_t x, acc_t lo, acc_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// (-1)^k for k = floor(phi / pi), and the offset 2k, of the SphereFace continuation.
template <typename acc_t>
FL_HOST_DEVICE acc_t continuation_piece(acc_t phi, acc_t* sign) {
  const acc_t k = floor(phi / acc_t(kPi));
  const acc_t half = k * acc_t(0.5);
  *sign = (half == floor(half)) ? acc_t(1) : acc_t(-1);
  return acc_t(2) * k;
}

template <typename acc_t>
FL_HOST_DEVICE TargetLogit<acc_t> target_logit(acc_t c, const Params<acc_t>& p) {
  TargetLogit<acc_t> out;
  if (!p.use_angle) {
    out.value = p.scale * (c - p.m3);
    out.slope = p.scale;
    return out;
  }
  const acc_t cc = clamp_keep_nan(c, acc_t(-1), acc_t(1));
  const acc_t theta = acos(cc);
  const acc_t phi = p.m1 * theta + p.m2;
  acc_t sign;
  const acc_t offset = continuation_piece(phi, &sign);
  out.value = p.scale * (sign * cos(phi) - offset - p.m3);
  if (p.detach_margin) {
    out.slope = p.scale;
    return out;
  }
  // sin(theta_c) from the cosine, not from theta: in fp32, theta near pi carries an
  // absolute error of ~1e-7, which is a relative error of 1e-5 in sin(0.01).
  const acc_t eps = acc_t(kThetaEps);
  const acc_t theta_c = clamp_keep_nan(theta, eps, acc_t(kPi) - eps);
  const acc_t sin_theta_c = theta_c == theta ? sqrt((acc_t(1) - cc) * (acc_t(1) + cc)) : sin(eps);
  const acc_t phi_c = p.m1 * theta_c + p.m2;
  acc_t sign_c;
  continuation_piece(phi_c, &sign_c);
  out.slope = p.scale * p.m1 * sign_c * sin(phi_c) / sin_theta_c;
  return out;
}

// The per-row statistics of the softmax, in the form described above.
template <typename acc_t>
struct RowSums {
  acc_t max;        // M
  acc_t sum_other;  // S_o = sum_{j != y} exp(z_j - M)
  acc_t sum;        // S = S_o + exp(z_y - M)
};

template <typename acc_t>
FL_HOST_DEVICE RowSums<acc_t> row_sums(acc_t max, acc_t sum_other, acc_t z_target) {
  return {max, sum_other, sum_other + exp(z_target - max)};
}

// g = 2 lambda lse with lse = M + log S: the auxiliary term's gradient is g softmax_j.
// Exactly 0 when lambda = 0, so that the formulas below reduce to the plain ones bit for bit.
template <typename acc_t>
FL_HOST_DEVICE acc_t lse_square_grad(const RowSums<acc_t>& r, acc_t lse_square_scale) {
  if (lse_square_scale == acc_t(0)) return acc_t(0);
  return acc_t(2) * lse_square_scale * (r.max + log(r.sum));
}

// loss = (M - z_y) + log S + eps (z_y - sum_z / C) + lambda (M + log S)^2
template <typename acc_t>
FL_HOST_DEVICE acc_t row_loss(const RowSums<acc_t>& r, acc_t z_target, acc_t sum_z,
                              acc_t smoothing, int64_t num_classes, acc_t lse_square_scale) {
  const acc_t log_sum = log(r.sum);
  acc_t loss = (r.max - z_target) + log_sum;
  if (smoothing != acc_t(0)) loss += smoothing * (z_target - sum_z / acc_t(num_classes));
  if (lse_square_scale != acc_t(0)) {
    const acc_t lse = r.max + log_sum;
    loss += lse_square_scale * lse * lse;
  }
  return loss;
}

// dloss/dc_j for j != y, given e = exp(z_j - M): s ((1 + g) e / S - eps / C). `uniform` is
// eps / C, `z_grad` is g = lse_square_grad(...) (0 without the auxiliary term).
template <typename acc_t>
FL_HOST_DEVICE acc_t grad_other(acc_t e, acc_t inv_sum, acc_t scale, acc_t uniform,
                                acc_t z_grad) {
  return scale * (e * inv_sum * (acc_t(1) + z_grad) - uniform);
}

// dloss/dc_y = dz_y/dc_y (eps - eps / C - S_o / S + g exp(z_y - M) / S).
template <typename acc_t>
FL_HOST_DEVICE acc_t grad_target(const TargetLogit<acc_t>& t, const RowSums<acc_t>& r,
                                 acc_t smoothing, acc_t uniform, acc_t z_grad) {
  acc_t d = smoothing - uniform - r.sum_other / r.sum;
  if (z_grad != acc_t(0)) d += z_grad * (exp(t.value - r.max) / r.sum);
  return t.slope * d;
}

// Sharded rows (family "sharded"; CPU: csrc/cpu/sharded.cpp, Triton: triton_kernels/sharded.py,
// combine: python/fusedloss/sharded.py). The C classes of a row are split over ranks; rank r
// holds the columns J_r = [class_start, class_start + C_r) and reduces them to three partials
//
//   lse_other_r = log sum_{j in J_r, j != y} exp(z_j)     (-inf for an empty sum)
//   zy_r        = z_y when y in J_r, else 0
//   sum_z_r     = sum_{j in J_r} z_j
//
// lse_other_r is max-rescaled over the non-target columns alone, its running maximum starting
// at -inf. (The logit-level single-process kernels seed it with z_y, harmless there because S
// holds exp(z_y - M); seeded so, this partial would lose (underflow, or on the CPU hit
// fast_exp's floor) every term more than ~87 below z_y, and nothing would hide it. The
// Triton fused linear kernel starts at -inf for both, so that one kernel serves both.)
//
// Every row's target is in exactly one shard and every other column in exactly one, so
// with shift = max_r lse_other_r (0 when that is -inf: no column j != y anywhere)
//
//   lse_o = log sum_{j != y} exp(z_j) = shift + log sum_r exp(lse_other_r - shift),
//   z_y = sum_r zy_r,   sum_z = sum_r sum_z_r,
//   lse = log(exp(lse_o) + exp(z_y)) = logaddexp(lse_o, z_y),
//
// and the loss of the single-process row above, written without M (M + log S = lse):
//
//   loss = softplus(lse_o - z_y) + eps (z_y - sum_z / C) + lambda lse^2
//
// (softplus(lse_o - z_y) = lse - z_y without its cancellation when p_y ~ 1). Its derivatives,
// with p_j = exp(z_j - lse), g = 2 lambda lse and 1 - p_y = S_o / S = exp(lse_o - lse)
// (accurate when p_y ~ 1):
//
//   dloss/dz_j = (1 + g) p_j - eps / C                                        (j != y)
//   dloss/dz_y = (1 + g) p_y - (1 - eps) - eps / C = eps - eps / C - exp(lse_o - lse) + g p_y
//
// and dz_j/dc_j = s, dz_y/dc_y from target_logit. Times the row weight r = dL / dloss:
//
//   dL/dc_j = s (a exp(s c_j - lse) - b)     (j != y),   a = r (1 + g),   b = r eps / C
//   dL/dc_y = dz_y/dc_y d,   d = r (eps - eps / C - exp(lse_o - lse) + g exp(z_y - lse))
//
// So after the combine every rank needs per row only coef = (lse, a, b, d), and computes
// the gradient of its own columns with no further communication.
//
// The epilogues that act on the combined row alone (the comp-sum loss of tau, the shared
// extra columns of extra_negatives, the lse output) change only the loss and (lse, a, b, d);
// they are derived where they are computed, in the docstring of python/fusedloss/sharded.py.
//
// Logit transforms of these rows (softcap, inter-class filtering; the single-process ops run
// on the sharded kernels whenever one is set). With threshold t (0: off) and cap h (0: off),
// a column j != y has
//
//   c'_j = 0 if t > 0 and c_j > t, else c_j        (insightface: no gradient through it)
//   z_j  = h tanh(s c'_j / h)   (s c'_j without a cap)
//   dz_j/dc_j = 0 if filtered, else s (1 - tanh^2(s c'_j / h))   (s without a cap)
//
// and the target, which is never filtered and carries no margin when capped, z_y =
// h tanh(s c_y / h), dz_y/dc_y = s (1 - tanh^2(s c_y / h)). The partials and coefficients
// above hold with these z (the sum_z of label smoothing is their sum), and the gradient of a
// column is dz_j/dc_j (a exp(z_j - lse) - b), which is s (a exp(s c_j - lse) - b) untransformed.

template <typename acc_t>
struct Transform {
  acc_t softcap;    // h; 0: no cap
  acc_t threshold;  // t; 0: no filtering
  FL_HOST_DEVICE bool active() const { return softcap != acc_t(0) || threshold != acc_t(0); }
};

// z = h tanh(z / h) and *slope *= dz'/dz = 1 - tanh^2(z / h); z unchanged without a cap.
template <typename acc_t>
FL_HOST_DEVICE acc_t capped(acc_t z, acc_t softcap, acc_t* slope) {
  if (softcap == acc_t(0)) return z;
  const acc_t th = tanh(z / softcap);
  *slope *= acc_t(1) - th * th;
  return softcap * th;
}

// z_j of a non-target column and *slope = dz_j/dc_j, as above.
template <typename acc_t>
FL_HOST_DEVICE acc_t transformed_logit(acc_t c, acc_t scale, const Transform<acc_t>& tr,
                                       acc_t* slope) {
  if (tr.threshold != acc_t(0) && c > tr.threshold) {
    *slope = acc_t(0);
    return acc_t(0);
  }
  *slope = scale;
  return capped(scale * c, tr.softcap, slope);
}

// dL/dc_j = s (a e - b) of a non-target column, e = exp(s c_j - lse).
template <typename acc_t>
FL_HOST_DEVICE acc_t sharded_grad_other(acc_t e, acc_t scale, acc_t a, acc_t b) {
  return scale * (a * e - b);
}

}  // namespace margin
}  // namespace fusedloss
