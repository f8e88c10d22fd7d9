// CUDA implementations of the vera_kernels ops: the host logic of vera_cuda_host.h (ATen GEMMs, cuBLAS on
// the GPU, plus the element-wise kernels of vera_cuda_kernels.cu), on x's device and current stream.
//
// Built only with CUDA torch (setup.py). It includes c10/cuda (stream, device guard), which needs the
// CUDA runtime headers but not ATen's CUDA headers (no cuBLAS/cuSPARSE headers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "vera_cuda_host.h"

namespace vera {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "vera_kernels: ", name, " must be a CUDA tensor, got ", t.device());
}

// The current stream of t's device; projection slices are cached unless a CUDA graph is being captured.
cuda::Env env_of(const at::Tensor& t) {
  void* stream = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  return cuda::Env{stream, !cuda::stream_is_capturing(stream)};
}

// Each op's signature matches its CPU twin in vera_cpu.cpp: both implement the one schema of vera_ops.cpp.
at::Tensor shrink_cuda(const at::Tensor& x, const std::optional<at::Tensor>& A, int64_t rank, int64_t key0,
                       int64_t key1, double bound, int64_t drop_key0, int64_t drop_key1, int64_t drop_threshold,
                       double drop_scale, int64_t in_offset) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda::shrink(x, A, rank, key0, key1, bound, drop_key0, drop_key1, drop_threshold, drop_scale, in_offset,
                      env_of(x));
}

at::Tensor fused_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                              const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound,
                              int64_t out_offset, const std::optional<at::Tensor>& adapter_ids) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda::fused_forward(x, weight, bias, s, lambda_d, lambda_b, B, key0, key1, bound, out_offset, adapter_ids,
                             env_of(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_grads_cuda(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
    const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound, bool need_lambda_b,
    int64_t out_offset, const std::optional<at::Tensor>& adapter_ids) {
  check_cuda(grad_y, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  return cuda::rank_grads(grad_y, s, lambda_d, lambda_b, B, key0, key1, bound, need_lambda_b, out_offset,
                          adapter_ids, env_of(grad_y));
}

at::Tensor grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& g,
                           const at::Tensor& lambda_d, const std::optional<at::Tensor>& A, int64_t key0, int64_t key1,
                           double bound, int64_t drop_key0, int64_t drop_key1, int64_t drop_threshold,
                           double drop_scale, int64_t in_offset, const std::optional<at::Tensor>& adapter_ids) {
  check_cuda(grad_y, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  return cuda::grad_input(grad_y, weight, g, lambda_d, A, key0, key1, bound, drop_key0, drop_key1, drop_threshold,
                          drop_scale, in_offset, adapter_ids, env_of(grad_y));
}

void projection_tile_cuda(at::Tensor& out, int64_t stream, int64_t row0, int64_t col0, int64_t key0, int64_t key1,
                          double bound) {
  check_cuda(out, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::projection_tile(out, stream, row0, col0, key0, key1, bound, env_of(out));
}

}  // namespace

// Kept alike on purpose: this list and the CPU one in vera_cpu.cpp register one implementation of every op
// of the schema (vera_ops.cpp) per device; this file is built only with CUDA torch, so the two cannot share
// one registration block. Likewise the *_cuda and *_cpu functions share the schema's signatures.
TORCH_LIBRARY_IMPL(vera_kernels, CUDA, m) {
  m.impl("shrink", &shrink_cuda);
  m.impl("fused_forward", &fused_forward_cuda);
  m.impl("rank_grads", &rank_grads_cuda);
  m.impl("grad_input", &grad_input_cuda);
  m.impl("projection_tile", &projection_tile_cuda);
}

}  // namespace vera
