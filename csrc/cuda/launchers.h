// Plain C++ entry points of the CUDA kernels in csrc/cuda/*.cu. No torch headers: the
// kernels compile with nvcc alone, and csrc/cuda/bindings.cpp turns tensors into these
// argument structs.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedloss {
namespace cuda {

// Element type of a floating-point tensor. The accumulation type is double for kDouble,
// float otherwise.
enum class ScalarKind { kFloat, kDouble, kHalf, kBFloat16 };

// fusedloss::margin_cross_entropy on one [rows, cols] matrix of cosines (see
// csrc/include/fusedloss/margin.h for the math and csrc/ops.cpp for the op).
struct MarginArgs {
  ScalarKind kind;
  const void* cos;     // [rows, cols], unit column stride, row stride `row_stride`
  int64_t rows;
  int64_t cols;
  int64_t row_stride;  // in elements
  const int64_t* target;  // [rows]
  const void* row_m2;  // [rows] of the accumulation type, or nullptr for `m2`
  const void* row_m3;  // [rows] of the accumulation type, or nullptr for `m3`
  double scale;
  double m1;
  double m2;
  double m3;
  bool use_angle;
  bool detach_margin;
  double label_smoothing;
  double lse_square_scale;  // lambda of the auxiliary term lambda lse^2 (0: none)
  int64_t ignore_index;
  void* loss;  // [rows] of the accumulation type
  void* grad;  // contiguous [rows, cols] of `kind`, or nullptr for the loss alone
};

// Enqueues the kernel on `stream`; returns the first CUDA error met (cudaSuccess if none).
cudaError_t launch_margin_cross_entropy(const MarginArgs& args, cudaStream_t stream);

// fusedloss::spherical_z_loss on one [rows, cols] matrix of logits (see
// csrc/include/fusedloss/spherical.h for the math and csrc/ops.cpp for the op).
struct SphericalArgs {
  ScalarKind kind;
  const void* logits;  // [rows, cols], unit column stride, row stride `row_stride`
  int64_t rows;
  int64_t cols;
  int64_t row_stride;  // in elements
  const int64_t* target;  // [rows]
  double a;
  double b;
  int64_t ignore_index;
  void* loss;  // [rows] of the accumulation type
  void* grad;  // contiguous [rows, cols] of `kind`, or nullptr for the loss alone
};

// Enqueues the kernel on `stream`; returns the first CUDA error met (cudaSuccess if none).
cudaError_t launch_spherical_z_loss(const SphericalArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedloss
