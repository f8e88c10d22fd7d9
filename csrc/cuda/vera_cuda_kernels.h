// The CUDA kernels of the "cuda" backend (vera_cuda_kernels.cu) and the element-wise functors they run.
//
// The adapter's products are cuBLAS GEMMs issued through ATen by the host logic (vera_cuda_host.h); what
// is left to our own kernels is element-wise: writing a slice of A or B in a given dtype (the Philox
// generator of vera_philox.h), zeroing the dropped elements of an activation, the epilogue that adds the
// scaled rank product onto the base product, and the deterministic per-adapter row sums of the bank
// gradients. Plain C++ here: raw pointers, strides in elements, the stream as void* (a cudaStream_t), so
// the .cu file compiles with nvcc and the CUDA runtime headers alone, and the functors (VERA_HD) also
// compile for the host (tests/test_cuda_host_logic.py runs the host logic on CPU with them).
// Every launcher returns nullptr on success or the CUDA error string.
#pragma once

#include <stdint.h>

#include "../vera_philox.h"

namespace vera {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A 2-D activation in its own dtype: element (i, j) at data[i * stride0 + j * stride1].
struct Activation {
  const void* data;
  DType dtype;
  int64_t stride0;
  int64_t stride1;
};

// A bank of per-adapter vectors: row m of a batch uses bank[ids[m] * ld + j]; a row whose id is outside
// [0, n) (-1: base layer only) has no adapter. bank == nullptr: no bank.
struct RowBank {
  const float* bank;  // contiguous [n, ld]
  int64_t ld;
  const int64_t* ids;  // [M]
  int64_t n;

  VERA_HD const float* row(int64_t m) const {
    const int64_t id = ids[m];
    return (id < 0 || id >= n) ? nullptr : bank + id * ld;
  }
};

// ---- launch geometry ------------------------------------------------------------------------------
// Every kernel is element-wise over quads (4 neighbouring columns of one row: one Philox call), one quad
// per thread, in small blocks so that even a decode-sized problem spreads over every SM (M = 16 rows of
// 4096 columns: 16384 quads, 256 blocks); a grid-stride loop covers what the block cap leaves.
constexpr int kThreads = 64;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

struct Grid {
  int64_t blocks;
  int threads;
};

inline int64_t quads_of(int64_t rows, int64_t cols) { return rows * ((cols + 3) / 4); }

inline Grid elementwise_grid(int64_t rows, int64_t cols) {
  const int64_t quads = quads_of(rows, cols);
  int64_t blocks = (quads + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return Grid{blocks, kThreads};
}

// ---- element-wise functors (shared by the kernels and the host test build) ------------------------

// out[m, n] += col(n) * row_scale[m] * keep(m, n) * drop.scale * t[m, n], for the 4 columns n .. n + 3
// below N; col(n) = bank.row(m)[n] with a bank (a row without adapter is left as it is), else
// col_scale[n] (nullable: 1). All in float32; `v` holds the 4 values of `out` as float32.
struct AddScaled {
  const float* t;  // contiguous [M, N]
  const float* row_scale;  // [M] or null
  const float* col_scale;  // [N] or null
  RowBank bank;
  DropoutSpec drop;

  VERA_HD void apply4(int64_t m, int64_t n, int64_t N, float v[4]) const {
    const float* cs = col_scale;
    if (bank.bank != nullptr) {
      cs = bank.row(m);
      if (cs == nullptr) return;
    }
    const float rs = row_scale != nullptr ? row_scale[m] : 1.0f;
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    if (drop.active()) philox_words4(kDropout, m, drop.col0 + n, drop.key, w);
    for (int l = 0; l < 4 && n + l < N; ++l) {
      float a = t[m * N + n + l] * rs;
      if (cs != nullptr) a *= cs[n + l];
      if (drop.active()) a = dropout_keep(w[l], drop.threshold) ? a * drop.scale : 0.0f;
      v[l] += a;
    }
  }
};

// Which of the 4 elements (m, n .. n + 3) of the adapter input the dropout keeps.
VERA_HD void dropout_keep4(const DropoutSpec& drop, int64_t m, int64_t n, bool keep[4]) {
  uint32_t w[4];
  philox_words4(kDropout, m, drop.col0 + n, drop.key, w);
  for (int l = 0; l < 4; ++l) keep[l] = dropout_keep(w[l], drop.threshold);
}

// The 4 values (i, j .. j + 3) of a generated projection slice whose element (0, 0) is global (row0, col0).
VERA_HD void projection_values4(const ProjectionSource& src, int64_t row0, int64_t col0, int64_t i, int64_t j,
                                float v[4]) {
  uint32_t w[4];
  philox_words4(src.stream, row0 + i, col0 + j, src.key, w);
  for (int l = 0; l < 4; ++l) v[l] = projection_value(w[l], src.bound);
}

// ---- launchers --------------------------------------------------------------------------------------

// out [rows, cols] (contiguous, `dtype`) = rows [row0, ..) x columns [col0, ..) of the generated
// projection `src`, each float32 value rounded once to `dtype`.
const char* launch_materialize(void* out, DType dtype, int64_t rows, int64_t cols, ProjectionSource src,
                               int64_t row0, int64_t col0, void* stream);

// out [M, K] (contiguous, x's dtype) = x where the dropout keeps the element, else 0 (no scaling).
const char* launch_dropout_apply(Activation x, int64_t M, int64_t K, DropoutSpec drop, void* out, void* stream);

// out [M, N] (out's dtype, strides s0/s1, holding the base product) = dtype(float(out) + AddScaled).
const char* launch_add_scaled(void* out, DType dtype, int64_t s0, int64_t s1, int64_t M, int64_t N,
                              const AddScaled& f, void* stream);

// out[k, :] = sum of rows[order[i], :] for i in [start[k], start[k + 1]), in that order, for k in [0, n)
// (deterministic: one thread per output element, no atomics). rows [M, C], out [n, C] contiguous float32.
const char* launch_segment_sum(const float* rows, int64_t C, const int64_t* order, const int64_t* start, int64_t n,
                               float* out, void* stream);

// Whether `stream` is capturing a CUDA graph (then nothing may be cached across calls).
bool stream_is_capturing(void* stream);

}  // namespace cuda
}  // namespace vera
