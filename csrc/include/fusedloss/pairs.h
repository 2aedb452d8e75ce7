// Per-pair math of the pair losses (ops pair_extrema, pair_row_stats and
// pair_row_stats_backward; contracts in python/fusedloss/_schemas.py), shared by the CPU and
// CUDA kernels.
//
// Row i of the queries x [N, D] meets column j of the references r [M, D] through
// S_ij = x_i . r_j. Pair (i, j) is positive when the labels agree, negative otherwise, and
// no pair at all when self_offset >= 0 and j = (self_offset + i) mod M. The score s_ij of a
// pair is S_ij (distance 0) or the euclidean distance (distance 1)
//
//   d_ij = sqrt(max(|x_i|^2 + |r_j|^2 - 2 S_ij, 0)).
//
// Every kind reduces a row to a few statistics of its scores; the kernels fold them tile by
// tile. The functions below take a score and give the pair's term, or its derivative
// dstat/ds; exponentials are left to the caller (which may use a vectorised exp), so the
// derivative functions take e = exp(exponent - stat) as an argument.
//
// Kind 0, multi-similarity, hyper (alpha, beta, base, epsilon). Both statistics have the
// form log(1 + sum_{kept} exp(c (s - base))), with c = -alpha over the positives (stat_0)
// and c = beta over the negatives (stat_1). The "1 +" is the exponential of a zero term, so
// a statistic is the lse over {0} u {c (s_j - base)}: a running maximum that starts at 0
// with a running sum that starts at 1. Thresholds (max_neg, min_pos) of the row are
// constants: a positive is kept iff s - epsilon < max_neg, a negative iff
// s + epsilon > min_pos. Derivative, with the exponent never above the statistic:
//   dstat/ds = c exp(c (s - base) - stat).
//
// Kind 1, supcon / info-nce, hyper (t): with z = s / t over every pair of the row,
//   stat_0 = lse_j z_j (-inf without pairs),  stat_1 = sum_{pos} z_j,  stat_2 = #pos,
//   dstat_0/ds = exp(z - stat_0) / t,  dstat_1/ds = [pos] / t.
//
// Kind 2, contrastive, hyper (pos_margin, neg_margin). The pair loss is
//   l = relu(tau (s - m)),  tau = sigma, m = pos_margin (positives),
//                           tau = -sigma, m = neg_margin (negatives),
// with sigma = +1 for distances and -1 for similarities: relu(d - pos_margin),
// relu(neg_margin - d), relu(pos_margin - S), relu(S - neg_margin) (tau (s - m) rounds as
// these do: negating a difference is exact). stats = (sum_pos l, #{pos: l > 0}, sum_neg l,
// #{neg: l > 0}), and dl/ds = tau [not l <= 0]: relu' as torch's, 0 at 0, and 1 at a NaN l
// (torch's relu backward masks by l <= 0, so a NaN pair passes its gradient on).
//
// Kind 3, orthogonal projection (OPL), hyper (absolute: 0 or 1); the library uses distance 0.
// Plain sums and counts: with f(s) = s, or |s| when absolute,
//   stats = (sum_pos s, #pos, sum_neg f(s), #neg),
//   dstat_0/ds = [pos],  dstat_2/ds = [neg] f'(s),  f'(s) = 1, or sgn(s) when absolute
// (torch's abs backward: 0 at 0, NaN at NaN). The loss (1 - s_mean) + gamma d_mean is formed
// from the sums of the four columns over the rows (python/fusedloss/pairs.py).
//
// Backward, all kinds: w_ij = sum_k g_ik dstat_ik/ds_ij with g = grad_stats (count entries
// ignored) is dL/ds_ij. Distance 0: dL/dS = w, so grad_x = W r and grad_r = W^T x.
// Distance 1: dd_ij/dx_i = (x_i - r_j) / d_ij, taken as 0 where d_ij = 0 (as torch.cdist's
// gradient), so with a_ij = w_ij / d_ij (0 at d_ij = 0; NaN at a NaN d_ij, even where w_ij = 0,
// as for a pair that the miner leaves out: a NaN distance, as the oracle's sqrt, gets a NaN
// gradient)
//   grad_x_i = sum_j a_ij (x_i - r_j) = (sum_j a_ij) x_i - sum_j a_ij r_j,
//   grad_r_j = sum_i a_ij (r_j - x_i) = (sum_i a_ij) r_j - sum_i a_ij x_i:
// the products of distance 0 with W = -a, plus a row-sum (column-sum) multiple of x_i (r_j).
//
// Near-duplicate pairs (distance 1). With unit roundoff u of the accumulation dtype, |x|^2,
// |r|^2 and S each come out of a D-term sum with an absolute error of at most
// gamma_D (|x|^2 + |r|^2) (gamma_D = D u / (1 - D u); for S by |2 S| <= |x|^2 + |r|^2), so
//   |fl(d^2) - d^2| <= c u (|x|^2 + |r|^2),   c ~ 2 D in the worst case, O(sqrt D) typically,
// whatever d is: relative to d^2 it grows without bound as the pair closes. For unit rows
// the relative error of d^2 is of order c u / d^2: in fp32 (u = 2^-24) percents at
// d ~ 1e-3, all of d^2 at d ~ 1e-4, and an exact duplicate gets d of order sqrt(c u)
// (~5e-4) instead of 0; a = w / d of the backward is wrong by the same factor. So a pair
// is "near" when the Gram value says
//   d^2 < kappa (|x|^2 + |r|^2),   kappa = kNearFraction = 2^-6,
// and for it the kernels recompute d^2 = sum_k (x_k - r_k)^2 in the accumulation dtype from
// the differences: each is exact where x_k and r_k lie within a factor 2 of each other
// (Sterbenz) and has relative error u otherwise, so that sum has relative error at most
// gamma_{D+1} whatever d, and an exact duplicate gives d = 0 exactly. A pair that is not
// near keeps the Gram form with relative error below c u / kappa = 64 c u in d^2 and half
// that in d (fp32: ~4e-6 c). Deciding near from the rounded Gram value only moves pairs with
// d^2 within c u (|x|^2 + |r|^2) of the boundary, where either form is that accurate. The
// backward recomputes the Gram tile, so it makes the same decision.
// The backward's Gram form cancels for near pairs too: a_ij x_i and a_ij r_j almost agree,
// each with an error ~ u |a_ij| |x_i|, against a difference of size |a_ij| d_ij. So near
// pairs are taken out of the products and sums above (their W_ij = a_ij = 0 there) and
// a_ij (x_i - r_j) is added from the differences: relative error u for each such pair. For
// the others, |x_i| + |r_j| <= sqrt(2 (|x_i|^2 + |r_j|^2)) < sqrt(2 / kappa) d_ij, so the
// cancellation costs at most a factor sqrt(2 / kappa) ~ 11 on u.
//
// pair_extrema: distance 0 wants (min pos S, max neg S), distance 1 (max pos d, min neg d).
// With keys sign * s for positives and -sign * s for negatives, sign = extrema_sign(distance)
// (+1 for distance 0, -1 for distance 1), all four become "smallest key, first column on
// ties", and an empty row's key +inf turns into the contract's (+inf, -inf) or (-inf, +inf).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fusedloss {
namespace pairs {

using std::sqrt;

enum Kind : int64_t {
  kMultiSimilarity = 0,
  kSupCon = 1,
  kContrastive = 2,
  kOrthogonalProjection = 3
};
enum Distance : int64_t { kSimilarity = 0, kEuclidean = 1 };

// How many statistics a row of `kind` has (K of the contract); 0 for an unknown kind.
FL_HOST_DEVICE int64_t num_stats(int64_t kind) {
  switch (kind) {
    case kMultiSimilarity: return 2;
    case kSupCon: return 3;
    case kContrastive: return 4;
    case kOrthogonalProjection: return 4;
    default: return 0;
  }
}

// How many hyperparameters `kind` takes; 0 for an unknown kind.
FL_HOST_DEVICE int64_t num_hyper(int64_t kind) {
  switch (kind) {
    case kMultiSimilarity: return 4;
    case kSupCon: return 1;
    case kContrastive: return 2;
    case kOrthogonalProjection: return 1;
    default: return 0;
  }
}

// The column that is no pair of row i, or -1 (no self_offset, or no columns).
FL_HOST_DEVICE int64_t excluded_column(int64_t i, int64_t self_offset, int64_t M) {
  return (self_offset < 0 || M <= 0) ? -1 : (self_offset + i) % M;
}

// d^2 = max(|x|^2 + |r|^2 - 2 S, 0), and d; NaN stays NaN.
template <typename acc_t>
FL_HOST_DEVICE acc_t squared_distance(acc_t sq_x, acc_t sq_r, acc_t dot) {
  const acc_t squared = sq_x + sq_r - acc_t(2) * dot;
  return squared < acc_t(0) ? acc_t(0) : squared;
}

// kappa of "Near-duplicate pairs" above: the Gram form serves while d^2 >= kappa (|x|^2 + |r|^2).
constexpr double kNearFraction = 1.0 / 64;

// Whether a pair with squared distance d2 (of either form) and squared norms sq_x, sq_r is near
// (see above); false for NaN.
template <typename acc_t>
FL_HOST_DEVICE bool is_near(acc_t d2, acc_t sq_x, acc_t sq_r) {
  return d2 < acc_t(kNearFraction) * (sq_x + sq_r);
}

// sum_k (x_k - r_k)^2: the squared distance of a near pair, from the differences.
template <typename acc_t>
FL_HOST_DEVICE acc_t direct_squared_distance(const acc_t* x, const acc_t* r, int64_t D) {
  acc_t sum = 0;
  for (int64_t k = 0; k < D; ++k) {
    const acc_t diff = x[k] - r[k];
    sum += diff * diff;
  }
  return sum;
}

// a = w / d, 0 where d = 0: the coefficient of (x_i - r_j) in the distance-1 gradient. d is
// >= 0 or NaN; a NaN d (a NaN input, whose loss is NaN) gives a NaN a, not 0.
template <typename acc_t>
FL_HOST_DEVICE acc_t euclidean_coef(acc_t w, acc_t d) {
  return d == acc_t(0) ? acc_t(0) : w / d;
}

// The sign of the positives' keys in pair_extrema (see above).
FL_HOST_DEVICE int extrema_sign(int64_t distance) { return distance == kSimilarity ? 1 : -1; }

// ---- kind 0, multi-similarity --------------------------------------------------------
template <typename acc_t>
struct MultiSimilarity {
  acc_t alpha, beta, base, epsilon;

