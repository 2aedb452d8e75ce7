// Building blocks of the CUDA row kernels (one thread block per row of a [rows, cols]
// matrix): element types and their accumulation types, 16-byte vector access to a row
// with an arbitrary row stride, the shared-memory row cache, block-wide sums, the loop over
// the rows of a block and the launch with or without the row cache. Shared by
// csrc/cuda/margin.cu and csrc/cuda/spherical.cu; no torch headers.
//
// Vectorisation with an arbitrary row stride: a row is split into a scalar head (up to
// the first 16-byte boundary of its address), whole vectors, and a scalar tail. When two
// rows are accessed at the same columns (an input row and its contiguous gradient row),
// they must share that boundary; when they do not (a view whose row stride differs from
// cols modulo the vector width), the row is processed with scalar accesses only.
// Vector k of a row, and scalar column k of its head and tail, belong to thread
// k mod blockDim.x in every pass, so a thread that caches what it read reads back only
// its own slots. Indices and offsets are 64-bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "launchers.h"

namespace fusedloss {
namespace cuda {
namespace rows {

// fn(tag) with a value of the element type that `kind` names: one launcher per dtype.
template <typename Fn>
cudaError_t dispatch_scalar(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat: return fn(float{});
    case ScalarKind::kDouble: return fn(double{});
    case ScalarKind::kHalf: return fn(__half{});
    case ScalarKind::kBFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr int kVectorBytes = 16;
constexpr int kVectorsInFlight = 4;  // 16-byte loads issued per thread before their use
constexpr int kMaxGrid = 1 << 30;

// ---------------------------------------------------------------------------------------
// Element types

template <typename scalar_t> struct AccumulateOf { using type = float; };
template <> struct AccumulateOf<double> { using type = double; };
template <typename scalar_t> using acc_type = typename AccumulateOf<scalar_t>::type;

// Threads per block at most: fp64's exp needs more than the 64 registers a thread may use
// in a 1024-thread block.
template <typename scalar_t>
constexpr int max_threads() {
  return sizeof(scalar_t) == sizeof(double) ? kMaxThreads / 2 : kMaxThreads;
}

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t> __device__ scalar_t from_acc(acc_type<scalar_t> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename acc_t> __device__ __forceinline__ acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
}

// ---------------------------------------------------------------------------------------
// 16-byte vectors

template <typename scalar_t>
struct alignas(kVectorBytes) Vec {
  static constexpr int kSize = kVectorBytes / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Vectors travel as raw 16-byte words until their elements are needed.
template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> elements(uint4 raw) {
  Vec<scalar_t> out;
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <typename scalar_t>
__device__ __forceinline__ uint4 raw_bits(const Vec<scalar_t>& vec) {
  uint4 raw;
  memcpy(&raw, &vec, sizeof(raw));
  return raw;
}

// Evict-first load: the data will not be read again from global memory.
template <typename scalar_t>
__device__ __forceinline__ uint4 load_last_use(const scalar_t* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

// Caching load: a later pass reads the data again.
template <typename scalar_t>
__device__ __forceinline__ uint4 load_keep(const scalar_t* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// The 16-byte word at a 16-byte aligned element of the shared-memory row cache.
template <typename scalar_t>
__device__ __forceinline__ uint4* word_at(scalar_t* p) {
  return reinterpret_cast<uint4*>(p);
}
template <typename scalar_t>
__device__ __forceinline__ const uint4* word_at(const scalar_t* p) {
  return reinterpret_cast<const uint4*>(p);
}

template <typename scalar_t>
__device__ __forceinline__ void store_streaming(scalar_t* p, uint4 raw) {
  __stcs(reinterpret_cast<uint4*>(p), raw);
}

// ---------------------------------------------------------------------------------------
// Splitting a row into scalar head, 16-byte vectors and scalar tail

struct RowSplit {
  int64_t head;         // columns [0, head) are scalar
  int64_t num_vectors;  // vector k covers [head + k * kSize, head + (k + 1) * kSize)
  int64_t tail_begin;   // columns [tail_begin, cols) are scalar
};

// Columns before `p + column` reaches a 16-byte boundary.
template <typename scalar_t>
__device__ __forceinline__ int64_t columns_to_boundary(const scalar_t* p) {
  constexpr int kSize = Vec<scalar_t>::kSize;
  const int64_t misaligned = (reinterpret_cast<uintptr_t>(p) / sizeof(scalar_t)) % kSize;
  return (kSize - misaligned) % kSize;
}

// Split for rows `a` and, unless null, `b` accessed at the same columns; all scalar when
// they have no common 16-byte boundary.
template <typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const scalar_t* a, const scalar_t* b,
                                              int64_t cols) {
  constexpr int kSize = Vec<scalar_t>::kSize;
  int64_t head = columns_to_boundary(a);
  if (b != nullptr && columns_to_boundary(b) != head) head = cols;
  head = head < cols ? head : cols;
  const int64_t num_vectors = (cols - head) / kSize;
  return {head, num_vectors, head + num_vectors * kSize};
}

// Calls fn(column) for every head and tail column that this thread owns.
template <typename Fn>
__device__ __forceinline__ void for_each_scalar_column(const RowSplit& split, int64_t cols,
                                                       Fn fn) {
  const int64_t count = split.head + (cols - split.tail_begin);
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    fn(k < split.head ? k : split.tail_begin + (k - split.head));
  }
}

// Calls consume(first_column, load(first_column)) for every vector that this thread owns,
// issuing kVectorsInFlight loads (raw 16-byte words) before consuming them. Vector k
// belongs to thread k mod blockDim.x in every pass.
template <typename scalar_t, typename Load, typename Consume>
__device__ __forceinline__ void for_each_vector(const RowSplit& split, Load load,
                                                Consume consume) {
  constexpr int kSize = Vec<scalar_t>::kSize;
  const int64_t step = blockDim.x;
  for (int64_t first = threadIdx.x; first < split.num_vectors;
       first += kVectorsInFlight * step) {
    uint4 words[kVectorsInFlight];
#pragma unroll
    for (int u = 0; u < kVectorsInFlight; ++u) {
      const int64_t k = first + u * step;
      if (k < split.num_vectors) words[u] = load(split.head + k * kSize);
    }
#pragma unroll
    for (int u = 0; u < kVectorsInFlight; ++u) {
      const int64_t k = first + u * step;
      if (k < split.num_vectors) consume(split.head + k * kSize, words[u]);
    }
  }
}

template <typename scalar_t>
__device__ __forceinline__ bool vector_holds(int64_t first_column, int64_t column) {
  return static_cast<uint64_t>(column - first_column) <
         static_cast<uint64_t>(Vec<scalar_t>::kSize);
}

// Loss and gradient row of a row whose target is ignore_index (0) or out of range (NaN).
template <typename scalar_t>
__device__ void fill_row(acc_type<scalar_t> value, acc_type<scalar_t>* loss, scalar_t* grad,
                         int64_t cols) {
  if (threadIdx.x == 0) *loss = value;
  if (grad == nullptr) return;
  constexpr int kSize = Vec<scalar_t>::kSize;
  const scalar_t element = from_acc<scalar_t>(value);
  Vec<scalar_t> vec;
#pragma unroll
  for (int e = 0; e < kSize; ++e) vec.v[e] = element;
  const uint4 word = raw_bits(vec);
  const RowSplit split = split_row<scalar_t>(grad, nullptr, cols);
  for (int64_t k = threadIdx.x; k < split.num_vectors; k += blockDim.x) {
    store_streaming(grad + split.head + k * kSize, word);
  }
  for_each_scalar_column(split, cols, [&](int64_t col) { grad[col] = element; });
}

// ---------------------------------------------------------------------------------------
// Rows of a row loss

// RowLossArgs (launchers.h) with its pointers typed.
template <typename scalar_t>
struct RowLoss {
  const scalar_t* input;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  const int64_t* target;
  int64_t ignore_index;
  acc_type<scalar_t>* loss;
  scalar_t* grad;
};

// One row with a target in [0, cols), as the body of a row kernel sees it.
template <typename scalar_t>
struct Row {
  int64_t index;
  const scalar_t* in;
  scalar_t* grad;  // nullptr without gradient
  int64_t target;
  RowSplit split;
  scalar_t* cache;  // cache[j] holds column j when the kernel keeps the row in shared memory
};

// Calls body(Row) for each row of this block's grid-stride share that has a target in
// [0, cols); the other rows are filled here. `cache_bytes` is the dynamic shared memory,
// which the cached kernels use as row cache: it is offset so that every vector's slots lie
// on a 16-byte boundary. The barrier after each row in those kernels keeps the next row
// (whose head, hence slot ownership, may differ) from overwriting slots that a slower
// thread is still reading.
template <bool kGrad, bool kCached, typename scalar_t, typename Body>
__device__ __forceinline__ void for_each_row(const RowLoss<scalar_t>& matrix,
                                             unsigned char* cache_bytes, Body body) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kSize = Vec<scalar_t>::kSize;
  for (int64_t row = blockIdx.x; row < matrix.rows; row += gridDim.x) {
    const scalar_t* in = matrix.input + row * matrix.row_stride;
    scalar_t* grad = kGrad ? matrix.grad + row * matrix.cols : nullptr;
    const int64_t target = matrix.target[row];
    if (target == matrix.ignore_index) {
      fill_row(acc_t(0), matrix.loss + row, grad, matrix.cols);
    } else if (target < 0 || target >= matrix.cols) {
      fill_row(quiet_nan<acc_t>(), matrix.loss + row, grad, matrix.cols);
    } else {
      const RowSplit split = split_row<scalar_t>(in, grad, matrix.cols);
      scalar_t* cache =
          reinterpret_cast<scalar_t*>(cache_bytes) + (kSize - split.head % kSize) % kSize;
      body(Row<scalar_t>{row, in, grad, target, split, cache});
    }
    if (kCached) __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------
// Block-wide sums

template <typename acc_t, int N>
struct BlockSumScratch {
  acc_t per_warp[kMaxWarps][N];
  acc_t total[N];
};

// Replaces v[i] in every lane of the warp by its sum over the warp.
template <typename acc_t, int N>
__device__ __forceinline__ void warp_sum(acc_t (&v)[N]) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
  }
}

// Replaces v[i] in every thread of the block by its sum over the block (blockDim.x a
// multiple of 32). Every thread gets the same bits: warp 0 adds the warps' sums in one
// fixed order. The scratch may be reused by the next call at once: per_warp is written
// only after the previous call's second barrier, by which time warp 0 has read it, and
// `total` only after the first barrier, by which time every thread has read it.
template <typename acc_t, int N>
__device__ __forceinline__ void block_sum(acc_t (&v)[N], BlockSumScratch<acc_t, N>& scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  warp_sum(v);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch.per_warp[warp][i] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x / kWarpSize;
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = lane < num_warps ? scratch.per_warp[lane][i] : acc_t(0);
    warp_sum(v);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) scratch.total[i] = v[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = scratch.total[i];
}

// ---------------------------------------------------------------------------------------
// Host side

// Smallest power of two in [32, max_threads] giving each thread at least two vectors.
template <typename scalar_t>
int threads_per_row(int64_t cols) {
  constexpr int kTwoVectors = 2 * Vec<scalar_t>::kSize;
  const int64_t wanted = (cols + kTwoVectors - 1) / kTwoVectors;
  int threads = kWarpSize;
  while (threads < wanted && threads < max_threads<scalar_t>()) threads *= 2;
  return threads;
}

// Lets `kernel` use all the shared memory that a block may opt in to and returns how much
// of it is left for the row cache. Always the same value, so concurrent callers agree.
template <typename Kernel>
cudaError_t opt_in_row_cache(Kernel kernel, size_t* available) {
  int device = 0;
  int opt_in_limit = 0;
  cudaFuncAttributes attributes;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&opt_in_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                 device);
  }
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return err;
  const size_t limit = static_cast<size_t>(opt_in_limit);
  *available = limit > attributes.sharedSizeBytes ? limit - attributes.sharedSizeBytes : 0;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(*available));
}

// Whether a row of `cols` elements fits in `available` bytes of row cache, with one
// vector of slack (the cache is shifted so that the row's vectors are aligned), and the
// bytes it then takes.
template <typename scalar_t>
bool row_cache_fits(int64_t cols, size_t available, size_t* cache_bytes) {
  constexpr int kSize = Vec<scalar_t>::kSize;
  *cache_bytes = static_cast<size_t>(cols + kSize) * sizeof(scalar_t);
  return cols <= static_cast<int64_t>(available / sizeof(scalar_t)) &&
         *cache_bytes <= available;
}

// The typed view of the shared kernel arguments.
template <typename scalar_t>
RowLoss<scalar_t> typed_row_loss(const RowLossArgs& a) {
  return {static_cast<const scalar_t*>(a.input),
          a.rows,
          a.cols,
          a.row_stride,
          a.target,
          a.ignore_index,
          static_cast<acc_type<scalar_t>*>(a.loss),
          static_cast<scalar_t*>(a.grad)};
}

// One block per row, grid-stride past kMaxGrid rows; threads_per_row threads per block.
struct RowGrid {
  int blocks;
  int threads;
};

template <typename scalar_t>
RowGrid row_grid(const RowLossArgs& a) {
  return {static_cast<int>(a.rows < kMaxGrid ? a.rows : kMaxGrid),
          threads_per_row<scalar_t>(a.cols)};
}

// Launches `cached` with the row cache in dynamic shared memory when a row of `cols`
// elements fits there, else `reread`, which reads the row again in each later pass.
template <typename scalar_t, typename KernelArgs>
cudaError_t launch_cached_or_reread(void (*cached)(KernelArgs), void (*reread)(KernelArgs),
                                    const KernelArgs& args, int64_t cols, RowGrid grid,
                                    cudaStream_t stream) {
  size_t available = 0;
  const cudaError_t err = opt_in_row_cache(cached, &available);
  if (err != cudaSuccess) return err;
  size_t cache_bytes = 0;
  if (row_cache_fits<scalar_t>(cols, available, &cache_bytes)) {
    cached<<<grid.blocks, grid.threads, cache_bytes, stream>>>(args);
  } else {
    reread<<<grid.blocks, grid.threads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace rows
}  // namespace cuda
}  // namespace fusedloss
