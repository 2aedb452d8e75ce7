// The CPU row kernel of the margin softmax cross-entropy (math:
// csrc/include/fusedloss/margin.h), shared by margin.cpp (logit level) and
// margin_linear.cpp (fused with the classifier matmul), and the input checks both use.
//
// A row is read once for its statistics, in chunks that fit in L1: per chunk the maximum,
// then the sum of exp(z - running max) with the running sum rescaled when the maximum
// grows (online log-sum-exp), and the sum of the cosines for label smoothing. The target
// column is left out of the loops; its margin logit z_y seeds the running maximum. When
// the gradient is wanted, a second sweep over the row (now in L2) writes it. The gradient
// row may be the cosine row itself (in place): every element is read before it is written.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <fusedloss/margin.h>

#include "vec_math.h"

namespace fusedloss {
namespace cpu {

constexpr int64_t kChunk = 2048;  // elements per chunk: 8 KiB of fp32, well inside L1

template <typename acc_t>
struct RowStats {
  acc_t max;        // running maximum of the logits
  acc_t sum_other;  // sum_{j != y} exp(z_j - max)
  acc_t sum_cos;    // sum_{j != y} c_j
};

// Folds cos[begin, end) of one row into the online log-sum-exp state.
template <typename scalar_t, typename acc_t>
void accumulate_range(const scalar_t* row, int64_t begin, int64_t end, acc_t scale,
                      RowStats<acc_t>& st) {
  for (int64_t b = begin; b < end; b += kChunk) {
    const int64_t n = std::min(kChunk, end - b);
    const acc_t chunk_max = scale * max_of<scalar_t, acc_t>(row + b, n);
    if (chunk_max > st.max) {
      st.sum_other *= fast_exp(st.max - chunk_max);
      st.max = chunk_max;
    }
    const ExpSum<acc_t> part = exp_sum<scalar_t, acc_t>(row + b, n, scale, st.max);
    st.sum_other += part.sum_exp;
    st.sum_cos += part.sum_x;
  }
}

// Row i reads cos[i * row_stride + j], target[i], row_m2[i], row_m3[i] and writes loss[i]
// and grad[i * grad_stride + j]. grad may equal cos (with equal strides): in place.
template <typename scalar_t, typename acc_t>
struct RowArgs {
  const scalar_t* cos;
  int64_t row_stride;
  const int64_t* target;
  const acc_t* row_m2;  // nullable
  const acc_t* row_m3;  // nullable
  margin::Params<acc_t> params;
  acc_t smoothing;
  acc_t lse_square_scale;  // lambda of the auxiliary term lambda lse^2 (0: none)
  int64_t ignore_index;
  int64_t num_classes;
  acc_t* loss;
  scalar_t* grad;  // nullable: no gradient wanted
  int64_t grad_stride;
};

// Loss of row i and, when a.grad is set, d loss_i / d cos_ij (zeros for an ignored row).
// Returns false for an ignored row.
template <typename scalar_t, typename acc_t>
bool margin_row(const RowArgs<scalar_t, acc_t>& a, int64_t i) {
  const int64_t C = a.num_classes;
  const int64_t y = a.target[i];
  scalar_t* grad_row = a.grad ? a.grad + i * a.grad_stride : nullptr;
  if (y == a.ignore_index) {
    a.loss[i] = acc_t(0);
    if (grad_row) std::fill(grad_row, grad_row + C, scalar_t(0));
    return false;
  }
  const scalar_t* row = a.cos + i * a.row_stride;
  margin::Params<acc_t> p = a.params;
  if (a.row_m2) p.m2 = a.row_m2[i];
  if (a.row_m3) p.m3 = a.row_m3[i];
  const margin::TargetLogit<acc_t> t = margin::target_logit(static_cast<acc_t>(row[y]), p);

  RowStats<acc_t> st{t.value, acc_t(0), acc_t(0)};
  accumulate_range(row, 0, y, p.scale, st);
  accumulate_range(row, y + 1, C, p.scale, st);
  const margin::RowSums<acc_t> sums = margin::row_sums(st.max, st.sum_other, t.value);
  const acc_t sum_z = p.scale * st.sum_cos + t.value;
  a.loss[i] = margin::row_loss(sums, t.value, sum_z, a.smoothing, C, a.lse_square_scale);
  if (!grad_row) return true;

  // exp(z_j - lse) rather than exp(z_j - M) / S: the quotient of a tiny exponential is a
  // subnormal, and on x86 each subnormal product costs a microcode assist (~100 cycles).
  // fast_exp's floor at exp(-87) keeps every value here normal.
  const acc_t uniform = a.smoothing / acc_t(C);
  const acc_t lse = sums.max + std::log(sums.sum);
  const acc_t z_grad = margin::lse_square_grad(sums, a.lse_square_scale);
  write_softmax_grad(row, grad_row, y, p.scale, lse, uniform, z_grad);
  write_softmax_grad(row + y + 1, grad_row + y + 1, C - y - 1, p.scale, lse, uniform, z_grad);
  grad_row[y] =
      static_cast<scalar_t>(margin::grad_target(t, sums, a.smoothing, uniform, z_grad));
  return true;
}

// Every target is ignore_index or in [0, C). `op` names the op in the message.
inline void check_targets(const at::Tensor& target, int64_t C, int64_t ignore_index,
                          const char* op) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    TORCH_CHECK_VALUE(t[i] == ignore_index || (t[i] >= 0 && t[i] < C), op, ": target[", i,
                      "] = ", t[i], " is outside [0, ", C, ") and is not ignore_index (",
                      ignore_index, ")");
  }
}

// An optional per-row tensor (row_m2, row_m3, row_grad): shape [N], the accumulation dtype,
// on the CPU.
inline void check_row_tensor(const std::optional<at::Tensor>& m, const char* name, int64_t N,
                             at::ScalarType acc_type, const char* op) {
  if (!m.has_value()) return;
  TORCH_CHECK_VALUE(m->dim() == 1 && m->size(0) == N, op, ": ", name, " must have shape [", N,
                    "], got ", m->sizes());
  TORCH_CHECK_TYPE(m->scalar_type() == acc_type, op, ": ", name, " must be ", acc_type, ", got ",
                   m->scalar_type());
  TORCH_CHECK(m->device().is_cpu(), op, ": ", name, " must be on the CPU");
}

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& m) {
  return m.has_value() ? std::optional<at::Tensor>(m->contiguous()) : m;
}

template <typename acc_t>
const acc_t* optional_data(const std::optional<at::Tensor>& m) {
  return m.has_value() ? m->data_ptr<acc_t>() : nullptr;
}

}  // namespace cpu
}  // namespace fusedloss
