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

// What every row kernel takes: one [rows, cols] matrix, a target class per row, and the
// outputs. A row whose target is ignore_index gets loss 0 and a zero gradient row; a target
// outside [0, cols) otherwise gets a NaN loss and a NaN gradient row.
struct RowLossArgs {
  ScalarKind kind;
  const void* input;   // [rows, cols], unit column stride, row stride `row_stride`
  int64_t rows;
  int64_t cols;
  int64_t row_stride;  // in elements
  const int64_t* target;  // [rows]
  int64_t ignore_index;
  void* loss;  // [rows] of the accumulation type
  void* grad;  // contiguous [rows, cols] of `kind`, or nullptr for the loss alone
};

// fusedloss::margin_cross_entropy on one [rows, cols] matrix of cosines (see
// csrc/include/fusedloss/margin.h for the math and python/fusedloss/_schemas.py for the op).
struct MarginArgs {
  RowLossArgs matrix;  // input: the cosines
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
};

// Enqueues the kernel on `stream`; returns the first CUDA error met (cudaSuccess if none).
cudaError_t launch_margin_cross_entropy(const MarginArgs& args, cudaStream_t stream);

// fusedloss::spherical_z_loss on one [rows, cols] matrix of logits (see
// csrc/include/fusedloss/spherical.h for the math and python/fusedloss/_schemas.py for the op).
struct SphericalArgs {
  RowLossArgs matrix;  // input: the logits
  double a;
  double b;
};

// Enqueues the kernel on `stream`; returns the first CUDA error met (cudaSuccess if none).
cudaError_t launch_spherical_z_loss(const SphericalArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedloss
