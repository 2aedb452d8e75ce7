// Memory helpers for the CPU kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedloss {
namespace cpu {

// Asks Linux to back the 2 MiB-aligned interior of a fresh buffer with transparent huge
// pages. A new N x C gradient is written once, right away; with 4 KiB pages its first
// touch costs one page fault per 4 KiB, with huge pages one per 2 MiB. Only a hint: without
// THP (or off Linux) nothing changes.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace fusedloss
