// Argument handling shared by the CPU and CUDA implementations of the vera_kernels ops.
//
// The op schemas (csrc/vera_ops.cpp) pass the projection as (stored tensor or None, key0, key1,
// bound) and the dropout as (key0, key1, threshold, scale); these helpers validate them once and
// turn them into the plain structs of vera_philox.h that the kernels take.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "vera_philox.h"

namespace vera {

inline uint32_t check_word(int64_t w, const char* name) {
  TORCH_CHECK(w >= 0 && w <= 0xFFFFFFFFll, "vera_kernels: ", name, " must be a uint32 word, got ", w);
  return static_cast<uint32_t>(w);
}

inline Key make_key(int64_t k0, int64_t k1, const char* name) {
  return Key{check_word(k0, name), check_word(k1, name)};
}

inline void check_float_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "vera_kernels: ", name, " must be 2-D, got ", t.dim(), "-D");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "vera_kernels: ", name,
              " must be float32, float16 or bfloat16, got ", st);
}

inline void check_fp32(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "vera_kernels: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "vera_kernels: ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.device() == like.device(), "vera_kernels: ", name, " is on ", t.device(), ", expected ",
              like.device());
}

inline void check_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& like) {
  check_fp32(t, name, 1, like);
  TORCH_CHECK(t.size(0) == n, "vera_kernels: ", name, " must have ", n, " elements, got ", t.size(0));
}

// The projection matrix `stream` (kMatrixA: [rank, >= extent]; kMatrixB: [>= extent, rank]),
// generated from (key0, key1, bound) or, when `stored` is given, loaded from that float32 matrix.
// `offset` is the global index of the layer's first column of A / first row of B (a shard's in_offset /
// out_offset); a stored matrix must cover offset + extent.
inline ProjectionSource make_source(uint32_t stream, const std::optional<at::Tensor>& stored, int64_t key0,
                                    int64_t key1, double bound, int64_t rank, int64_t extent,
                                    const at::Tensor& like, int64_t offset = 0) {
  TORCH_CHECK(rank > 0, "vera_kernels: rank must be positive, got ", rank);
  TORCH_CHECK(offset >= 0 && offset <= 0xFFFFFFFFll, "vera_kernels: ",
              (stream == kMatrixA ? "in_offset" : "out_offset"), " must be in [0, 2**32), got ", offset);
  ProjectionSource src{stream, Key{0u, 0u}, static_cast<float>(bound), nullptr, 0, 0, offset};
  if (!stored.has_value()) {
    src.key = make_key(key0, key1, "projection key");
    return src;
  }
  const at::Tensor& m = *stored;
  const char* name = stream == kMatrixA ? "stored A" : "stored B";
  check_fp32(m, name, 2, like);
  const int64_t r_dim = stream == kMatrixA ? 0 : 1;
  TORCH_CHECK(m.size(r_dim) == rank && m.size(1 - r_dim) >= offset + extent, "vera_kernels: ", name,
              " has shape ", m.sizes(), ", which does not cover ", (stream == kMatrixA ? rank : offset + extent), " x ",
              (stream == kMatrixA ? offset + extent : rank));
  src.data = m.data_ptr<float>();
  src.stride_row = m.stride(0);
  src.stride_col = m.stride(1);
  return src;
}

// bank[ids] as float32 [M, cols], zero rows where ids < 0 (the small per-row lambda_d; ATen ops, any device).
inline at::Tensor gather_bank_rows(const at::Tensor& bank, const at::Tensor& ids) {
  // masked, not multiplied by a 0/1 mask: rows with id -1 read bank row 0, which may hold inf/NaN (inf * 0 = NaN)
  return bank.index_select(0, ids.clamp_min(0)).masked_fill(ids.lt(0).unsqueeze(1), 0.0);
}

inline DropoutSpec no_dropout() { return DropoutSpec{Key{0u, 0u}, 0u, 1.0f, 0}; }

// col0: the global column of the input's first column (in_offset of a row-parallel shard).
inline DropoutSpec make_dropout(int64_t key0, int64_t key1, int64_t threshold, double scale, int64_t col0 = 0) {
  TORCH_CHECK(threshold >= 0 && threshold <= (1ll << 24), "vera_kernels: dropout threshold must be in [0, 2**24], got ",
              threshold);
  if (threshold == 0) return no_dropout();
  return DropoutSpec{make_key(key0, key1, "dropout key"), static_cast<uint32_t>(threshold),
                     static_cast<float>(scale), col0};
}

// ---- per-op shape checks (one set for the CPU and the CUDA implementations) -------------------

// ---- many adapters in one batch ------------------------------------------------------------------
// adapter_ids: int64 [M] on `like`'s device, one id per row, -1 = base layer only. With ids, each lambda
// is a bank: a contiguous float32 [n, cols] (n adapters). On CPU the ids are range-checked here. On CUDA
// they are not (reading them would synchronise the device; vk.vera_linear validates them before any op
// runs): the kernels give a row whose id is outside [0, n) the base layer only, and the lambda_d gather
// (index_select) raises a device-side assertion for ids >= n.
inline void check_ids(const std::optional<at::Tensor>& ids, int64_t M, const at::Tensor& like) {
  if (!ids.has_value()) return;
  const at::Tensor& t = *ids;
  TORCH_CHECK(t.scalar_type() == at::kLong, "vera_kernels: adapter_ids must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == M, "vera_kernels: adapter_ids must be [", M, "] (one id per row), got ",
              t.sizes());
  TORCH_CHECK(t.device() == like.device(), "vera_kernels: adapter_ids is on ", t.device(), ", expected ",
              like.device());
  TORCH_CHECK(t.is_contiguous(), "vera_kernels: adapter_ids must be contiguous");
}

