// CUDA kernel of fusedloss::margin_cross_entropy: per-row loss and, optionally, the
// gradient with respect to the cosines. The math of a row (target logit, loss, gradient)
// is derived in csrc/include/fusedloss/margin.h and called from there; this file only
// lays it out on the GPU. No torch headers: plain `nvcc -c` compiles this file.
//
// Design: one thread block per row (grid-stride over rows), 32..1024 threads (512 for
// fp64), chosen so that each thread owns at least two 16-byte vectors of the row.
//
//   pass 1  every thread streams its vectors of the row (16-byte loads, four in flight
//           per thread) and keeps an online log-sum-exp (running max M, rescaled sum S_o
//           of exp(z_j - M) over j != y) and the sum of the logits. The target column y
//           is skipped; thread 0 starts from the margin-adjusted target logit
//           (M = z_y, S_o = 0), which margin::row_sums adds to S at the end. Warp
//           shuffles, then shared memory across warps, combine the threads.
//   pass 2  (only when the gradient is asked for) every thread writes
//           d loss / d cos for the same columns it read in pass 1.
//
// Where pass 2 gets the row from (RowMode):
//   kGradCachedRow  pass 1 also copies the row into dynamic shared memory and pass 2
//                   reads it back from there, so HBM sees one read and one write per
//                   element. Used whenever the row fits next to the scratch (227 KB of
//                   opt-in shared memory on H100/H200: up to ~116k bf16/fp16, ~58k fp32
//                   or ~29k fp64 columns). At bf16 C = 100,000 that is 200 KB: one
//                   1024-thread block per SM, which with four 16-byte loads in flight
//                   per thread (64 KB per SM) still covers HBM latency. Re-reading
//                   through L2 instead would need ~132 rows x 200 KB = 26 MB resident at
//                   once, a large share of the 50 MB L2, and would fall back to HBM
//                   under pressure from the gradient writes.
//   kGradRereadRow  rows too long for shared memory: pass 2 re-reads the row, hoping to
//                   hit L2 (pass-1 loads use the caching path; pass-2 loads and the
//                   gradient stores are marked evict-first so they do not push the rest of
//                   the row out).
//   kLossOnly       no pass 2; loads are evict-first.
// Each thread reads back in pass 2 exactly the cache slots it wrote in pass 1, so the
// cache needs no barrier inside a row; a barrier at the end of a row keeps the next
// row's pass 1 from overwriting slots that a slower thread is still reading.
//
// Vectorisation with an arbitrary row stride: a row is split into a scalar head (up to
// the first 16-byte boundary of its address), whole vectors, and a scalar tail. In
// gradient modes the input row and the contiguous gradient row must share that
// boundary (true for every row of a contiguous `cos`, whatever C); when they do not
// (a view whose row stride differs from C modulo the vector width), the row is
// processed with scalar accesses only. Indices and offsets are 64-bit throughout. These
// building blocks (vectors, row split, row cache sizing) live in rows.cuh.
//
// Numerics: fp32 accumulation (fp64 for fp64 input), no fast-math; loss and gradient
// come from margin.h (row_sums, row_loss, grad_other, grad_target), which never rounds
// lse = M + log S for the cross-entropy (only the optional auxiliary term lambda lse^2
// uses it, through the factor g = 2 lambda lse that thread 0 publishes with M and 1 / S).
// Both passes evaluate exp(z - M) as 2^((z - M) log2 e) (exp_shifted): exactly 1 at the
// maximum and within ~1e-6 relative elsewhere. Exactly 1 needs z - M = 0 for the z that
// gave M, so z = s c is rounded once (scaled_logit, mul.rn) and z - M subtracted with
// sub.rn: nvcc contracts a plain s * c - M into fma(s, c, -M), whose result is the
// rounding error of s c rather than 0 (the CPU build uses -ffp-contract=off for the same
// reason). NaN anywhere in a row reaches S (fmax may
// drop it from the running max, never from the sum), so the loss of that row is NaN. A
// target outside [0, C) that is not ignore_index gives a NaN loss and a NaN gradient row
// and is never used as an index.
#include "launchers.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "fusedloss/margin.h"
#include "rows.cuh"

