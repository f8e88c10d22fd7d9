// Host launchers of the CUDA kernels (vera_cuda_kernels.cu), called by the ATen binding (vera_cuda.cpp).
//
// Plain C++: raw pointers, strides in elements, the stream as void* (a cudaStream_t), so neither side
// needs the other's headers -- the .cu file compiles with nvcc and the CUDA runtime headers alone.
// Every launcher returns nullptr on success or the CUDA error string. Output buffers are written
// in full ("store" launchers) or updated in place ("add" launchers: they hold the base product).
#pragma once

#include <stdint.h>

#include "../vera_philox.h"

namespace vera {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A 2-D activation in x's dtype: element (i, j) at data[i * stride0 + j * stride1].
struct Activation {
  const void* data;
  DType dtype;
  int64_t stride0;
  int64_t stride1;
};

// s [M, rank] (contiguous float32) = (x * mask * scale) A_K^T, x = [M, K].
const char* launch_shrink(Activation x, int64_t M, int64_t K, ProjectionSource A, int64_t rank, DropoutSpec drop,
                          float* s, void* stream);

// y [M, N] (holding x W^T + bias, y's dtype, strides sy0/sy1) += lambda_b * ((lambda_d * s) B_N^T).
const char* launch_fused_forward(void* y, DType dtype, int64_t sy0, int64_t sy1, int64_t M, int64_t N, const float* s,
                              int64_t rank, const float* lambda_d, const float* lambda_b, ProjectionSource B,
                              void* stream);

// g [M, rank] = (grad_y * lambda_b) B_N; when grad_lambda_b is not null (zero-filled, [N]) it also
// receives rowsum(B_N * (grad_y^T (lambda_d * s))).
const char* launch_rank_grads(Activation grad_y, int64_t M, int64_t N, const float* s, int64_t rank,
                                    const float* lambda_d, const float* lambda_b, ProjectionSource B, float* g,
                                    float* grad_lambda_b, void* stream);

// grad_x [M, K] (holding grad_y W) += mask * scale * ((g * lambda_d) A_K).
const char* launch_grad_input_add(void* grad_x, DType dtype, int64_t sx0, int64_t sx1, int64_t M, int64_t K,
                                  const float* g, int64_t rank, const float* lambda_d, ProjectionSource A,
                                  DropoutSpec drop, void* stream);

// ---- many adapters in one batch ---------------------------------------------------------------------
// A bank of per-adapter vectors: row m of a batch uses bank[ids[m] * ld + j]; a row whose id is outside
// [0, n) (-1: base layer only) has no adapter.
struct RowBank {
  const float* bank;  // contiguous [n, ld]
  int64_t ld;
  const int64_t* ids;  // [M]
  int64_t n;
};

// y [M, N] (holding x W^T + bias) += lambda_b[ids[m]] * (u B_N^T), u [M, rank] contiguous float32 (the
// rows of s already scaled by their lambda_d); rows without adapter are left as they are.
const char* launch_fused_forward_bank(void* y, DType dtype, int64_t sy0, int64_t sy1, int64_t M, int64_t N,
                                   const float* u, int64_t rank, RowBank lambda_b, ProjectionSource B, void* stream);

// g [M, rank] = (grad_y * lambda_b[ids[m]]) B_N (zero rows for rows without adapter).
const char* launch_rank_grads_bank(Activation grad_y, int64_t M, int64_t N, int64_t rank, RowBank lambda_b,
                                         ProjectionSource B, float* g, void* stream);

// out [M, N] (contiguous float32) = grad_y * (u B_N^T): each row's contribution to the lambda_b gradient.
const char* launch_bank_products(Activation grad_y, int64_t M, int64_t N, const float* u, int64_t rank,
                                 ProjectionSource B, float* out, void* stream);

// out[seg_id[k], :] = sum of rows[order[i], :] for i in [seg_start[k], seg_start[k + 1]), in that order
// (deterministic: one thread per output element, no atomics); segments whose id is outside [0, n) are
// skipped. rows [M, C] and out [n, C] contiguous float32; out's other rows are left as they are.
const char* launch_segment_sum(const float* rows, int64_t C, const int64_t* order, const int64_t* seg_start,
                               const int64_t* seg_id, int64_t num_segments, int64_t n, float* out, void* stream);

// out [rows, cols] (contiguous float32) = rows [row0, ..) x cols [col0, ..) of a generated projection.
const char* launch_projection_tile(float* out, int64_t rows, int64_t cols, ProjectionSource src, int64_t row0,
                                   int64_t col0, void* stream);

}  // namespace cuda
}  // namespace vera
