// The vera_kernels op library: schemas of the ops (implemented in vera_cpu.cpp and, when built,
// cuda/vera_cuda.cpp) and the Python module init of vera_kernels._C.
//
// The projection travels as (stored float32 matrix or None, key0, key1, bound): the Philox key is the
// 64-bit seed split into two uint32 words, bound the float32 Kaiming bound. The dropout travels as
// (key0, key1, threshold, scale) with threshold 0 meaning "no dropout" (docs/DESIGN.md §2). The last argument of
// the adapter ops is a tensor-parallel shard's offset into the global projection: in_offset (the global
// column of A, and of the dropout mask, for x's column 0) or out_offset (the global row of B for output 0).
// Fake (meta) kernels are registered from Python, in vera_kernels/backends/_native.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing vera_kernels._C loads this library, whose static initialisers register the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "vera_kernels native ops", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vera_kernels, m) {
  m.set_python_module("vera_kernels.backends._native");
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // s = (x * mask * scale) A_K^T, float32 [M, rank]
  m.def(
      "shrink(Tensor x, Tensor? A, int rank, int key0, int key1, float bound, int drop_key0, int drop_key1, "
      "int drop_threshold, float drop_scale, int in_offset=0) -> Tensor",
      tags);
  // y = x W^T + bias + lambda_b * ((lambda_d * s) B_N^T), x's dtype [M, N]. With adapter_ids (int64 [M],
  // -1 = base only) lambda_d/lambda_b are banks [n, rank]/[n, N] and row m uses bank row adapter_ids[m].
  m.def(
      "fused_forward(Tensor x, Tensor weight, Tensor? bias, Tensor s, Tensor lambda_d, Tensor lambda_b, Tensor? B, "
      "int key0, int key1, float bound, int out_offset=0, Tensor? adapter_ids=None) -> Tensor",
      tags);
  // (g [M, rank], grad_lambda_d [rank], grad_lambda_b [N], or [0] when need_lambda_b is false). With
  // adapter_ids: g per row, and the bank gradients [n, rank], [n, N] (or [0]) reduced deterministically.
  m.def(
      "rank_grads(Tensor grad_y, Tensor s, Tensor lambda_d, Tensor lambda_b, Tensor? B, int key0, int key1, "
      "float bound, bool need_lambda_b, int out_offset=0, Tensor? adapter_ids=None) -> (Tensor, Tensor, Tensor)",
      tags);
  // grad_x = grad_y W + mask * scale * ((g * lambda_d) A_K), x's dtype [M, K] (lambda_d a bank row per
  // row with adapter_ids)
  m.def(
      "grad_input(Tensor grad_y, Tensor weight, Tensor g, Tensor lambda_d, Tensor? A, int key0, int key1, "
      "float bound, int drop_key0, int drop_key1, int drop_threshold, float drop_scale, int in_offset=0, "
      "Tensor? adapter_ids=None) -> Tensor",
      tags);
  // tests only: out = rows [row0, ..) x cols [col0, ..) of the generated matrix `stream` (0 = A, 1 = B)
  m.def("projection_tile(Tensor(a!) out, int stream, int row0, int col0, int key0, int key1, float bound) -> ()");
  // out = the dropout keep-mask (bool [rows, cols]) of rows [0, ..) x global cols [col0, ..) (CPU only)
  m.def("dropout_keep_mask(Tensor(a!) out, int col0, int key0, int key1, int threshold) -> ()");
}
