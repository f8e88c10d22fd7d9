// CUDA implementations of the vera_kernels ops: ATen for the base products (cuBLAS through at::addmm /
// at::mm) and allocation, the kernels of vera_cuda_kernels.cu for the adapter, on the current stream.
//
// Built only with CUDA torch (setup.py). It includes c10/cuda (stream, device guard), which needs the
// CUDA runtime headers but not ATen's CUDA headers (no cuBLAS/cuSPARSE headers).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/unique_consecutive.h>
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

cuda::RowBank row_bank(const at::Tensor& bank, const at::Tensor& ids) {
  return cuda::RowBank{bank.const_data_ptr<float>(), bank.size(1), ids.const_data_ptr<int64_t>(), bank.size(0)};
}

// The rows of a batch grouped by adapter id for the deterministic bank reductions: a stable sort of the
// ids, then one segment per distinct id (integer ops only; the -1 rows form a segment the kernels skip).
struct Segments {
  at::Tensor order, start, id;
  int64_t count;
};

Segments segments_of(const at::Tensor& ids) {
  const auto sorted = ids.sort(std::optional<bool>(true), 0, false);
  const auto uc = at::unique_consecutive(std::get<0>(sorted), false, true);
  const at::Tensor& id = std::get<0>(uc);
  at::Tensor start = at::zeros({id.size(0) + 1}, ids.options());
  start.narrow(0, 1, id.size(0)).copy_(std::get<2>(uc).cumsum(0));
  return Segments{std::get<1>(sorted).contiguous(), start, id.contiguous(), id.size(0)};
}

// bank [n, C] (zero-filled) receives, per adapter, the sum of its rows of rows [M, C] (contiguous float32).
void bank_reduce(at::Tensor& bank, const at::Tensor& rows, const Segments& seg, void* stream) {
  check_launch(cuda::launch_segment_sum(rows.const_data_ptr<float>(), rows.size(1), seg.order.const_data_ptr<int64_t>(),
                                        seg.start.const_data_ptr<int64_t>(), seg.id.const_data_ptr<int64_t>(),
                                        seg.count, bank.size(0), bank.mutable_data_ptr<float>(), stream));
}

// Each op's signature and opening (check_*, shapes, make_source) match its CPU twin in vera_cpu.cpp: both
// implement the one schema of vera_ops.cpp, with the checks themselves shared in vera_ops.h.
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

at::Tensor fused_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                           const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound,
                           int64_t out_offset, const std::optional<at::Tensor>& adapter_ids) {
  check_expand(x, weight, bias, s, lambda_d, lambda_b, adapter_ids);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), rank = s.size(1);
  const ProjectionSource src = make_source(kMatrixB, B, key0, key1, bound, rank, N, x, out_offset);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  if (adapter_ids.has_value()) {  // u = s * lambda_d[ids] ([M, rank]); lambda_b read per row in the epilogue
    const at::Tensor u = s.mul(gather_bank_rows(lambda_d, *adapter_ids)).contiguous();
    check_launch(cuda::launch_fused_forward_bank(y.mutable_data_ptr(), dtype_of(y), y.stride(0), y.stride(1), y.size(0), N,
                                              u.const_data_ptr<float>(), rank, row_bank(lambda_b, *adapter_ids), src,
                                              stream_of(x)));
    return y;
  }
  const at::Tensor sc = s.contiguous(), ld = lambda_d.contiguous(), lb = lambda_b.contiguous();
  check_launch(cuda::launch_fused_forward(y.mutable_data_ptr(), dtype_of(y), y.stride(0), y.stride(1), y.size(0), N,
                                       sc.const_data_ptr<float>(), rank, ld.const_data_ptr<float>(),
                                       lb.const_data_ptr<float>(), src, stream_of(x)));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_grads_cuda(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
    const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound, bool need_lambda_b,
    int64_t out_offset, const std::optional<at::Tensor>& adapter_ids) {
  check_rank_grads(grad_y, s, lambda_d, lambda_b, adapter_ids);
  check_cuda(grad_y, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const int64_t M = grad_y.size(0), N = grad_y.size(1), rank = s.size(1);
  const ProjectionSource src = make_source(kMatrixB, B, key0, key1, bound, rank, N, grad_y, out_offset);
  const at::Tensor sc = s.contiguous(), ld = lambda_d.contiguous(), lb = lambda_b.contiguous();
  if (adapter_ids.has_value()) {  // g per row; bank gradients summed per adapter in sorted row order
    const int64_t n = lambda_d.size(0);
    void* stream = stream_of(grad_y);
    at::Tensor g = at::empty({M, rank}, s.options());
    check_launch(cuda::launch_rank_grads_bank(activation(grad_y), M, N, rank, row_bank(lb, *adapter_ids), src,
                                                    g.mutable_data_ptr<float>(), stream));
    const Segments seg = segments_of(*adapter_ids);
    at::Tensor grad_d = at::zeros({n, rank}, s.options());
    bank_reduce(grad_d, sc.mul(g).contiguous(), seg, stream);
    if (!need_lambda_b) return {g, grad_d, at::zeros({0}, s.options())};
    const at::Tensor u = sc.mul(gather_bank_rows(ld, *adapter_ids)).contiguous();
    at::Tensor rows = at::empty({M, N}, s.options());
    check_launch(cuda::launch_bank_products(activation(grad_y), M, N, u.const_data_ptr<float>(), rank, src,
                                            rows.mutable_data_ptr<float>(), stream));
    at::Tensor grad_b = at::zeros({n, N}, s.options());
    bank_reduce(grad_b, rows, seg, stream);
    return {g, grad_d, grad_b};
  }
  at::Tensor g = at::empty({M, rank}, s.options());
  at::Tensor grad_b = at::zeros({need_lambda_b ? N : 0}, s.options());
  check_launch(cuda::launch_rank_grads(activation(grad_y), M, N, sc.const_data_ptr<float>(), rank,
                                             ld.const_data_ptr<float>(), lb.const_data_ptr<float>(), src,
                                             g.mutable_data_ptr<float>(),
                                             need_lambda_b ? grad_b.mutable_data_ptr<float>() : nullptr,
                                             stream_of(grad_y)));
  return {g, sc.mul(g).sum(0), grad_b};
}

at::Tensor grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& g,
                           const at::Tensor& lambda_d, const std::optional<at::Tensor>& A, int64_t key0, int64_t key1,
                           double bound, int64_t drop_key0, int64_t drop_key1, int64_t drop_threshold,
                           double drop_scale, int64_t in_offset, const std::optional<at::Tensor>& adapter_ids) {
  check_grad_input(grad_y, weight, g, lambda_d, adapter_ids);
  check_cuda(grad_y, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const int64_t K = weight.size(1), rank = g.size(1);
  const ProjectionSource src = make_source(kMatrixA, A, key0, key1, bound, rank, K, grad_y, in_offset);
  at::Tensor grad_x = at::mm(grad_y, weight);
  // with adapter_ids, each row of g is scaled by its own lambda_d here (a small [M, rank] product)
  const at::Tensor gc = adapter_ids.has_value() ? g.mul(gather_bank_rows(lambda_d, *adapter_ids)).contiguous()
                                                : g.contiguous();
  const at::Tensor ld = lambda_d.contiguous();
  check_launch(cuda::launch_grad_input_add(grad_x.mutable_data_ptr(), dtype_of(grad_x), grad_x.stride(0),
                                           grad_x.stride(1), grad_x.size(0), K, gc.const_data_ptr<float>(), rank,
                                           adapter_ids.has_value() ? nullptr : ld.const_data_ptr<float>(), src,
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
