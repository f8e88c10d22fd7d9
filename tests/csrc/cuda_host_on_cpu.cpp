// Test build of the "cuda" backend's host logic (csrc/cuda/vera_cuda_host.h) on CPU tensors.
//
// The launchers of vera_cuda_kernels.h are implemented here as host loops over the same functors the CUDA
// kernels run (AddScaled, dropout_keep4, projection_values4), so tests/test_cuda_host_logic.py checks the
// GEMM plan, the precision handling, the cache and the bank reductions against the reference on a machine
// without a GPU. Its ops take the arguments of the vera_kernels ops, every one given (no defaults).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cuda/vera_cuda_host.h"

namespace vera {
namespace cuda {
namespace {

template <class Fn>
const char* with_host_dtype(DType dtype, Fn fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(float());
    case DType::kFloat16:
      return fn(c10::Half());
    case DType::kBFloat16:
      return fn(c10::BFloat16());
  }
  return "unsupported dtype";
}

// fn(i, j) for every quad (row i, columns j .. j + 3) of a [rows, cols] problem, as the kernels' threads.
template <class Fn>
void for_each_quad(int64_t rows, int64_t cols, Fn fn) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; j += 4) fn(i, j);
}

}  // namespace

const char* launch_materialize(void* out, DType dtype, int64_t rows, int64_t cols, ProjectionSource src,
                               int64_t row0, int64_t col0, void*) {
  return with_host_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    T* o = static_cast<T*>(out);
    for_each_quad(rows, cols, [&](int64_t i, int64_t j) {
      float v[4];
      projection_values4(src, row0, col0, i, j, v);
      for (int l = 0; l < 4 && j + l < cols; ++l) o[i * cols + j + l] = T(v[l]);
    });
    return static_cast<const char*>(nullptr);
  });
}

const char* launch_dropout_apply(Activation x, int64_t M, int64_t K, DropoutSpec drop, void* out, void*) {
  return with_host_dtype(x.dtype, [&](auto t) {
    using T = decltype(t);
    const T* in = static_cast<const T*>(x.data);
    T* o = static_cast<T*>(out);
    for_each_quad(M, K, [&](int64_t m, int64_t k) {
      bool keep[4];
      dropout_keep4(drop, m, k, keep);
      for (int l = 0; l < 4 && k + l < K; ++l) o[m * K + k + l] = keep[l] ? in[m * x.stride0 + (k + l) * x.stride1] : T(0.0f);
    });
    return static_cast<const char*>(nullptr);
  });
}

const char* launch_add_scaled(void* out, DType dtype, int64_t s0, int64_t s1, int64_t M, int64_t N,
                              const AddScaled& f, void*) {
  return with_host_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    T* o = static_cast<T*>(out);
    for_each_quad(M, N, [&](int64_t m, int64_t n) {
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const int cnt = N - n < 4 ? static_cast<int>(N - n) : 4;
      for (int l = 0; l < cnt; ++l) v[l] = static_cast<float>(o[m * s0 + (n + l) * s1]);
      f.apply4(m, n, N, v);
      for (int l = 0; l < cnt; ++l) o[m * s0 + (n + l) * s1] = T(v[l]);
    });
    return static_cast<const char*>(nullptr);
  });
}

const char* launch_segment_sum(const float* rows, int64_t C, const int64_t* order, const int64_t* start, int64_t n,
                               float* out, void*) {
  for (int64_t k = 0; k < n; ++k)
    for (int64_t j = 0; j < C; ++j) {
      float acc = 0.0f;
      for (int64_t i = start[k]; i < start[k + 1]; ++i) acc += rows[order[i] * C + j];
      out[k * C + j] = acc;
    }
  return nullptr;
}

bool stream_is_capturing(void*) { return false; }

}  // namespace cuda
}  // namespace vera

namespace {

// may_cache: whether this call may use the projection cache (false: as while a CUDA graph is captured)
vera::cuda::Env env(bool may_cache) { return vera::cuda::Env{nullptr, may_cache}; }

at::Tensor shrink(const at::Tensor& x, const std::optional<at::Tensor>& A, int64_t rank, int64_t key0, int64_t key1,
                  double bound, int64_t dk0, int64_t dk1, int64_t threshold, double scale, int64_t in_offset,
                  bool may_cache) {
  return vera::cuda::shrink(x, A, rank, key0, key1, bound, dk0, dk1, threshold, scale, in_offset, env(may_cache));
}

at::Tensor fused_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                         const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound,
                         int64_t out_offset, const std::optional<at::Tensor>& ids, bool may_cache) {
  return vera::cuda::fused_forward(x, weight, bias, s, lambda_d, lambda_b, B, key0, key1, bound, out_offset, ids,
                                   env(may_cache));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_grads(const at::Tensor& grad_y, const at::Tensor& s,
                                                          const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                                                          const std::optional<at::Tensor>& B, int64_t key0,
                                                          int64_t key1, double bound, bool need_lambda_b,
                                                          int64_t out_offset, const std::optional<at::Tensor>& ids,
                                                          bool may_cache) {
  return vera::cuda::rank_grads(grad_y, s, lambda_d, lambda_b, B, key0, key1, bound, need_lambda_b, out_offset, ids,
                                env(may_cache));
}

at::Tensor grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& g,
                      const at::Tensor& lambda_d, const std::optional<at::Tensor>& A, int64_t key0, int64_t key1,
                      double bound, int64_t dk0, int64_t dk1, int64_t threshold, double scale, int64_t in_offset,
                      const std::optional<at::Tensor>& ids, bool may_cache) {
  return vera::cuda::grad_input(grad_y, weight, g, lambda_d, A, key0, key1, bound, dk0, dk1, threshold, scale,
                                in_offset, ids, env(may_cache));
}

int64_t cache_size() { return static_cast<int64_t>(vera::cuda::slice_cache().size()); }

// (blocks, threads per block) of the element-wise kernels over a [rows, cols] problem
std::vector<int64_t> elementwise_grid(int64_t rows, int64_t cols) {
  const vera::cuda::Grid g = vera::cuda::elementwise_grid(rows, cols);
  return {g.blocks, g.threads};
}

}  // namespace

TORCH_LIBRARY(vera_cuda_host_on_cpu, m) {
  m.def("shrink", &shrink);
  m.def("fused_forward", &fused_forward);
  m.def("rank_grads", &rank_grads);
  m.def("grad_input", &grad_input);
  m.def("cache_size", &cache_size);
  m.def("elementwise_grid", &elementwise_grid);
}
