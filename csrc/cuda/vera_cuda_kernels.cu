// The element-wise CUDA kernels of the "cuda" backend (declared, with their functors, in
// vera_cuda_kernels.h). The adapter's products themselves are cuBLAS GEMMs issued by the host logic
// (vera_cuda_host.h) through ATen; nothing here multiplies matrices, and nothing uses atomics.
//
// No ATen header here: only the CUDA runtime, cuda_fp16/cuda_bf16 and vera_philox.h, so this file
// compiles standalone with nvcc (tests/test_cuda_compile.py) on machines without ATen's CUDA headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../vera_philox.h"
#include "vera_cuda_kernels.h"

namespace vera {
namespace cuda {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls fn(T()) with T the CUDA type of dtype.
template <class Fn>
const char* with_dtype(DType dtype, Fn fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(float());
    case DType::kFloat16:
      return fn(__half());
    case DType::kBFloat16:
      return fn(__nv_bfloat16());
  }
  return "vera_kernels: unsupported dtype";
}

// This thread's first quad of a grid-stride loop over quads, and the loop's stride.
__device__ __forceinline__ int64_t first_quad() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t quad_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename T>
__global__ void materialize_kernel(T* out, int64_t rows, int64_t cols, ProjectionSource src, int64_t row0,
                                   int64_t col0) {
  const int64_t qpr = (cols + 3) / 4;
  for (int64_t q = first_quad(); q < rows * qpr; q += quad_stride()) {
    const int64_t i = q / qpr, j = (q % qpr) * 4;
    float v[4];
    projection_values4(src, row0, col0, i, j, v);
    for (int l = 0; l < 4 && j + l < cols; ++l) out[i * cols + j + l] = from_float<T>(v[l]);
  }
}

template <typename T>
__global__ void dropout_apply_kernel(const T* x, int64_t s0, int64_t s1, int64_t M, int64_t K, DropoutSpec drop,
                                     T* out) {
  const int64_t qpr = (K + 3) / 4;
  for (int64_t q = first_quad(); q < M * qpr; q += quad_stride()) {
    const int64_t m = q / qpr, k = (q % qpr) * 4;
    bool keep[4];
    dropout_keep4(drop, m, k, keep);
    for (int l = 0; l < 4 && k + l < K; ++l)
      out[m * K + k + l] = keep[l] ? x[m * s0 + (k + l) * s1] : from_float<T>(0.0f);
  }
}

template <typename T>
__global__ void add_scaled_kernel(T* out, int64_t s0, int64_t s1, int64_t M, int64_t N, AddScaled f) {
  const int64_t qpr = (N + 3) / 4;
  for (int64_t q = first_quad(); q < M * qpr; q += quad_stride()) {
    const int64_t m = q / qpr, n = (q % qpr) * 4;
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int cnt = N - n < 4 ? static_cast<int>(N - n) : 4;
    for (int l = 0; l < cnt; ++l) v[l] = to_float(out[m * s0 + (n + l) * s1]);
    f.apply4(m, n, N, v);
    for (int l = 0; l < cnt; ++l) out[m * s0 + (n + l) * s1] = from_float<T>(v[l]);
  }
}

// One thread per (segment, column): the segment's rows summed in their sorted order.
__global__ void segment_sum_kernel(const float* rows, int64_t C, const int64_t* order, const int64_t* start,
                                   float* out) {
  const int64_t seg = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= C) return;
  float acc = 0.0f;
  for (int64_t i = start[seg]; i < start[seg + 1]; ++i) acc += rows[order[i] * C + j];
  out[seg * C + j] = acc;
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace

const char* launch_materialize(void* out, DType dtype, int64_t rows, int64_t cols, ProjectionSource src,
                               int64_t row0, int64_t col0, void* stream) {
  if (rows <= 0 || cols <= 0) return nullptr;
  const Grid g = elementwise_grid(rows, cols);
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    materialize_kernel<T><<<static_cast<unsigned>(g.blocks), g.threads, 0, as_stream(stream)>>>(
        static_cast<T*>(out), rows, cols, src, row0, col0);
    return last_error();
  });
}

const char* launch_dropout_apply(Activation x, int64_t M, int64_t K, DropoutSpec drop, void* out, void* stream) {
  if (M <= 0 || K <= 0) return nullptr;
  const Grid g = elementwise_grid(M, K);
  return with_dtype(x.dtype, [&](auto t) {
    using T = decltype(t);
    dropout_apply_kernel<T><<<static_cast<unsigned>(g.blocks), g.threads, 0, as_stream(stream)>>>(
        static_cast<const T*>(x.data), x.stride0, x.stride1, M, K, drop, static_cast<T*>(out));
    return last_error();
  });
}

const char* launch_add_scaled(void* out, DType dtype, int64_t s0, int64_t s1, int64_t M, int64_t N,
                              const AddScaled& f, void* stream) {
  if (M <= 0 || N <= 0) return nullptr;
  const Grid g = elementwise_grid(M, N);
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    add_scaled_kernel<T><<<static_cast<unsigned>(g.blocks), g.threads, 0, as_stream(stream)>>>(
        static_cast<T*>(out), s0, s1, M, N, f);
    return last_error();
  });
}

const char* launch_segment_sum(const float* rows, int64_t C, const int64_t* order, const int64_t* start, int64_t n,
                               float* out, void* stream) {
  if (n <= 0 || C <= 0) return nullptr;
  constexpr int kSumThreads = 128;
  const int64_t col_blocks = (C + kSumThreads - 1) / kSumThreads;
  if (n > 0x7FFFFFFFll || col_blocks > 65535) return "vera_kernels: problem too large for the CUDA grid";
  segment_sum_kernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(col_blocks)), kSumThreads, 0,
                       as_stream(stream)>>>(rows, C, order, start, out);
  return last_error();
}

bool stream_is_capturing(void* stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(as_stream(stream), &status) != cudaSuccess) {
    cudaGetLastError();  // clear it; treat as capturing (the safe answer: nothing is cached)
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace cuda
}  // namespace vera
