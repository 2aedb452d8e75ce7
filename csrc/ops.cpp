// The Python module fusedloss._C. Every op schema of fusedloss, with its contract, is
// defined in python/fusedloss/_schemas.py (torch.library, before _C is loaded), so that
// the ops exist for the reference and Triton backends without this library. The kernels
// register per dispatch key in csrc/cpu/<family>.cpp and csrc/cuda/bindings.cpp
// (TORCH_LIBRARY_IMPL), checked against those schemas; fake kernels and autograd are
// registered from Python (python/fusedloss/_ops.py and the family modules).
#include <Python.h>

// `import fusedloss._C` loads the library, which runs the kernel registrations. The
// module itself only says how it was built.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module);
  if (mod == nullptr) return nullptr;
#ifdef FUSEDLOSS_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  return mod;
}
