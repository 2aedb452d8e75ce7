// Every op schema of fusedloss, in one place. Kernels register per dispatch key in
// csrc/cpu/<family>.cpp and csrc/cuda/bindings.cpp; fake kernels and autograd are
// registered from Python (python/fusedloss/_ops.py and the family modules).
#include <Python.h>
#include <torch/library.h>

// `import fusedloss._C` loads the library, which runs the registrations below. The
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

TORCH_LIBRARY(fusedloss, m) {
  // Margin softmax cross-entropy on normalised logits, per row. Returns the per-row loss
  // (fp32, fp64 for fp64 `cos`) and, when compute_grad, d loss_i / d cos_ij in the dtype
  // of `cos` (otherwise an empty tensor). row_m2 / row_m3: optional per-row margins
  // (ElasticFace) that replace m2 / m3. lse_square_scale: lambda of the auxiliary term
  // lambda * logsumexp(z)^2 added to each non-ignored row (0: none; see margin.h).
  m.def(
      "margin_cross_entropy(Tensor cos, Tensor target, Tensor? row_m2, Tensor? row_m3, "
      "float scale, float m1, float m2, float m3, bool detach_margin, float label_smoothing, "
      "float lse_square_scale, int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
  // The same loss on cos = normalize(embeddings) @ normalize(weight)^T (normalize=False:
  // embeddings @ weight^T), without storing the N x C matrix. Returns the per-row loss
  // and, when compute_grad, the gradients of sum_i row_grad_i * loss_i with respect to
  // embeddings [N, D] and weight [C, D] (row_grad absent: all ones), else empty tensors.
  // block_size: the tiling block, as each backend documents it (0: the backend chooses).
  m.def(
      "margin_linear_cross_entropy(Tensor embeddings, Tensor weight, Tensor target, "
      "Tensor? row_m2, Tensor? row_m3, Tensor? row_grad, float scale, float m1, float m2, "
      "float m3, bool detach_margin, float label_smoothing, float lse_square_scale, "
      "int ignore_index, bool normalize, int block_size, bool deterministic, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor)");
  // Spherical Z-loss per row: loss (fp32, fp64 for fp64 logits) and, when compute_grad,
  // d loss_i / d logits_ij in the dtype of `logits` (else an empty tensor). C >= 2.
  m.def(
      "spherical_z_loss(Tensor logits, Tensor target, float a, float b, int ignore_index, "
      "bool compute_grad) -> (Tensor, Tensor)");
}
