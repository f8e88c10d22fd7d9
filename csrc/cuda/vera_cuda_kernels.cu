// CUDA kernels of the VeRA adapter (docs/DESIGN.md §1, §4): one tiled float32 GEMM template whose operand
// loaders and epilogue are small structs, instantiated for the four adapter products. A/B are generated
// in registers (one Philox call per 4 neighbouring values) or loaded from a stored float32 matrix;
// the expansion is fused into one read-add-write of the base product (computed by cuBLAS in the binding).
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

constexpr int kBM = 64, kBN = 64, kBK = 16;  // block tile; 256 threads, 4x4 outputs each
constexpr int kThreads = 256;

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

// ---- operand loaders: load4(i, j, ni, nj, v) fills v with 4 elements starting at (i, j), zero out of range

// A dense strided matrix: element (i, j) = float(data[i * s0 + j * s1]) * colscale[j] * keep(i, j) * scale.
// Quads run along j (j is a multiple of 4: the kernel's tiles guarantee it); the dropout mask is read at
// global columns drop.col0 + j.
template <typename T>
struct Dense {
  const T* data;
  int64_t s0, s1;
  const float* colscale;  // nullable
  DropoutSpec drop;

  __device__ void load4(int64_t i, int64_t j, int64_t ni, int64_t nj, float v[4]) const {
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    if (drop.active() && i < ni) philox_words4(kDropout, i, drop.col0 + j, drop.key, w);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t jj = j + l;
      float x = 0.0f;
      if (i < ni && jj < nj) {
        x = to_float(data[i * s0 + jj * s1]);
        if (colscale != nullptr) x *= colscale[jj];
        if (drop.active()) x = dropout_keep(w[l], drop.threshold) ? x * drop.scale : 0.0f;
      }
      v[l] = x;
    }
  }
};

// Row m's bank row, or null when m is out of range or the row has no adapter.
__device__ __forceinline__ const float* bank_row(const RowBank& rb, int64_t m, int64_t M) {
  if (m >= M) return nullptr;
  const int64_t id = rb.ids[m];
  return (id < 0 || id >= rb.n) ? nullptr : rb.bank + id * rb.ld;
}

// A Dense operand whose row i is scaled elementwise by its bank row (zero for a row without adapter).
template <typename T>
struct BankScaled {
  Dense<T> base;
  RowBank rb;

  __device__ void load4(int64_t i, int64_t j, int64_t ni, int64_t nj, float v[4]) const {
    base.load4(i, j, ni, nj, v);
    const float* row = bank_row(rb, i, ni);
#pragma unroll
    for (int l = 0; l < 4; ++l) v[l] = (row != nullptr && j + l < nj) ? v[l] * row[j + l] : 0.0f;
  }
};

// A generated projection P used as operand element (k, n): P[n, k] when PROJ_COL_IS_K (quads along k),
// else P[k, n] (quads along n). One Philox call gives the 4 values of a quad (one per value when a
// shard's column offset into A is not a multiple of 4). src.offset shifts the columns of A / rows of B.
template <bool PROJ_COL_IS_K>
struct Generated {
  ProjectionSource src;

  __device__ void load4(int64_t k, int64_t n, int64_t nk, int64_t nn, float v[4]) const {
    const int64_t row = PROJ_COL_IS_K ? n : k, col = PROJ_COL_IS_K ? k : n;
    const int64_t nrow = PROJ_COL_IS_K ? nn : nk, ncol = PROJ_COL_IS_K ? nk : nn;
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    const bool is_a = src.stream == kMatrixA;
    if (row < nrow && col < ncol)
      philox_words4(src.stream, row + (is_a ? 0 : src.offset), col + (is_a ? src.offset : 0), src.key, w);
#pragma unroll
    for (int l = 0; l < 4; ++l) v[l] = (row < nrow && col + l < ncol) ? projection_value(w[l], src.bound) : 0.0f;
  }
};

// How the GEMM loads a right operand: quads along k (Generated<true>) or along n (all others).
template <class R>
struct QuadAlongK {
  static constexpr bool value = false;
};
template <>
struct QuadAlongK<Generated<true>> {
  static constexpr bool value = true;
};

// ---- epilogues: store4(m, n, acc, M, N) for the 4 outputs (m, n .. n + 3), n a multiple of 4