  // c of the pair's term exp(c (s - base)).
  FL_HOST_DEVICE acc_t scale(bool positive) const { return positive ? -alpha : beta; }
  FL_HOST_DEVICE acc_t exponent(acc_t s, bool positive) const {
    return scale(positive) * (s - base);
  }
  // Whether the miner keeps a positive / a negative, given its row's thresholds.
  FL_HOST_DEVICE bool keeps_positive(acc_t s, acc_t max_neg) const { return s - epsilon < max_neg; }
  FL_HOST_DEVICE bool keeps_negative(acc_t s, acc_t min_pos) const { return s + epsilon > min_pos; }
  // dstat/ds, given e = exp(exponent(s, positive) - stat).
  FL_HOST_DEVICE acc_t slope(acc_t e, bool positive) const { return scale(positive) * e; }
};

// ---- kind 1, supcon / info-nce -------------------------------------------------------
template <typename acc_t>
struct SupCon {
  acc_t temperature;

  FL_HOST_DEVICE acc_t logit(acc_t s) const { return s / temperature; }
  // g_lse dstat_0/ds + g_pos dstat_1/ds, given e = exp(logit(s) - stat_0).
  FL_HOST_DEVICE acc_t slope(acc_t e, bool positive, acc_t g_lse, acc_t g_pos) const {
    return (g_lse * e + (positive ? g_pos : acc_t(0))) / temperature;
  }
};

// ---- kind 2, contrastive -------------------------------------------------------------
template <typename acc_t>
struct Contrastive {
  acc_t pos_margin, neg_margin;
  acc_t sigma;  // +1 for distance 1, -1 for distance 0