namespace fusedloss {
namespace cuda {
namespace {

using namespace rows;  // NOLINT: the row building blocks shared with the other row kernels

__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }

// z = s c rounded to acc_t, the same bits wherever it is formed: the _rn intrinsics are never
// contracted with a neighbouring add or subtract.
__device__ __forceinline__ float scaled_logit(float scale, float c) { return __fmul_rn(scale, c); }
__device__ __forceinline__ double scaled_logit(double scale, double c) {
  return __dmul_rn(scale, c);
}

// exp(x - shift) as 2^((x - shift) log2 e): exactly 1 at x = shift (x - shift is a sub.rn of
// two rounded values, so 0 there). In fp32 the hardware 2^x (relative error ~2^-22) without
// exp2f's subnormal fix-up: a term below 2^-126 is negligible next to S >= 1, which holds the
// maximum's own term, 1.
__device__ __forceinline__ float exp_shifted(float x, float shift) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(__fsub_rn(x, shift) * 1.4426950408889634f));
  return y;
}
__device__ __forceinline__ double exp_shifted(double x, double shift) {
  return exp2(__dsub_rn(x, shift) * 1.4426950408889634);
}

template <typename acc_t> __device__ __forceinline__ acc_t negative_infinity() {
  return -static_cast<acc_t>(INFINITY);
}

// ---------------------------------------------------------------------------------------
// Online log-sum-exp

template <typename acc_t>
struct OnlineLse {
  acc_t max;        // M: running max of the logits seen (NaN-dropping; NaN reaches S_o)
  acc_t sum_other;  // S_o: sum of exp(z_j - M) over the columns seen, target excluded
  acc_t sum_z;      // sum of the logits, target included, for label smoothing
};

template <typename acc_t>
__device__ __forceinline__ OnlineLse<acc_t> empty_lse() {
  return {negative_infinity<acc_t>(), acc_t(0), acc_t(0)};
}

// Shift that keeps exp(z - shift) finite for every z <= new_max; 0 when all seen are -inf.
template <typename acc_t>
__device__ __forceinline__ acc_t safe_shift(acc_t new_max) {
  return new_max == negative_infinity<acc_t>() ? acc_t(0) : new_max;
}

template <typename acc_t>
__device__ __forceinline__ OnlineLse<acc_t> combine(const OnlineLse<acc_t>& a,
                                                    const OnlineLse<acc_t>& b) {
  const acc_t new_max = max_of(a.max, b.max);
  const acc_t shift = safe_shift(new_max);
  return {new_max,
          a.sum_other * exp_shifted(a.max, shift) + b.sum_other * exp_shifted(b.max, shift),
          a.sum_z + b.sum_z};
}

// Adds the logits scale * c[e]; with kSkipOne, all but c[skipped] (the target column).
template <bool kSkipOne, int N, typename acc_t, typename scalar_t>
__device__ __forceinline__ void add_logits(OnlineLse<acc_t>& state, const scalar_t (&c)[N],
                                           acc_t scale, int64_t skipped) {
  acc_t z[N];
  acc_t block_max = negative_infinity<acc_t>();
#pragma unroll
  for (int e = 0; e < N; ++e) {
    z[e] = scaled_logit(scale, to_acc(c[e]));
    if (kSkipOne && e == skipped) z[e] = negative_infinity<acc_t>();
    else state.sum_z += z[e];
    block_max = max_of(block_max, z[e]);
  }
  const acc_t new_max = max_of(state.max, block_max);
  const acc_t shift = safe_shift(new_max);
  acc_t sum = state.sum_other * exp_shifted(state.max, shift);
#pragma unroll
  for (int e = 0; e < N; ++e) sum += exp_shifted(z[e], shift);
  state.max = new_max;
  state.sum_other = sum;
}

// ---------------------------------------------------------------------------------------
// Block-wide reduction

template <typename acc_t>
__device__ __forceinline__ OnlineLse<acc_t> warp_combine(OnlineLse<acc_t> s) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    OnlineLse<acc_t> other;
    other.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
    other.sum_other = __shfl_xor_sync(0xffffffffu, s.sum_other, offset);
    other.sum_z = __shfl_xor_sync(0xffffffffu, s.sum_z, offset);
    s = combine(s, other);
  }
  return s;
}

// What every thread needs from the reduction for pass 2.
template <typename acc_t>
struct RowResult {
  acc_t max;          // M
  acc_t inv_sum;      // 1 / S
  acc_t z_grad;       // g = 2 lambda lse of the auxiliary term (0: none)
  acc_t target_grad;  // d loss / d cos_y
};

template <typename acc_t>
struct BlockScratch {
  OnlineLse<acc_t> per_warp[kMaxWarps];
  RowResult<acc_t> result;
};

// Per-row constants.
template <typename acc_t>
struct RowConstants {
  margin::Params<acc_t> params;
  acc_t smoothing;
  acc_t uniform;  // smoothing / C
  acc_t lse_square_scale;
  int64_t cols;
};

