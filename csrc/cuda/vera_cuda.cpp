// CUDA implementations of the vera_kernels ops: ATen for the base products (cuBLAS through at::addmm /
// at::mm) and allocation, the kernels of vera_cuda_kernels.cu for the adapter, on the current stream.
//
// Built only with CUDA torch (setup.py). It includes c10/cuda (stream, device guard), which needs the
// CUDA runtime headers but not ATen's CUDA headers (no cuBLAS/cuSPARSE headers).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../vera_ops.h"
#include "vera_cuda_kernels.h"

namespace vera {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "vera_kernels: unsupported dtype ", t.scalar_type());
  }
}

cuda::Activation activation(const at::Tensor& t) {
  return cuda::Activation{t.const_data_ptr(), dtype_of(t), t.stride(0), t.stride(1)};
}

void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_launch(const char* err) { TORCH_CHECK(err == nullptr, "vera_kernels CUDA kernel failed: ", err); }

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "vera_kernels: ", name, " must be a CUDA tensor, got ", t.device());
}

at::Tensor shrink_cuda(const at::Tensor& x, const std::optional<at::Tensor>& A, int64_t rank, int64_t key0,
                       int64_t key1, double bound, int64_t drop_key0, int64_t drop_key1, int64_t drop_threshold,
                       double drop_scale, int64_t in_offset) {
  const int64_t K = check_shrink(x);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const ProjectionSource src = make_source(kMatrixA, A, key0, key1, bound, rank, K, x, in_offset);
  at::Tensor s = at::empty({x.size(0), rank}, x.options().dtype(at::kFloat));
  check_launch(cuda::launch_shrink(activation(x), x.size(0), K, src, rank,
                                   make_dropout(drop_key0, drop_key1, drop_threshold, drop_scale, in_offset),
                                   s.mutable_data_ptr<float>(), stream_of(x)));
  return s;
}

at::Tensor expand_add_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                           const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound,
                           int64_t out_offset) {
  check_expand(x, weight, bias, s, lambda_d, lambda_b);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), rank = s.size(1);
  const ProjectionSource src = make_source(kMatrixB, B, key0, key1, bound, rank, N, x, out_offset);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  const at::Tensor sc = s.contiguous(), ld = lambda_d.contiguous(), lb = lambda_b.contiguous();
  check_launch(cuda::launch_expand_add(y.mutable_data_ptr(), dtype_of(y), y.stride(0), y.stride(1), y.size(0), N,
                                       sc.const_data_ptr<float>(), rank, ld.const_data_ptr<float>(),
                                       lb.const_data_ptr<float>(), src, stream_of(x)));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adapter_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
    const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound, bool need_lambda_b,
    int64_t out_offset) {
  check_adapter_backward(grad_y, s, lambda_d, lambda_b);
  check_cuda(grad_y, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const int64_t M = grad_y.size(0), N = grad_y.size(1), rank = s.size(1);
  const ProjectionSource src = make_source(kMatrixB, B, key0, key1, bound, rank, N, grad_y, out_offset);
  const at::Tensor sc = s.contiguous(), ld = lambda_d.contiguous(), lb = lambda_b.contiguous();
  at::Tensor g = at::empty({M, rank}, s.options());
  at::Tensor grad_b = at::zeros({need_lambda_b ? N : 0}, s.options());
  check_launch(cuda::launch_adapter_backward(activation(grad_y), M, N, sc.const_data_ptr<float>(), rank,
                                             ld.const_data_ptr<float>(), lb.const_data_ptr<float>(), src,
                                             g.mutable_data_ptr<float>(),
                                             need_lambda_b ? grad_b.mutable_data_ptr<float>() : nullptr,
                                             stream_of(grad_y)));
  return {g, sc.mul(g).sum(0), grad_b};
}

at::Tensor grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& g,
                           const at::Tensor& lambda_d, const std::optional<at::Tensor>& A, int64_t key0, int64_t key1,
                           double bound, int64_t drop_key0, int64_t drop_key1, int64_t drop_threshold,
                           double drop_scale, int64_t in_offset) {
  check_grad_input(grad_y, weight, g, lambda_d);
  check_cuda(grad_y, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const int64_t K = weight.size(1), rank = g.size(1);
  const ProjectionSource src = make_source(kMatrixA, A, key0, key1, bound, rank, K, grad_y, in_offset);
  at::Tensor grad_x = at::mm(grad_y, weight);
  const at::Tensor gc = g.contiguous(), ld = lambda_d.contiguous();
  check_launch(cuda::launch_grad_input_add(grad_x.mutable_data_ptr(), dtype_of(grad_x), grad_x.stride(0),
                                           grad_x.stride(1), grad_x.size(0), K, gc.const_data_ptr<float>(), rank,
                                           ld.const_data_ptr<float>(), src,
                                           make_dropout(drop_key0, drop_key1, drop_threshold, drop_scale, in_offset),
                                           stream_of(grad_y)));
  return grad_x;
}

void projection_tile_cuda(at::Tensor& out, int64_t stream, int64_t row0, int64_t col0, int64_t key0, int64_t key1,
                          double bound) {
  const c10::cuda::CUDAGuard guard(out.device());
  const ProjectionSource src = check_projection_tile(out, stream, row0, col0, key0, key1, bound);
  check_launch(cuda::launch_projection_tile(out.mutable_data_ptr<float>(), out.size(0), out.size(1), src, row0, col0,
                                            stream_of(out)));
}

}  // namespace

TORCH_LIBRARY_IMPL(vera_kernels, CUDA, m) {
  m.impl("shrink", &shrink_cuda);
  m.impl("expand_add", &expand_add_cuda);
  m.impl("adapter_backward", &adapter_backward_cuda);
  m.impl("grad_input", &grad_input_cuda);
  m.impl("projection_tile", &projection_tile_cuda);
}

}  // namespace vera
