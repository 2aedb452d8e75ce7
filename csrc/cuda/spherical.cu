// CUDA kernel of fusedloss::spherical_z_loss: per-row loss and, optionally, the gradient
// with respect to the logits. The math of a row (floored sigma, loss, the coefficients of
// the gradient alpha + beta (o_k - m) + gamma [k = c], m the pass-1 mean) is derived in
// csrc/include/fusedloss/spherical.h and called from there; this file only lays it out on
// the GPU. No torch headers: plain `nvcc -c` compiles this file.
//
// Design: one thread block per row (grid-stride over rows), 32..1024 threads (512 for
// fp64), chosen so that each thread owns at least two 16-byte vectors of the row. The
// row access (16-byte vectors with a scalar head and tail for any row stride, the row
// cache, block sums) comes from rows.cuh, shared with margin.cu.
//
//   pass 1  every thread sums its elements of the row; a block sum gives the mean m.
//   pass 2  every thread sums d = o_k - m and d^2 over the same elements; a block sum
//           gives D = sum d and Q = sum d^2. The variance is taken about the mean, never
//           as E[o^2] - m^2, and with the correction of the two-pass algorithm (Chan,
//           Golub and LeVeque): mu = m + D / C, sum of squared deviations about mu
//           = Q - D^2 / C (clamped at 0, NaN kept). D is the rounding error of the
//           first pass, so the correction keeps mu accurate to the spread even when the
//           mean is many orders of magnitude larger (z_c takes o_c - mu as
//           (o_c - m) - D / C, never from the rounded mu). Every thread then computes the
//           same sigma (spherical::floored_sigma), z_c, and, for the gradient, the
//           coefficients (spherical::z_loss_grad) from the same block sums; thread 0
//           writes the loss (spherical::z_loss).
//   pass 3  (only when the gradient is asked for) every thread writes
//           alpha + beta (o_k - m) + gamma [k = c] for the same elements (o_k - m, not
//           o_k: the form alpha' + beta o_k cancels when the mean is large, spherical.h).
//
// Where passes 2 and 3 get the row from: when the row fits in the opt-in shared memory
// (227 KB on H100/H200: ~116k bf16/fp16, ~58k fp32, ~29k fp64 columns), pass 1 copies
// it there and HBM sees one read per element (plus one write of the gradient). Longer
// rows are read again, hoping for L2: loads that a later pass repeats use the caching
// path, the last read of a row and the gradient stores are evict-first. Each thread reads
// back exactly the cache slots it wrote, so the cache needs no barrier inside a row; a
// barrier at the end of a row keeps the next row (whose head, hence slot ownership, may
// differ) from overwriting slots that a slower thread is still reading.
//
// Ignored rows (target == ignore_index) get loss 0 and a zero gradient row without
// reading the row; a target outside [0, C) gets a NaN loss and a NaN gradient row and is
// never used as an index. NaN or inf anywhere in a row reaches the sums, so the loss is
// NaN. Accumulation in fp32 (fp64 for fp64 input), no fast-math; indices 64-bit.
#include "launchers.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "fusedloss/spherical.h"
#include "rows.cuh"

namespace fusedloss {
namespace cuda {
namespace {

using namespace rows;  // NOLINT: the row building blocks shared with the other row kernels

template <typename scalar_t>
struct KernelArgs {
  using acc_t = acc_type<scalar_t>;
  RowLoss<scalar_t> matrix;  // input: the logits
  acc_t a;
  acc_t b;
};

// One pass over this thread's part of a row: vector_fn(first_column, Vec) for each of its
// 16-byte vectors and scalar_fn(column, element) for each of its head and tail columns.
// The row comes from the shared-memory cache (kFromCache) or from global memory, with
// caching loads when a later pass reads it again (kKeep) and evict-first loads otherwise;
// kToCache copies it into the cache on the way.
template <bool kFromCache, bool kToCache, bool kKeep, typename scalar_t, typename VectorFn,
          typename ScalarFn>
__device__ __forceinline__ void read_row(const scalar_t* in, scalar_t* cache,
                                         const RowSplit& split, int64_t cols,
                                         VectorFn vector_fn, ScalarFn scalar_fn) {
  auto load = [&](int64_t col) -> uint4 {
    if constexpr (kFromCache) {
      return *word_at(cache + col);
    } else if constexpr (kKeep) {
      return load_keep(in + col);
    } else {
      return load_last_use(in + col);
    }
  };
  auto consume = [&](int64_t col, uint4 word) {
    if constexpr (kToCache) *word_at(cache + col) = word;
    vector_fn(col, elements<scalar_t>(word));
  };
  for_each_vector<scalar_t>(split, load, consume);
  const scalar_t* source = kFromCache ? cache : in;
  for_each_scalar_column(split, cols, [&](int64_t col) {
    const scalar_t x = source[col];
    if constexpr (kToCache) cache[col] = x;
    scalar_fn(col, x);
  });
}

extern __shared__ __align__(kVectorBytes) unsigned char row_cache_bytes[];

template <typename scalar_t, bool kGrad, bool kCached>
__global__ void __launch_bounds__(max_threads<scalar_t>(), 1)
    spherical_z_loss_kernel(const KernelArgs<scalar_t> args) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kSize = Vec<scalar_t>::kSize;
  __shared__ BlockSumScratch<acc_t, 1> sum_scratch;
  __shared__ BlockSumScratch<acc_t, 2> deviation_scratch;
  const int64_t cols = args.matrix.cols;
  const acc_t num_classes = static_cast<acc_t>(cols);