// Combines the states of all threads. Thread 0, which holds the target logit, finishes
// the row: it writes the loss and publishes M, 1 / S and d loss / d cos_y to every thread.
// The result slot is written only between the two barriers, so no thread can still be
// reading the previous row's value.
template <typename acc_t>
__device__ RowResult<acc_t> finish_row(OnlineLse<acc_t> state,
                                       const margin::TargetLogit<acc_t>& target,
                                       const RowConstants<acc_t>& row, acc_t* loss,
                                       BlockScratch<acc_t>& scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  state = warp_combine(state);
  if (lane == 0) scratch.per_warp[warp] = state;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x / kWarpSize;
    state = warp_combine(lane < num_warps ? scratch.per_warp[lane] : empty_lse<acc_t>());
    if (lane == 0) {
      const margin::RowSums<acc_t> sums =
          margin::row_sums(state.max, state.sum_other, target.value);
      *loss = margin::row_loss(sums, target.value, state.sum_z, row.smoothing, row.cols,
                               row.lse_square_scale);
      const acc_t z_grad = margin::lse_square_grad(sums, row.lse_square_scale);
      scratch.result = {sums.max, acc_t(1) / sums.sum, z_grad,
                        margin::grad_target(target, sums, row.smoothing, row.uniform, z_grad)};
    }
  }
  __syncthreads();
  return scratch.result;
}

// ---------------------------------------------------------------------------------------
// The kernel

enum class RowMode { kLossOnly, kGradCachedRow, kGradRereadRow };

template <typename scalar_t>
struct KernelArgs {
  using acc_t = acc_type<scalar_t>;
  RowLoss<scalar_t> matrix;  // input: the cosines
  const acc_t* row_m2;
  const acc_t* row_m3;
  margin::Params<acc_t> params;  // m2 and m3 replaced per row when row_m2 / row_m3 are set
  acc_t smoothing;
  acc_t lse_square_scale;
};

template <typename scalar_t>
__device__ RowConstants<acc_type<scalar_t>> row_constants(const KernelArgs<scalar_t>& args,
                                                          int64_t row) {
  using acc_t = acc_type<scalar_t>;
  const int64_t cols = args.matrix.cols;
  RowConstants<acc_t> out{args.params, args.smoothing, args.smoothing / static_cast<acc_t>(cols),
                          args.lse_square_scale, cols};
  if (args.row_m2 != nullptr) out.params.m2 = args.row_m2[row];
  if (args.row_m3 != nullptr) out.params.m3 = args.row_m3[row];
  return out;
}

// Pass 1 over this thread's columns of a row, copying them into `cache` when kMode asks.
template <RowMode kMode, typename scalar_t, typename acc_t>
__device__ void scan_row(const scalar_t* in, scalar_t* cache, const RowSplit& split,
                         int64_t cols, int64_t target, acc_t scale,
                         OnlineLse<acc_t>& state) {
  auto load = [&](int64_t col) {
    return kMode == RowMode::kGradRereadRow ? load_keep(in + col) : load_last_use(in + col);
  };
  auto consume = [&](int64_t col, uint4 word) {
    if (kMode == RowMode::kGradCachedRow) *word_at(cache + col) = word;
    const Vec<scalar_t> vec = elements<scalar_t>(word);
    if (vector_holds<scalar_t>(col, target)) {
      add_logits<true>(state, vec.v, scale, target - col);
    } else {
      add_logits<false>(state, vec.v, scale, 0);
    }
  };
  for_each_vector<scalar_t>(split, load, consume);
  for_each_scalar_column(split, cols, [&](int64_t col) {
    const scalar_t c[1] = {in[col]};
    if (kMode == RowMode::kGradCachedRow) cache[col] = c[0];
    if (col != target) add_logits<false>(state, c, scale, 0);
  });
}

// d loss / d cos for the columns [col, col + N); the target column gets target_grad.
template <bool kHoldsTarget, int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void gradients(const scalar_t (&c)[N], scalar_t (&g)[N],
                                          int64_t col, int64_t target,
                                          const RowResult<acc_t>& result, acc_t scale,
                                          acc_t uniform) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const acc_t exp_z = exp_shifted(scaled_logit(scale, to_acc(c[e])), result.max);
    const acc_t other = margin::grad_other(exp_z, result.inv_sum, scale, uniform, result.z_grad);
    g[e] = from_acc<scalar_t>(kHoldsTarget && col + e == target ? result.target_grad : other);
  }
}