inline void check_bank(const at::Tensor& t, const char* name, int64_t cols, const at::Tensor& like) {
  check_fp32(t, name, 2, like);
  TORCH_CHECK(t.size(1) == cols && t.is_contiguous(), "vera_kernels: with adapter_ids, ", name,
              " must be a contiguous bank [n, ", cols, "], got ", t.sizes());
}

// lambda as a vector [cols] (no ids) or a bank [n, cols] (ids given).
inline void check_lambda(const at::Tensor& t, const char* name, int64_t cols, const at::Tensor& like, bool bank) {
  if (bank) {
    check_bank(t, name, cols, like);
  } else {
    check_vector(t, name, cols, like);
  }
}

// The ids' range on CPU: [-1, n).
inline void check_ids_range_cpu(const at::Tensor& ids, int64_t n) {
  if (!ids.is_cpu()) return;
  const int64_t* p = ids.const_data_ptr<int64_t>();
  for (int64_t m = 0; m < ids.numel(); ++m)
    TORCH_CHECK(p[m] >= -1 && p[m] < n, "vera_kernels: adapter_ids must be in [-1, ", n, "), got ", p[m], " at row ",
                m);
}

// The adapter inputs of fused_forward and rank_grads, checked against `rows` ([M, ...], named `rows_name`):
// s float32 [M, r]; adapter_ids (if given) int64 [M]; lambda_d, lambda_b vectors [r], [N], or with ids banks
// [n, r], [n, N] of one size n, every id in [-1, n).
inline void check_adapter_inputs(const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                                 int64_t N, const std::optional<at::Tensor>& ids, const at::Tensor& rows,
                                 const char* rows_name) {
  check_fp32(s, "s", 2, rows);
  TORCH_CHECK(s.size(0) == rows.size(0), "vera_kernels: s must have ", rows_name, "'s ", rows.size(0), " rows, got ",
              s.size(0));
  check_ids(ids, rows.size(0), rows);
  const bool bank = ids.has_value();
  check_lambda(lambda_d, "lambda_d", s.size(1), rows, bank);
  check_lambda(lambda_b, "lambda_b", N, rows, bank);
  if (bank) {
    TORCH_CHECK(lambda_b.size(0) == lambda_d.size(0), "vera_kernels: lambda_d and lambda_b banks differ in size");
    check_ids_range_cpu(*ids, lambda_d.size(0));
  }
}

// x [M, K]; returns K.
inline int64_t check_shrink(const at::Tensor& x) {
  check_float_matrix(x, "x");
  return x.size(1);
}

// x [M, K], weight [N, K], bias [N], s [M, r], lambda_d [r], lambda_b [N] (all on x's device).
inline void check_expand(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                         const std::optional<at::Tensor>& ids = std::nullopt) {
  check_float_matrix(x, "x");
  check_float_matrix(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.size(1) == x.size(1) && weight.device() == x.device(),
              "vera_kernels: weight must be [N, K] like x [M, K] (same dtype and device), got ", weight.sizes(), " ",
              weight.scalar_type(), " for x ", x.sizes(), " ", x.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "vera_kernels: bias must be [N] in x's dtype, got ", bias->sizes(), " ", bias->scalar_type());
  }
  check_adapter_inputs(s, lambda_d, lambda_b, weight.size(0), ids, x, "x");
}

// grad_y [M, N], s [M, r], lambda_d [r], lambda_b [N].
inline void check_rank_grads(const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& lambda_d,
                                   const at::Tensor& lambda_b,
                                   const std::optional<at::Tensor>& ids = std::nullopt) {
  check_float_matrix(grad_y, "grad_y");
  check_adapter_inputs(s, lambda_d, lambda_b, grad_y.size(1), ids, grad_y, "grad_y");
}

// grad_y [M, N], weight [N, K], g [M, r], lambda_d [r].
inline void check_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& g,
                             const at::Tensor& lambda_d,
                             const std::optional<at::Tensor>& ids = std::nullopt) {
  check_float_matrix(grad_y, "grad_y");
  check_float_matrix(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == grad_y.scalar_type() && weight.size(0) == grad_y.size(1) &&
                  weight.device() == grad_y.device(),
              "vera_kernels: weight must be [N, K] with grad_y [M, N] (same dtype and device), got ", weight.sizes(),
              " for grad_y ", grad_y.sizes());
  check_fp32(g, "g", 2, grad_y);
  TORCH_CHECK(g.size(0) == grad_y.size(0), "vera_kernels: g must have grad_y's rows");
  check_ids(ids, grad_y.size(0), grad_y);
  check_lambda(lambda_d, "lambda_d", g.size(1), grad_y, ids.has_value());
  if (ids.has_value()) check_ids_range_cpu(*ids, lambda_d.size(0));
}

// projection_tile(out, stream, row0, col0, key0, key1, bound): out contiguous float32 [rows, cols].
inline ProjectionSource check_projection_tile(const at::Tensor& out, int64_t stream, int64_t row0, int64_t col0,
                                              int64_t key0, int64_t key1, double bound) {
  TORCH_CHECK(stream == kMatrixA || stream == kMatrixB, "vera_kernels: stream must be 0 (A) or 1 (B), got ", stream);
  TORCH_CHECK(row0 >= 0 && col0 >= 0, "vera_kernels: row0 and col0 must be non-negative");
  check_fp32(out, "out", 2, out);
  TORCH_CHECK(out.is_contiguous(), "vera_kernels: out must be contiguous");
  return ProjectionSource{static_cast<uint32_t>(stream), make_key(key0, key1, "projection key"),
                          static_cast<float>(bound), nullptr, 0, 0, 0};
}

}  // namespace vera
