// Philox4x32-10 and the VeRA projection / dropout element generators (docs/DESIGN.md §2).
//
// The one place the generator is written: included by the CPU sources (g++) and the CUDA
// sources (nvcc), where every function is __host__ __device__. Plain C++ only: no ATen, no CUDA
// runtime headers, so the .cu files that include it compile without ATen's CUDA headers.
//
// Element (i, j) of stream m (0 = A [r, K_max], 1 = B [N_max, r], 2 = dropout on the flattened
// input) is word (j & 3) of Philox4x32-10(counter = (j >> 2, i, m, 0), key = (k0, k1)), with the
// key taken from a 64-bit seed as (seed mod 2**32, seed >> 32). Indices are truncated to 32 bits
// exactly like the reference generator (vera_kernels/projection.py).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define VERA_HD __host__ __device__ __forceinline__
#else
#define VERA_HD inline
#endif

namespace vera {

enum Stream : uint32_t { kMatrixA = 0, kMatrixB = 1, kDropout = 2 };

// A Philox key: two uint32 words of a 64-bit seed.
struct Key {
  uint32_t k0;
  uint32_t k1;
};

VERA_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // key bumps
constexpr int kPhiloxRounds = 10;

// One Philox4x32 round on the counter words (c0, c1, c2, c3) with round key (k0, k1).
VERA_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(kPhiloxM0, c0, hi0, lo0);
  mulhilo32(kPhiloxM1, c2, hi1, lo1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Random123's Philox4x32-10; c is the counter on entry and the output on return.
VERA_HD void philox4x32_10(uint32_t c[4], Key key) {
  uint32_t k0 = key.k0, k1 = key.k1;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    philox_round(c[0], c[1], c[2], c[3], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The four words of stream `stream` at row `row`, columns 4*quad .. 4*quad + 3.
VERA_HD void philox_quad(uint32_t stream, int64_t row, int64_t quad, Key key, uint32_t out[4]) {
  out[0] = static_cast<uint32_t>(quad);
  out[1] = static_cast<uint32_t>(row);
  out[2] = stream;
  out[3] = 0u;
  philox4x32_10(out, key);
}

// (w >> 9) * 2**-22 - 1 + 2**-23: every step is exact in float32, the result lies in (-1, 1).
VERA_HD float unit_float(uint32_t w) {
  const float u = static_cast<float>(w >> 9) * 2.384185791015625e-07f;  // 2**-22
  return (u - 1.0f) + 1.1920928955078125e-07f;                           // 2**-23
}

// A projection value: one float32 rounding of unit * bound.
VERA_HD float projection_value(uint32_t w, float bound) { return unit_float(w) * bound; }

// Dropout keeps an element iff (w >> 8) >= threshold, threshold = ceil(p * 2**24) (0: keep all).
VERA_HD bool dropout_keep(uint32_t w, uint32_t threshold) { return (w >> 8) >= threshold; }

// One element of stream `stream` (generated alone: the three sibling words are discarded).
VERA_HD uint32_t philox_word(uint32_t stream, int64_t row, int64_t col, Key key) {
  uint32_t w[4];
  philox_quad(stream, row, col >> 2, key, w);
  return w[col & 3];
}

// Words of `stream` at `row`, columns col .. col + 3 (any col, not only multiples of 4): one Philox call
// when col is aligned, else one per word (the quad straddles two calls).
VERA_HD void philox_words4(uint32_t stream, int64_t row, int64_t col, Key key, uint32_t out[4]) {
  if ((col & 3) == 0) {
    philox_quad(stream, row, col >> 2, key, out);
    return;
  }
  for (int l = 0; l < 4; ++l) out[l] = philox_word(stream, row, col + l, key);
}

// Where a projection's values come from: generated from a key, or loaded from a stored float32
// matrix (Projection.from_tensors) with element (i, j) at data[i * stride_row + j * stride_col].
// `offset` is the global index of the layer's first column of A (stream A) or first row of B
// (stream B): a tensor-parallel shard reads exactly its slice of the global matrix.
struct ProjectionSource {
  uint32_t stream;  // kMatrixA or kMatrixB
  Key key;
  float bound;
  const float* data;  // nullptr: generate
  int64_t stride_row;
  int64_t stride_col;
  int64_t offset;

  VERA_HD bool generated() const { return data == nullptr; }
};

// Adapter-input dropout of one call: key from the per-call seed, threshold, scale = 1 / (1 - p).
// threshold == 0 means no dropout (every element kept, scale 1). `col0` is the global column of the
// input's first column (a row-parallel shard's in_offset), so a shard draws its columns of the whole mask.
struct DropoutSpec {
  Key key;
  uint32_t threshold;
  float scale;
  int64_t col0;

  VERA_HD bool active() const { return threshold != 0u; }
};

}  // namespace vera