// Pass 2: the gradient of this thread's columns, read from `cache` or again from `in`.
template <RowMode kMode, typename scalar_t, typename acc_t>
__device__ void write_gradient_row(const scalar_t* in, const scalar_t* cache, scalar_t* grad,
                                   const RowSplit& split, int64_t cols, int64_t target,
                                   const RowResult<acc_t>& result, acc_t scale,
                                   acc_t uniform) {
  const scalar_t* source = kMode == RowMode::kGradCachedRow ? cache : in;
  auto load = [&](int64_t col) {
    return kMode == RowMode::kGradCachedRow ? *word_at(cache + col) : load_last_use(in + col);
  };
  auto consume = [&](int64_t col, uint4 word) {
    const Vec<scalar_t> vec = elements<scalar_t>(word);
    Vec<scalar_t> out;
    if (vector_holds<scalar_t>(col, target)) {
      gradients<true>(vec.v, out.v, col, target, result, scale, uniform);
    } else {
      gradients<false>(vec.v, out.v, col, target, result, scale, uniform);
    }
    store_streaming(grad + col, raw_bits(out));
  };
  for_each_vector<scalar_t>(split, load, consume);
  for_each_scalar_column(split, cols, [&](int64_t col) {
    const scalar_t c[1] = {source[col]};
    scalar_t g[1];
    gradients<true>(c, g, col, target, result, scale, uniform);
    grad[col] = g[0];
  });
}

extern __shared__ __align__(kVectorBytes) unsigned char row_cache_bytes[];

template <typename scalar_t, RowMode kMode>
__global__ void __launch_bounds__(max_threads<scalar_t>(), 1)
    margin_cross_entropy_kernel(const KernelArgs<scalar_t> args) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kGrad = kMode != RowMode::kLossOnly;
  constexpr bool kCached = kMode == RowMode::kGradCachedRow;
  const int64_t cols = args.matrix.cols;
  __shared__ BlockScratch<acc_t> scratch;

  for_each_row<kGrad, kCached>(args.matrix, row_cache_bytes, [&](const Row<scalar_t>& row) {
    const RowConstants<acc_t> constants = row_constants(args, row.index);
    margin::TargetLogit<acc_t> z_target{};
    OnlineLse<acc_t> state = empty_lse<acc_t>();
    if (threadIdx.x == 0) {
      z_target = margin::target_logit(to_acc(row.in[row.target]), constants.params);
      state = {z_target.value, acc_t(0), z_target.value};
    }
    scan_row<kMode>(row.in, row.cache, row.split, cols, row.target, constants.params.scale,
                    state);
    const RowResult<acc_t> result =
        finish_row(state, z_target, constants, args.matrix.loss + row.index, scratch);
    if (kGrad) {
      write_gradient_row<kMode>(row.in, row.cache, row.grad, row.split, cols, row.target,
                                result, constants.params.scale, constants.uniform);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Host side

template <typename scalar_t>
KernelArgs<scalar_t> kernel_args(const MarginArgs& a) {
  using acc_t = acc_type<scalar_t>;
  KernelArgs<scalar_t> k;
  k.matrix = typed_row_loss<scalar_t>(a.matrix);
  k.row_m2 = static_cast<const acc_t*>(a.row_m2);
  k.row_m3 = static_cast<const acc_t*>(a.row_m3);
  k.params = {static_cast<acc_t>(a.scale), static_cast<acc_t>(a.m1), static_cast<acc_t>(a.m2),
              static_cast<acc_t>(a.m3),    a.use_angle,               a.detach_margin};
  k.smoothing = static_cast<acc_t>(a.label_smoothing);
  k.lse_square_scale = static_cast<acc_t>(a.lse_square_scale);
  return k;
}

template <typename scalar_t>
cudaError_t launch_typed(const MarginArgs& a, cudaStream_t stream) {
  if (a.matrix.rows == 0) return cudaSuccess;
  const KernelArgs<scalar_t> args = kernel_args<scalar_t>(a);
  const RowGrid grid = row_grid<scalar_t>(a.matrix);
  if (a.matrix.grad == nullptr) {
    margin_cross_entropy_kernel<scalar_t, RowMode::kLossOnly>
        <<<grid.blocks, grid.threads, 0, stream>>>(args);
    return cudaGetLastError();
  }
  return launch_cached_or_reread<scalar_t>(
      margin_cross_entropy_kernel<scalar_t, RowMode::kGradCachedRow>,
      margin_cross_entropy_kernel<scalar_t, RowMode::kGradRereadRow>, args, a.matrix.cols, grid,
      stream);
}

}  // namespace

cudaError_t launch_margin_cross_entropy(const MarginArgs& args, cudaStream_t stream) {
  return rows::dispatch_scalar(args.matrix.kind, [&](auto tag) {
    return launch_typed<decltype(tag)>(args, stream);
  });
}

}  // namespace cuda
}  // namespace fusedloss