struct StoreF32 {  // out[m, n] = acc (contiguous, leading dimension ld)
  float* out;
  int64_t ld;
  __device__ void store4(int64_t m, int64_t n, const float acc[4], int64_t M, int64_t N) const {
    if (m >= M) return;
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (n + l < N) out[m * ld + n + l] = acc[l];
  }
};

// out[m, n] = T(float(out[m, n]) + colscale[n] * keep(m, n) * scale * acc): the fused expansion add.
template <typename T>
struct AddCast {
  T* out;
  int64_t s0, s1;
  const float* colscale;  // nullable
  DropoutSpec drop;
  __device__ void store4(int64_t m, int64_t n, const float acc[4], int64_t M, int64_t N) const {
    if (m >= M) return;
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    if (drop.active()) philox_words4(kDropout, m, drop.col0 + n, drop.key, w);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t nn = n + l;
      if (nn >= N) continue;
      float a = acc[l];
      if (colscale != nullptr) a *= colscale[nn];
      if (drop.active()) a = dropout_keep(w[l], drop.threshold) ? a * drop.scale : 0.0f;
      T* p = out + m * s0 + nn * s1;
      *p = from_float<T>(to_float(*p) + a);
    }
  }
};

// out[m, n] = T(float(out[m, n]) + bank row of m [n] * acc): the expansion add with per-row lambda_b.
template <typename T>
struct AddCastBank {
  T* out;
  int64_t s0, s1;
  RowBank rb;
  __device__ void store4(int64_t m, int64_t n, const float acc[4], int64_t M, int64_t N) const {
    const float* row = bank_row(rb, m, M);
    if (row == nullptr) return;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t nn = n + l;
      if (nn >= N) continue;
      T* p = out + m * s0 + nn * s1;
      *p = from_float<T>(to_float(*p) + row[nn] * acc[l]);
    }
  }
};

// out[m, n] = acc * float(gy[m, n]) (out contiguous float32 [M, N]): per-row lambda_b gradient terms.
template <typename T>
struct MulStore {
  float* out;
  const T* gy;
  int64_t s0, s1;
  __device__ void store4(int64_t m, int64_t n, const float acc[4], int64_t M, int64_t N) const {
    if (m >= M) return;
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (n + l < N) out[m * N + n + l] = acc[l] * to_float(gy[m * s0 + (n + l) * s1]);
  }
};

// out[m] += sum_n P(m, n) * acc[m, n] (P loaded like a right operand with quads along n): grad_lambda_b.
template <class P>
struct RowDotAtomic {
  float* out;
  P proj;
  __device__ void store4(int64_t m, int64_t n, const float acc[4], int64_t M, int64_t N) const {
    if (m >= M) return;
    float p[4];
    proj.load4(m, n, M, N, p);
    const float partial = p[0] * acc[0] + p[1] * acc[1] + p[2] * acc[2] + p[3] * acc[3];
    atomicAdd(out + m, partial);
  }
};

// ---- the GEMM: C[M, N] = sum_k L(m, k) R(k, n), handed to the epilogue -----------------------------
template <class L, class R, class E>
__global__ void __launch_bounds__(kThreads) adapter_gemm(int64_t M, int64_t N, int64_t K, L left, R right, E epi) {
  __shared__ float As[kBK][kBM + 4];
  __shared__ float Bs[kBK][kBN + 4];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    float v[4];
    {  // left tile: row tid / 4, four k from (tid % 4) * 4
      const int r = tid / 4, kq = (tid % 4) * 4;
      left.load4(m0 + r, k0 + kq, M, K, v);
#pragma unroll
      for (int l = 0; l < 4; ++l) As[kq + l][r] = v[l];
    }
    if constexpr (QuadAlongK<R>::value) {  // right tile: column tid / 4, four k from (tid % 4) * 4
      const int c = tid / 4, kq = (tid % 4) * 4;
      right.load4(k0 + kq, n0 + c, K, N, v);
#pragma unroll
      for (int l = 0; l < 4; ++l) Bs[kq + l][c] = v[l];
    } else {  // right tile: k = tid / 16, four columns from (tid % 16) * 4
      const int kk = tid / 16, cq = (tid % 16) * 4;
      right.load4(k0 + kk, n0 + cq, K, N, v);
#pragma unroll
      for (int l = 0; l < 4; ++l) Bs[kk][cq + l] = v[l];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) epi.store4(m0 + ty * 4 + i, n0 + tx * 4, acc[i], M, N);
}

