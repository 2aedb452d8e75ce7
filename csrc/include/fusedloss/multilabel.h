// Row math of the multi-label margin loss (MLCD, "Multi-label Cluster Discrimination", 2024;
// its authors' loss code is not public: this is the loss as formulated in fusedloss's docs),
// shared by the CPU kernel (csrc/cpu/multilabel.cpp) and any device kernel.
//
// A row holds cosines c_j, j in [0, C), and a set P of positive classes (up to 64, given as
// a padded list: entries equal to ignore_index are padding, a class listed twice is one
// positive). With z_p = s (psi(m1 theta_p + m2) - m3), the margin logit of margin.h:
//
//   L = L_neg + L_pos,
//   L_neg = log(1 + sum_{j not in P} exp(s c_j)),
//   L_pos = log(1 + sum_{p in P} exp(-z_p)).
//
// Both are log-sum-exps with an extra term exp(0) = 1, so each is kept as (M, S) with
// M = max(0, max of its exponents) and S = exp(-M) + sum exp(x - M): the running state starts
// at (0, 1), never at -inf, and L = M + log S. The negatives' sum runs over the columns that
// are not positive, skipped by index: it is never formed as (all columns) - (positives),
// which cancels catastrophically when the positives dominate the row (s = 64, c_p ~ 1).
//
// Gradients (dz_p/dc_p = slope_p from margin::target_logit, the clamped margin derivative
// or s when detached):
//
//   dL/dc_j = s exp(s c_j - L_neg)               (j not in P)
//   dL/dc_p = -slope_p exp(-z_p - L_pos)         (p in P)
//
// A row without positives (all padding) has no loss and a zero gradient, and is left out
// of the mean, as an ignored row of cross-entropy.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "margin.h"

namespace fusedloss {
namespace multilabel {

constexpr int kMaxPositives = 64;

// Sorts the listed entries of targets[0, K) (padding = ignore_index left out) into
// `out` without duplicates; returns their number. K <= kMaxPositives.
FL_HOST_DEVICE int sorted_positives(const int64_t* targets, int64_t K,
                                           int64_t ignore_index, int64_t* out) {
  int n = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t t = targets[k];
    if (t == ignore_index) continue;
    int at = n;
    while (at > 0 && out[at - 1] > t) --at;
    if (at > 0 && out[at - 1] == t) continue;  // listed before
    for (int q = n; q > at; --q) out[q] = out[q - 1];
    out[at] = t;
    ++n;
  }
  return n;
}

// The positives' term from their margin logits: L_pos = M + log S with
// M = max(0, max_p -z_p), S = exp(-M) + sum_p exp(-z_p - M).
template <typename acc_t>
FL_HOST_DEVICE acc_t positives_loss(const margin::TargetLogit<acc_t>* z, int n) {
  acc_t m = acc_t(0);
  for (int q = 0; q < n; ++q) m = -z[q].value > m ? -z[q].value : m;
  acc_t s = margin::exp(-m);
  for (int q = 0; q < n; ++q) s += margin::exp(-z[q].value - m);
  return m + margin::log(s);
}

// dL/dc_p = -slope_p exp(-z_p - L_pos).
template <typename acc_t>
FL_HOST_DEVICE acc_t positive_grad(const margin::TargetLogit<acc_t>& z, acc_t loss_pos) {
  return -z.slope * margin::exp(-z.value - loss_pos);
}

}  // namespace multilabel
}  // namespace fusedloss
