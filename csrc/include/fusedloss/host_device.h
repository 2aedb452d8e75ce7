// FL_HOST_DEVICE: inline functions of the shared row math, usable from host code and, under
// nvcc, from device code.
#pragma once

#if defined(__CUDACC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FL_HOST_DEVICE inline
#endif