template <class L, class R, class E>
const char* run(int64_t M, int64_t N, int64_t K, const L& left, const R& right, const E& epi, void* stream) {
  if (M <= 0 || N <= 0) return nullptr;
  const int64_t gx = (M + kBM - 1) / kBM, gy = (N + kBN - 1) / kBN;
  if (gx > 0x7FFFFFFFll || gy > 65535) return "vera_kernels: problem too large for the CUDA grid";
  adapter_gemm<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0,
                 static_cast<cudaStream_t>(stream)>>>(M, N, K, left, right, epi);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Calls fn(p) with the right-operand loader of projection `src`: generated (PROJ_COL_IS_K picks the
// orientation, see Generated) or stored, where element (k, n) is P[n, k] or P[k, n] the same way.
template <bool PROJ_COL_IS_K, class Fn>
const char* with_projection(const ProjectionSource& src, Fn fn) {
  if (src.generated()) return fn(Generated<PROJ_COL_IS_K>{src});
  const int64_t s_k = PROJ_COL_IS_K ? src.stride_col : src.stride_row;
  const int64_t s_n = PROJ_COL_IS_K ? src.stride_row : src.stride_col;
  const float* origin = src.data + src.offset * (src.stream == kMatrixA ? src.stride_col : src.stride_row);
  return fn(Dense<float>{origin, s_k, s_n, nullptr, DropoutSpec{Key{0u, 0u}, 0u, 1.0f, 0}});
}

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

__global__ void projection_tile_kernel(float* out, int64_t rows, int64_t cols, ProjectionSource src, int64_t row0,
                                       int64_t col0) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * cols) return;
  const int64_t i = idx / cols, j = idx % cols;
  out[idx] = projection_value(philox_word(src.stream, row0 + i, col0 + j, src.key), src.bound);
}

// One thread per (segment, column): the segment's rows summed in their sorted order.
__global__ void segment_sum_kernel(const float* rows, int64_t C, const int64_t* order, const int64_t* seg_start,
                                   const int64_t* seg_id, int64_t n, float* out) {
  const int64_t seg = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= C) return;
  const int64_t id = seg_id[seg];
  if (id < 0 || id >= n) return;
  float acc = 0.0f;
  for (int64_t i = seg_start[seg]; i < seg_start[seg + 1]; ++i) acc += rows[order[i] * C + j];
  out[id * C + j] = acc;
}

constexpr DropoutSpec kNoDropout{Key{0u, 0u}, 0u, 1.0f, 0};

}  // namespace

const char* launch_shrink(Activation x, int64_t M, int64_t K, ProjectionSource A, int64_t rank, DropoutSpec drop,
                          float* s, void* stream) {
  return with_dtype(x.dtype, [&](auto t) {
    using T = decltype(t);
    const Dense<T> left{static_cast<const T*>(x.data), x.stride0, x.stride1, nullptr, drop};
    return with_projection<true>(A, [&](auto right) { return run(M, rank, K, left, right, StoreF32{s, rank}, stream); });
  });
}

const char* launch_fused_forward(void* y, DType dtype, int64_t sy0, int64_t sy1, int64_t M, int64_t N, const float* s,
                              int64_t rank, const float* lambda_d, const float* lambda_b, ProjectionSource B,
                              void* stream) {
  const Dense<float> left{s, rank, 1, lambda_d, kNoDropout};
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const AddCast<T> epi{static_cast<T*>(y), sy0, sy1, lambda_b, kNoDropout};
    return with_projection<true>(B, [&](auto right) { return run(M, N, rank, left, right, epi, stream); });
  });
}

