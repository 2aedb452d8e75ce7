// Vectorised row loops for the CPU kernels.
//
// `#pragma omp simd reduction` (compiled with -fopenmp-simd: no OpenMP runtime) lets the
// compiler split a sum or a max over vector lanes, which it may not do for floats on its
// own; the order of the additions is then fixed per instruction set, so results are
// deterministic run to run. FL_CPU_CLONES compiles a function once per instruction set and
// picks the best at load time, so the wheel runs on any x86-64 and still uses AVX-512
// where present.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <fusedloss/margin.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__)
#define FL_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FL_CPU_CLONES
#endif

namespace fusedloss {
namespace cpu {

// exp(x) for float, vectorisable: x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2
// (ln2 split in a high part exact in float and a low correction), exp(r) by a degree-6
// minimax polynomial (about 1 ulp), 2^n assembled in the exponent bits. n is rounded by
// adding and subtracting 1.5 * 2^23, which needs no call to floorf and so vectorises on
// every instruction set. Inputs below -86 return exp(-86) (~4e-38, negligible against a
// sum that is at least 1; the floor keeps 2^n and the product normal); NaN stays NaN.
inline float fast_exp(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  x = x < -86.0f ? -86.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

inline double fast_exp(double x) { return std::exp(x); }

// max_j x_j over n elements (-inf when n = 0). NaN may be dropped here; callers rely on
// the exponential sums below to propagate it.
template <typename scalar_t, typename acc_t>
FL_CPU_CLONES acc_t max_of(const scalar_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    m = v > m ? v : m;
  }
  return m;
}

template <typename acc_t>
struct ExpSum {
  acc_t sum_exp;  // sum_j exp(scale * x_j - shift)
  acc_t sum_x;    // sum_j x_j
};

template <typename scalar_t, typename acc_t>
FL_CPU_CLONES ExpSum<acc_t> exp_sum(const scalar_t* x, int64_t n, acc_t scale, acc_t shift) {
  acc_t sum_exp = 0, sum_x = 0;
#pragma omp simd reduction(+ : sum_exp, sum_x)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    sum_exp += fast_exp(scale * v - shift);
    sum_x += v;
  }
  return {sum_exp, sum_x};
}

// Softmax entries below this are written as 0. Kept, they would be (or, once backward
// scales them by 1/N, become) subnormal, and every subnormal product costs x86 a microcode
// assist of ~100 cycles. The flush changes a gradient entry by less than 1e-31 * scale, far
// below the rounding of any entry that matters.
template <typename acc_t>
constexpr acc_t kFlushBelow =
    std::numeric_limits<acc_t>::min() / std::numeric_limits<acc_t>::epsilon();

// The softmax entry exp(scale * x - lse) of a logit scale * x, flushed to 0 below kFlushBelow.
template <typename acc_t>
inline acc_t flushed_softmax(acc_t x, acc_t scale, acc_t lse) {
  const acc_t p = fast_exp(scale * x - lse);
  return p < kFlushBelow<acc_t> ? acc_t(0) : p;
}

// grad_j = grad_other(flushed_softmax(x_j), 1, ..., z_grad) of fusedloss/margin.h
template <typename scalar_t, typename acc_t>
FL_CPU_CLONES void write_softmax_grad(const scalar_t* x, scalar_t* grad, int64_t n, acc_t scale,
                                      acc_t lse, acc_t uniform, acc_t z_grad) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t p = flushed_softmax(static_cast<acc_t>(x[i]), scale, lse);
    grad[i] = static_cast<scalar_t>(margin::grad_other(p, acc_t(1), scale, uniform, z_grad));
  }
}

}  // namespace cpu
}  // namespace fusedloss