  for_each_row<kGrad, kCached>(args.matrix, row_cache_bytes, [&](const Row<scalar_t>& row) {
    const acc_t o_target = to_acc(row.in[row.target]);  // the same address in every thread

    // Pass 1: the mean.
    acc_t sum[1] = {acc_t(0)};
    read_row</*kFromCache=*/false, /*kToCache=*/kCached, /*kKeep=*/!kCached>(
        row.in, row.cache, row.split, cols,
        [&](int64_t, const Vec<scalar_t>& vec) {
#pragma unroll
          for (int e = 0; e < kSize; ++e) sum[0] += to_acc(vec.v[e]);
        },
        [&](int64_t, scalar_t x) { sum[0] += to_acc(x); });
    block_sum(sum, sum_scratch);
    const acc_t mean = sum[0] / num_classes;

    // Pass 2: deviations from the mean, and their squares.
    acc_t dev[2] = {acc_t(0), acc_t(0)};
    auto add_deviation = [&](acc_t x) {
      const acc_t d = x - mean;
      dev[0] += d;
      dev[1] += d * d;
    };
    read_row</*kFromCache=*/kCached, /*kToCache=*/false, /*kKeep=*/kGrad>(
        row.in, row.cache, row.split, cols,
        [&](int64_t, const Vec<scalar_t>& vec) {
#pragma unroll
          for (int e = 0; e < kSize; ++e) add_deviation(to_acc(vec.v[e]));
        },
        [&](int64_t, scalar_t x) { add_deviation(to_acc(x)); });
    block_sum(dev, deviation_scratch);
    const acc_t corrected = dev[1] - dev[0] * (dev[0] / num_classes);
    const acc_t sum_sq_dev = corrected < acc_t(0) ? acc_t(0) : corrected;  // keeps NaN
    const acc_t sigma = spherical::floored_sigma(sum_sq_dev, cols);
    // o_c - mu as (o_c - m) - D / C: the first difference is exact next to the mean.
    const acc_t z_target = ((o_target - mean) - dev[0] / num_classes) / sigma;
    if (threadIdx.x == 0) {
      args.matrix.loss[row.index] = spherical::z_loss(z_target, args.a, args.b);
    }

    // Pass 3: d loss / d o_k = alpha + beta (o_k - m) + gamma [k = c].
    if constexpr (kGrad) {
      const bool floored = sigma == acc_t(spherical::kSigmaFloor);  // NaN: not floored
      const spherical::RowGrad<acc_t> coef = spherical::z_loss_grad(
          z_target, dev[0] / num_classes, sigma, floored, args.a, args.b, cols);
      auto gradient = [&](acc_t x, int64_t col) {
        const acc_t g = coef.alpha + coef.beta * (x - mean);
        return from_acc<scalar_t>(col == row.target ? g + coef.gamma : g);
      };
      read_row</*kFromCache=*/kCached, /*kToCache=*/false, /*kKeep=*/false>(
          row.in, row.cache, row.split, cols,
          [&](int64_t col, const Vec<scalar_t>& vec) {
            Vec<scalar_t> out;
#pragma unroll
            for (int e = 0; e < kSize; ++e) out.v[e] = gradient(to_acc(vec.v[e]), col + e);
            store_streaming(row.grad + col, raw_bits(out));
          },
          [&](int64_t col, scalar_t x) { row.grad[col] = gradient(to_acc(x), col); });
    }
  });
}

// ---------------------------------------------------------------------------------------
// Host side

template <typename scalar_t>
KernelArgs<scalar_t> kernel_args(const SphericalArgs& a) {
  using acc_t = acc_type<scalar_t>;
  return {typed_row_loss<scalar_t>(a.matrix), static_cast<acc_t>(a.a),
          static_cast<acc_t>(a.b)};
}

// The kernels without and with the row cache for the gradient mode kGrad.
template <typename scalar_t, bool kGrad>
cudaError_t launch_mode(const KernelArgs<scalar_t>& args, RowGrid grid, cudaStream_t stream) {
  return launch_cached_or_reread<scalar_t>(
      spherical_z_loss_kernel<scalar_t, kGrad, /*kCached=*/true>,
      spherical_z_loss_kernel<scalar_t, kGrad, /*kCached=*/false>, args, args.matrix.cols, grid,
      stream);
}

template <typename scalar_t>
cudaError_t launch_typed(const SphericalArgs& a, cudaStream_t stream) {
  if (a.matrix.rows == 0) return cudaSuccess;
  const KernelArgs<scalar_t> args = kernel_args<scalar_t>(a);
  const RowGrid grid = row_grid<scalar_t>(a.matrix);
  return a.matrix.grad == nullptr ? launch_mode<scalar_t, false>(args, grid, stream)
                                  : launch_mode<scalar_t, true>(args, grid, stream);
}

}  // namespace

cudaError_t launch_spherical_z_loss(const SphericalArgs& args, cudaStream_t stream) {
  return rows::dispatch_scalar(args.matrix.kind, [&](auto tag) {
    return launch_typed<decltype(tag)>(args, stream);
  });
}

}  // namespace cuda
}  // namespace fusedloss