  FL_HOST_DEVICE acc_t direction(bool positive) const { return positive ? sigma : -sigma; }
  FL_HOST_DEVICE acc_t margin(bool positive) const { return positive ? pos_margin : neg_margin; }
  // relu that keeps NaN, as torch's.
  FL_HOST_DEVICE acc_t loss(acc_t s, bool positive) const {
    const acc_t v = direction(positive) * (s - margin(positive));
    return v < acc_t(0) ? acc_t(0) : v;
  }
  // dl/ds: 0 where l <= 0, tau elsewhere, NaN l included (as torch's relu backward).
  FL_HOST_DEVICE acc_t slope(acc_t s, bool positive) const {
    const acc_t tau = direction(positive);
    return tau * (s - margin(positive)) <= acc_t(0) ? acc_t(0) : tau;
  }
};

template <typename acc_t>
FL_HOST_DEVICE Contrastive<acc_t> make_contrastive(acc_t pos_margin, acc_t neg_margin,
                                                   int64_t distance) {
  return {pos_margin, neg_margin, distance == kEuclidean ? acc_t(1) : acc_t(-1)};
}

// ---- kind 3, orthogonal projection --------------------------------------------------
// kAbsolute: f(s) = |s| for the negatives (the authors' CIFAR / ImageNet variant), else s.
template <typename acc_t, bool kAbsolute>
struct OrthogonalProjection {
  FL_HOST_DEVICE static acc_t negative_term(acc_t s) {
    if constexpr (kAbsolute) return s < acc_t(0) ? -s : s;
    return s;
  }
  // f'(s): sgn(s) (s * 0 keeps 0 at 0 and NaN at NaN) or 1.
  FL_HOST_DEVICE static acc_t negative_slope(acc_t s) {
    if constexpr (kAbsolute) {
      return s > acc_t(0) ? acc_t(1) : s < acc_t(0) ? acc_t(-1) : s * acc_t(0);
    }
    return acc_t(1);
  }
};

}  // namespace pairs
}  // namespace fusedloss
