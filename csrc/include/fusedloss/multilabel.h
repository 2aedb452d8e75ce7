// Row math of the multi-label margin loss (MLCD, "Multi-label Cluster Discrimination", 2024;
// its authors' loss code is not public: this is the loss as formulated in fusedloss's docs),
// shared by the CPU kernels (csrc/cpu/multilabel.cpp) and any device kernel.
//
// A row holds cosines c_j, j in [0, C), and a set P of positive classes (up to 64, given as
// a padded list: entries equal to ignore_index are padding, a class listed twice is one
// positive). With z_p = s (psi(m1 theta_p + m2) - m3), the margin logit of margin.h:
//
//   L = softplus(lse_neg) + softplus(lse_pos),   softplus(x) = log(1 + exp(x)),
//   lse_neg = log sum_{j not in P} exp(s c_j),    lse_pos = log sum_{p in P} exp(-z_p),
//
// that is log(1 + sum_{j not in P} exp(s c_j)) + log(1 + sum_{p in P} exp(-z_p)). The
// negatives' sum runs over the columns that are not positive, skipped by index: it is never
// formed as (all columns) - (positives), which cancels catastrophically when the positives
// dominate the row (s = 64, c_p ~ 1). An empty sum is lse = -inf, softplus(-inf) = 0.
//
// Partials. The columns of a row may be split over shards (ranks): shard r holds
// J_r = [class_start, class_start + C_r) and reduces them to (lse_neg_r, lse_pos_r), the two
// log-sum-exps over its own columns (-inf when empty: the running maximum starts at -inf,
// no exp(0) seed, so that partials combine without cancellation). With one shard these are
// the row's lse_neg and lse_pos; with several, lse = log sum_r exp(lse_r) (max-shifted).
//
// Gradients. With weights a_neg = dL/dlse_neg and a_pos = dL/dlse_pos per row (for the
// single-process loss times the incoming gradient g: a = g sigmoid(lse)), and dz_p/dc_p =
// slope_p from margin::target_logit (the clamped margin derivative, or s when detached):
//
//   dL/dc_j = a_neg s exp(s c_j - lse_neg)         (j not in P)
//   dL/dc_p = -a_pos slope_p exp(-z_p - lse_pos)   (p in P)
//
// where a shard uses its own partials and a_r = dL/dlse_r = a exp(lse_r - lse): the same
// kernel serves the row and the shard. The kernels take coef = (a_neg, lse_neg, a_pos,
// lse_pos) per row. A row whose weights are 0 (no positive anywhere: the row is ignored)
// gets a zero gradient row.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "margin.h"

namespace fusedloss {
namespace multilabel {

constexpr int kMaxPositives = 64;

// The listed entries of targets[0, K) that fall in [class_start, class_start + C), as local
// columns (entry - class_start), sorted, each once, in `out`; returns their number. Padding
// (ignore_index) and other shards' classes are left out. K <= kMaxPositives.
FL_HOST_DEVICE int local_positives(const int64_t* targets, int64_t K, int64_t ignore_index,
                                   int64_t class_start, int64_t C, int64_t* out) {
  int n = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t t = targets[k];
    if (t == ignore_index || t < class_start || t - class_start >= C) continue;
    const int64_t col = t - class_start;
    int at = n;
    while (at > 0 && out[at - 1] > col) --at;
    if (at > 0 && out[at - 1] == col) continue;  // listed before
    for (int q = n; q > at; --q) out[q] = out[q - 1];
    out[at] = col;
    ++n;
  }
  return n;
}

// lse_pos = log sum_p exp(-z_p) over n margin logits (-inf for n = 0), max-shifted.
template <typename acc_t>
FL_HOST_DEVICE acc_t positives_lse(const margin::TargetLogit<acc_t>* z, int n) {
  if (n == 0) return -acc_t(INFINITY);
  acc_t m = -z[0].value;
  for (int q = 1; q < n; ++q) m = -z[q].value > m ? -z[q].value : m;
  acc_t s = acc_t(0);
  for (int q = 0; q < n; ++q) s += margin::exp(-z[q].value - m);
  return m + margin::log(s);
}

// dL/dc_p = -a_pos slope_p exp(-z_p - lse_pos).
template <typename acc_t>
FL_HOST_DEVICE acc_t positive_grad(const margin::TargetLogit<acc_t>& z, acc_t a_pos,
                                   acc_t lse_pos) {
  return -a_pos * z.slope * margin::exp(-z.value - lse_pos);
}

}  // namespace multilabel
}  // namespace fusedloss
