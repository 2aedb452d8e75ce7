// The frame of a CPU row op over scores [N, C] with class targets [N] and an optional fused
// gradient (fusedloss::margin_cross_entropy, fusedloss::spherical_z_loss): the checks of
// the two inputs, the outputs, and the loop that runs a row kernel over the rows in
// parallel. Each op adds its own checks and its row kernel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "memory.h"

namespace fusedloss {
namespace cpu {

// scores [N, C] of a floating dtype, named `name` in the messages, and target [N] of int64.
inline void check_scores_and_target(const char* op, const char* name, const at::Tensor& scores,
                                    const at::Tensor& target) {
  TORCH_CHECK_VALUE(scores.dim() == 2, op, ": ", name, " must be 2-D [N, C], got ",
                    scores.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), op, ": ", name,
                   " must be a floating tensor, got ", scores.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == scores.size(0), op,
                    ": target must have shape [", scores.size(0), "], got ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
                   target.scalar_type());
}

// The dtype the row statistics and the loss accumulate in: fp64 for fp64 scores, else fp32.
inline at::ScalarType accumulation_type(const at::Tensor& scores) {
  return scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The scores as the row kernels read them: any row stride, unit column stride.
inline at::Tensor unit_column_stride(const at::Tensor& scores) {
  return scores.stride(1) == 1 ? scores : scores.contiguous();
}

// (loss [N] in the accumulation dtype, grad): grad is [N, C] in the scores' dtype when
// compute_grad, advised onto huge pages since the rows write all of it at once, and an
// empty [0] tensor otherwise.
inline std::tuple<at::Tensor, at::Tensor> row_outputs(const at::Tensor& scores,
                                                      bool compute_grad) {
  const int64_t N = scores.size(0), C = scores.size(1);
  at::Tensor loss = at::empty({N}, scores.options().dtype(accumulation_type(scores)));
  if (!compute_grad) return {loss, at::empty({0}, scores.options())};
  at::Tensor grad = at::empty({N, C}, scores.options());
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  return {loss, grad};
}

// row(i) for every row i of [0, N), rows of C elements in parallel, each task taking about
// 32768 elements' worth of whole rows (at least one).
template <typename Row>
inline void for_each_row(int64_t N, int64_t C, const Row& row) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) row(i);
  });
}

}  // namespace cpu
}  // namespace fusedloss