const char* launch_rank_grads(Activation grad_y, int64_t M, int64_t N, const float* s, int64_t rank,
                                    const float* lambda_d, const float* lambda_b, ProjectionSource B, float* g,
                                    float* grad_lambda_b, void* stream) {
  return with_dtype(grad_y.dtype, [&](auto t) {
    using T = decltype(t);
    const T* gy = static_cast<const T*>(grad_y.data);
    // g = (grad_y * lambda_b) B_N: reduction over N
    const Dense<T> left{gy, grad_y.stride0, grad_y.stride1, lambda_b, kNoDropout};
    const char* err =
        with_projection<false>(B, [&](auto right) { return run(M, rank, N, left, right, StoreF32{g, rank}, stream); });
    if (err != nullptr || grad_lambda_b == nullptr) return err;
    // grad_lambda_b[n] = sum_j B[n, j] (grad_y^T (lambda_d * s))[n, j]: reduction over M
    const Dense<T> gy_t{gy, grad_y.stride1, grad_y.stride0, nullptr, kNoDropout};
    const Dense<float> u{s, rank, 1, lambda_d, kNoDropout};
    return with_projection<false>(B, [&](auto proj) {
      return run(N, rank, M, gy_t, u, RowDotAtomic<decltype(proj)>{grad_lambda_b, proj}, stream);
    });
  });
}

const char* launch_grad_input_add(void* grad_x, DType dtype, int64_t sx0, int64_t sx1, int64_t M, int64_t K,
                                  const float* g, int64_t rank, const float* lambda_d, ProjectionSource A,
                                  DropoutSpec drop, void* stream) {
  const Dense<float> left{g, rank, 1, lambda_d, kNoDropout};
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const AddCast<T> epi{static_cast<T*>(grad_x), sx0, sx1, nullptr, drop};
    return with_projection<false>(A, [&](auto right) { return run(M, K, rank, left, right, epi, stream); });
  });
}

const char* launch_fused_forward_bank(void* y, DType dtype, int64_t sy0, int64_t sy1, int64_t M, int64_t N,
                                   const float* u, int64_t rank, RowBank lambda_b, ProjectionSource B, void* stream) {
  const Dense<float> left{u, rank, 1, nullptr, kNoDropout};
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const AddCastBank<T> epi{static_cast<T*>(y), sy0, sy1, lambda_b};
    return with_projection<true>(B, [&](auto right) { return run(M, N, rank, left, right, epi, stream); });
  });
}

const char* launch_rank_grads_bank(Activation grad_y, int64_t M, int64_t N, int64_t rank, RowBank lambda_b,
                                         ProjectionSource B, float* g, void* stream) {
  return with_dtype(grad_y.dtype, [&](auto t) {
    using T = decltype(t);
    const BankScaled<T> left{Dense<T>{static_cast<const T*>(grad_y.data), grad_y.stride0, grad_y.stride1, nullptr,
                                      kNoDropout},
                             lambda_b};
    return with_projection<false>(B, [&](auto right) { return run(M, rank, N, left, right, StoreF32{g, rank}, stream); });
  });
}

const char* launch_bank_products(Activation grad_y, int64_t M, int64_t N, const float* u, int64_t rank,
                                 ProjectionSource B, float* out, void* stream) {
  const Dense<float> left{u, rank, 1, nullptr, kNoDropout};
  return with_dtype(grad_y.dtype, [&](auto t) {
    using T = decltype(t);
    const MulStore<T> epi{out, static_cast<const T*>(grad_y.data), grad_y.stride0, grad_y.stride1};
    return with_projection<true>(B, [&](auto right) { return run(M, N, rank, left, right, epi, stream); });
  });
}

const char* launch_segment_sum(const float* rows, int64_t C, const int64_t* order, const int64_t* seg_start,
                               const int64_t* seg_id, int64_t num_segments, int64_t n, float* out, void* stream) {
  if (num_segments <= 0 || C <= 0) return nullptr;
  const int64_t col_blocks = (C + kThreads - 1) / kThreads;
  if (num_segments > 0x7FFFFFFFll || col_blocks > 65535) return "vera_kernels: problem too large for the CUDA grid";
  segment_sum_kernel<<<dim3(static_cast<unsigned>(num_segments), static_cast<unsigned>(col_blocks)), kThreads, 0,
                       static_cast<cudaStream_t>(stream)>>>(rows, C, order, seg_start, seg_id, n, out);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* launch_projection_tile(float* out, int64_t rows, int64_t cols, ProjectionSource src, int64_t row0,
                                   int64_t col0, void* stream) {
  const int64_t n = rows * cols;
  if (n <= 0) return nullptr;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 0x7FFFFFFFll) return "vera_kernels: tile too large";
  projection_tile_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, rows, cols, src, row0, col0);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace vera
