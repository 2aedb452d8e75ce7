// CPU kernel of fusedloss::margin_cross_entropy (math: csrc/include/fusedloss/margin.h).
//
// Rows run in parallel (at::parallel_for). Each row is read once for its statistics, in
// chunks that fit in L1: per chunk the maximum, then the sum of exp(z - running max)
// with the running sum rescaled when the maximum grows (online log-sum-exp), and the sum
// of the cosines for label smoothing. The target column is left out of the loops; its
// margin logit z_y seeds the running maximum. When the gradient is wanted, a
// second sweep over the row (now in L2) writes it, so backward only has to scale it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <fusedloss/margin.h>

#include "memory.h"
#include "vec_math.h"

namespace fusedloss {
namespace cpu {
namespace {

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

template <typename scalar_t, typename acc_t>
struct RowArgs {
  const scalar_t* cos;
  int64_t row_stride;
  const int64_t* target;
  const acc_t* row_m2;  // nullable
  const acc_t* row_m3;  // nullable
  margin::Params<acc_t> params;
  acc_t smoothing;
  int64_t ignore_index;
  int64_t num_classes;
  acc_t* loss;
  scalar_t* grad;  // nullable: no gradient wanted
};

template <typename scalar_t, typename acc_t>
void margin_row(const RowArgs<scalar_t, acc_t>& a, int64_t i) {
  const int64_t C = a.num_classes;
  const int64_t y = a.target[i];
  scalar_t* grad_row = a.grad ? a.grad + i * C : nullptr;
  if (y == a.ignore_index) {
    a.loss[i] = acc_t(0);
    if (grad_row) std::fill(grad_row, grad_row + C, scalar_t(0));
    return;
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
  a.loss[i] = margin::row_loss(sums, t.value, sum_z, a.smoothing, C);
  if (!grad_row) return;

  // exp(z_j - lse) rather than exp(z_j - M) / S: the quotient of a tiny exponential is a
  // subnormal, and on x86 each subnormal product costs a microcode assist (~100 cycles).
  // fast_exp's floor at exp(-87) keeps every value here normal.
  const acc_t uniform = a.smoothing / acc_t(C);
  const acc_t lse = sums.max + std::log(sums.sum);
  write_softmax_grad(row, grad_row, y, p.scale, lse, uniform);
  write_softmax_grad(row + y + 1, grad_row + y + 1, C - y - 1, p.scale, lse, uniform);
  grad_row[y] = static_cast<scalar_t>(margin::grad_target(t, sums, a.smoothing, uniform));
}

void check_targets(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    TORCH_CHECK_VALUE(t[i] == ignore_index || (t[i] >= 0 && t[i] < C),
                      "margin_cross_entropy: target[", i, "] = ", t[i], " is outside [0, ", C,
                      ") and is not ignore_index (", ignore_index, ")");
  }
}

void check_row_margin(const std::optional<at::Tensor>& m, const char* name, int64_t N,
                      at::ScalarType acc_type) {
  if (!m.has_value()) return;
  TORCH_CHECK(m->dim() == 1 && m->size(0) == N, "margin_cross_entropy: ", name,
              " must have shape [", N, "], got ", m->sizes());
  TORCH_CHECK(m->scalar_type() == acc_type, "margin_cross_entropy: ", name, " must be ",
              acc_type, ", got ", m->scalar_type());
  TORCH_CHECK(m->device().is_cpu(), "margin_cross_entropy: ", name, " must be on the CPU");
}

template <typename acc_t>
const acc_t* optional_data(const std::optional<at::Tensor>& m) {
  return m.has_value() ? m->data_ptr<acc_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy(
    const at::Tensor& cos_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& row_m2_in, const std::optional<at::Tensor>& row_m3_in,
    double scale, double m1, double m2, double m3, bool detach_margin, double label_smoothing,
    int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK(cos_in.dim() == 2, "margin_cross_entropy: cos must be 2-D [N, C], got ",
              cos_in.sizes());
  TORCH_CHECK(at::isFloatingType(cos_in.scalar_type()),
              "margin_cross_entropy: cos must be a floating tensor, got ", cos_in.scalar_type());
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == cos_in.size(0),
              "margin_cross_entropy: target must have shape [", cos_in.size(0), "], got ",
              target_in.sizes());
  TORCH_CHECK(target_in.scalar_type() == at::kLong,
              "margin_cross_entropy: target must be int64, got ", target_in.scalar_type());
  const int64_t N = cos_in.size(0), C = cos_in.size(1);
  const auto acc_type = cos_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_row_margin(row_m2_in, "row_m2", N, acc_type);
  check_row_margin(row_m3_in, "row_m3", N, acc_type);

  const at::Tensor cos = cos_in.stride(1) == 1 ? cos_in : cos_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  check_targets(target, C, ignore_index);
  const auto row_m2 = row_m2_in.has_value() ? std::optional(row_m2_in->contiguous()) : row_m2_in;
  const auto row_m3 = row_m3_in.has_value() ? std::optional(row_m3_in->contiguous()) : row_m3_in;

  at::Tensor loss = at::empty({N}, cos.options().dtype(acc_type));
  at::Tensor grad = compute_grad ? at::empty({N, C}, cos.options()) : at::empty({0}, cos.options());
  if (compute_grad) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  const bool use_angle = !(m1 == 1.0 && m2 == 0.0 && !row_m2.has_value());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), "margin_cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RowArgs<scalar_t, acc_t> args{
        cos.data_ptr<scalar_t>(), cos.stride(0), target.data_ptr<int64_t>(),
        optional_data<acc_t>(row_m2), optional_data<acc_t>(row_m3),
        margin::Params<acc_t>{acc_t(scale), acc_t(m1), acc_t(m2), acc_t(m3), use_angle, detach_margin},
        acc_t(label_smoothing), ignore_index, C, loss.data_ptr<acc_t>(),
        compute_grad ? grad.data_ptr<scalar_t>() : nullptr};
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) margin_row(args, i);
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("margin_cross_entropy", &margin_cross_entropy);
}

}  // namespace cpu
}  // namespace fusedloss
