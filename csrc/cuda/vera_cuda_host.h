// The host logic of the "cuda" backend: the four ops in ATen calls plus the element-wise kernels of
// vera_cuda_kernels.h (docs/DESIGN.md §7, "the CUDA fallback").
//
// Every adapter product is one GEMM through ATen (cuBLAS on the GPU): the layer's slices A_K [r, K] and
// B_N [N, r] are written once, in the input dtype, by the Philox kernel (bit-exact, docs/DESIGN.md §2) into
// a small cache, and the products x A_K^T, (lambda_d s) B_N^T, (gy lambda_b) B_N, gy^T (lambda_d s) and
// (g lambda_d) A_K run on the tensor cores for 16-bit inputs (float32 accumulate and output) and as
// torch.get_float32_matmul_precision() says for float32 ones. The vectors are applied in float32 before a
// product (its float32 operand is then rounded to the input dtype, float16 after a power-of-two scaling
// that keeps it in range, see `operand`) or after it (one element-wise epilogue adds lambda_b * (...) onto
// the base product). No float atomics: the lambda gradients are ATen reductions or, for banks, a row sum
// per adapter in a fixed order.
//
// Built into the extension by vera_cuda.cpp (which adds the device guard and the stream) and, for the
// tests, into a CPU library whose launchers run the same functors on the host.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/bitwise_left_shift.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/frexp.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/zeros.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "../vera_ops.h"
#include "vera_cuda_kernels.h"

namespace vera {
namespace cuda {

// Where a call runs: its stream, and whether projection slices may be kept across calls (not while a CUDA
// graph is captured: the graph would hold memory the cache may free).
struct Env {
  void* stream;
  bool may_cache;
};

inline void check_launch(const char* err) { TORCH_CHECK(err == nullptr, "vera_kernels CUDA kernel failed: ", err); }

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "vera_kernels: unsupported dtype ", t.scalar_type());
  }
}

inline Activation activation(const at::Tensor& t) {
  return Activation{t.const_data_ptr(), dtype_of(t), t.stride(0), t.stride(1)};
}

inline RowBank row_bank(const at::Tensor& bank, const at::Tensor& ids) {
  return RowBank{bank.const_data_ptr<float>(), bank.size(1), ids.const_data_ptr<int64_t>(), bank.size(0)};
}

inline const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// a @ b with a float32 result. 16-bit operands: one GEMM with float32 accumulate and output (mm's
// out_dtype, CUDA only; on CPU the same exact products in float32). float32 operands: at::mm.
inline at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm(a, b);
  if (a.is_cuda()) return at::mm(a, b, at::kFloat);
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

// A float32 matrix `v` as a GEMM operand of dtype `od`, and the factor (undefined: 1) to multiply the
// product by. float32 and bfloat16 (float32's exponent range) take v as it is, bfloat16 rounded once.
// float16 first divides each row (reduce_dim 1) or column (reduce_dim 0) by the power of two just above
// its largest magnitude, so a lambda far from 1 never overflows or underflows the operand; the exact
// factor is applied to the float32 product.
struct Operand {
  at::Tensor value;
  at::Tensor scale;
};

inline Operand operand(const at::Tensor& v, at::ScalarType od, int64_t reduce_dim) {
  if (od != at::kHalf || v.numel() == 0) return Operand{v.to(od), at::Tensor()};
  const at::Tensor amax = v.abs().amax({reduce_dim}, /*keepdim=*/true);
  const at::Tensor expo = std::get<1>(at::frexp(amax));  // amax < 2**expo (frexp(0) = (0, 0))
  // 2**expo built from its bits: exact, normal (expo clamped to [-126, 127])
  const at::Tensor scale = at::bitwise_left_shift(expo.clamp(-126, 127).add(127), 23).view(at::kFloat);
  return Operand{v.div(scale).to(od), scale};
}

inline at::Tensor scaled(at::Tensor product, const at::Tensor& scale) {
  return scale.defined() ? product.mul_(scale) : product;
}

// ---- the projection slices -----------------------------------------------------------------------

// Generated projections written by launch_materialize, per (device, stream, matrix, key, bound, rank,
// dtype): one buffer each, grown to the widest slice asked for (columns of A, rows of B, from global index
// 0), so every layer of a model reads the same two buffers. At most kMaxEntries are kept (least recently
// used out). A buffer is only ever used on the stream that wrote it, so the caching allocator's stream
// rule holds without synchronisation. Never destroyed (no CUDA calls at process exit).
class SliceCache {
 public:
  struct Key {
    int64_t device;
    void* stream;
    uint32_t matrix, k0, k1, bound_bits;
    int64_t rank;
    int64_t dtype;

    bool operator==(const Key& o) const {
      return device == o.device && stream == o.stream && matrix == o.matrix && k0 == o.k0 && k1 == o.k1 &&
             bound_bits == o.bound_bits && rank == o.rank && dtype == o.dtype;
    }
  };
  static constexpr size_t kMaxEntries = 8;

  // The buffer of `key` covering global indices [0, need), made (or regrown) by make(width).
  template <class Make>
  at::Tensor get(const Key& key, int64_t need, Make make) {
    const std::lock_guard<std::mutex> lock(mutex_);
    ++clock_;
    for (Entry& e : entries_) {
      if (!(e.key == key)) continue;
      if (e.width < need) {
        e.value = make(need);
        e.width = need;
      }
      e.used = clock_;
      return e.value;
    }
    if (entries_.size() >= kMaxEntries) {
      size_t oldest = 0;
      for (size_t i = 1; i < entries_.size(); ++i)
        if (entries_[i].used < entries_[oldest].used) oldest = i;
      entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(oldest));
    }
    entries_.push_back(Entry{key, make(need), need, clock_});
    return entries_.back().value;
  }

  size_t size() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
  }

 private:
  struct Entry {
    Key key;
    at::Tensor value;
    int64_t width;
    uint64_t used;
  };
  std::mutex mutex_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
};

inline SliceCache& slice_cache() {
  static SliceCache* cache = new SliceCache();  // leaked on purpose: see SliceCache
  return *cache;
}

// The layer's A_K ([rank, extent], matrix A) or B_N ([extent, rank], matrix B) in dtype `od` on like's
// device, starting at global index src.offset: a slice of the stored matrix (rounded to od), or of the
// cached generated one (generated per call while a graph is captured).
inline at::Tensor projection_operand(const std::optional<at::Tensor>& stored, const ProjectionSource& src,
                                     int64_t rank, int64_t extent, at::ScalarType od, const at::Tensor& like,
                                     const Env& env) {
  const bool is_a = src.stream == kMatrixA;
  const int64_t dim = is_a ? 1 : 0;
  if (stored.has_value()) return stored->narrow(dim, src.offset, extent).to(od);
  auto make = [&](int64_t start, int64_t width) {
    const std::vector<int64_t> shape = is_a ? std::vector<int64_t>{rank, width} : std::vector<int64_t>{width, rank};
    at::Tensor t = at::empty(shape, like.options().dtype(od));
    check_launch(launch_materialize(t.mutable_data_ptr(), dtype_of(t), t.size(0), t.size(1), src, is_a ? 0 : start,
                                    is_a ? start : 0, env.stream));
    return t;
  };
  if (!env.may_cache) return make(src.offset, extent);
  uint32_t bound_bits;
  std::memcpy(&bound_bits, &src.bound, sizeof bound_bits);
  const SliceCache::Key key{like.device().index(), env.stream, src.stream, src.key.k0, src.key.k1, bound_bits,
                            rank, static_cast<int64_t>(od)};
  const at::Tensor full = slice_cache().get(key, src.offset + extent, [&](int64_t width) { return make(0, width); });
  return full.narrow(dim, src.offset, extent);
}

// ---- many adapters: deterministic sums per bank row -------------------------------------------------

// The batch rows of each bank row k, in row order: rows order[start[k]] .. order[start[k + 1] - 1]
// (a stable sort of the ids and a searchsorted of 0 .. n: no host synchronisation).
struct Segments {
  at::Tensor order, start;
};

inline Segments segments_of(const at::Tensor& ids, int64_t n) {
  const auto sorted = ids.sort(std::optional<bool>(true), 0, false);
  const at::Tensor start = at::searchsorted(std::get<0>(sorted), at::arange(n + 1, ids.options()));
  return Segments{std::get<1>(sorted).contiguous(), start.contiguous()};
}

// [n, C]: row k is the sum of the rows of `rows` ([M, C] float32) whose id is k (zero if none).
inline at::Tensor bank_reduce(const at::Tensor& rows, const Segments& seg, int64_t n, const Env& env) {
  const at::Tensor r = rows.contiguous();
  at::Tensor out = at::empty({n, r.size(1)}, r.options());
  check_launch(launch_segment_sum(r.const_data_ptr<float>(), r.size(1), seg.order.const_data_ptr<int64_t>(),
                                  seg.start.const_data_ptr<int64_t>(), n, out.mutable_data_ptr<float>(), env.stream));
  return out;
}

// ---- the ops (schemas in csrc/vera_ops.cpp; checks shared with the CPU ops in vera_ops.h) ------------

inline at::Tensor shrink(const at::Tensor& x, const std::optional<at::Tensor>& A, int64_t rank, int64_t key0,
                         int64_t key1, double bound, int64_t drop_key0, int64_t drop_key1, int64_t drop_threshold,
                         double drop_scale, int64_t in_offset, const Env& env) {
  const int64_t K = check_shrink(x);
  const ProjectionSource src = make_source(kMatrixA, A, key0, key1, bound, rank, K, x, in_offset);
  const DropoutSpec drop = make_dropout(drop_key0, drop_key1, drop_threshold, drop_scale, in_offset);
  const at::Tensor a = projection_operand(A, src, rank, K, x.scalar_type(), x, env);  // [rank, K]
  if (!drop.active()) return mm_f32(x, a.t());
  // the mask zeroes elements (exact in any dtype); its scale multiplies the float32 product
  at::Tensor kept = at::empty({x.size(0), K}, x.options());
  check_launch(launch_dropout_apply(activation(x), x.size(0), K, drop, kept.mutable_data_ptr(), env.stream));
  return mm_f32(kept, a.t()).mul_(drop.scale);
}

inline at::Tensor fused_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                                const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound,
                                int64_t out_offset, const std::optional<at::Tensor>& adapter_ids, const Env& env) {
  check_expand(x, weight, bias, s, lambda_d, lambda_b, adapter_ids);
  const int64_t N = weight.size(0), rank = s.size(1);
  const ProjectionSource src = make_source(kMatrixB, B, key0, key1, bound, rank, N, x, out_offset);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  const at::Tensor b = projection_operand(B, src, rank, N, x.scalar_type(), x, env);  // [N, rank]
  const bool bank = adapter_ids.has_value();
  // t = (lambda_d * s) B_N^T, float32 [M, N]; the epilogue adds lambda_b * t onto x W^T + bias
  const Operand u = operand(s.mul(bank ? gather_bank_rows(lambda_d, *adapter_ids) : lambda_d), x.scalar_type(), 1);
  const at::Tensor t = mm_f32(u.value, b.t()).contiguous();
  const at::Tensor lb = lambda_b.contiguous();
  const AddScaled f{t.const_data_ptr<float>(), data_or_null(u.scale), bank ? nullptr : lb.const_data_ptr<float>(),
                    bank ? row_bank(lb, *adapter_ids) : RowBank{nullptr, 0, nullptr, 0}, no_dropout()};
  check_launch(launch_add_scaled(y.mutable_data_ptr(), dtype_of(y), y.stride(0), y.stride(1), y.size(0), N, f,
                                 env.stream));
  return y;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_grads(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
    const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound, bool need_lambda_b,
    int64_t out_offset, const std::optional<at::Tensor>& adapter_ids, const Env& env) {
  check_rank_grads(grad_y, s, lambda_d, lambda_b, adapter_ids);
  const int64_t N = grad_y.size(1), rank = s.size(1);
  const at::ScalarType od = grad_y.scalar_type();
  const ProjectionSource src = make_source(kMatrixB, B, key0, key1, bound, rank, N, grad_y, out_offset);
  const at::Tensor b = projection_operand(B, src, rank, N, od, grad_y, env);  // [N, rank]
  const bool bank = adapter_ids.has_value();
  const at::Tensor lb = bank ? gather_bank_rows(lambda_b, *adapter_ids) : lambda_b;  // [M, N] or [N]
  const at::Tensor ld = bank ? gather_bank_rows(lambda_d, *adapter_ids) : lambda_d;  // [M, r] or [r]
  const Operand v = operand(grad_y.mul(lb), od, 1);  // grad_y * lambda_b in float32, then the operand
  const at::Tensor g = scaled(mm_f32(v.value, b), v.scale);  // [M, r]
  const at::Tensor empty = at::zeros({0}, s.options());
  if (!bank) {
    const at::Tensor grad_d = s.mul(g).sum(0);
    if (!need_lambda_b) return {g, grad_d, empty};
    // grad_lambda_b = rowsum(B_N * (grad_y^T (lambda_d * s))): an [N, r] product whatever M is
    const Operand u = operand(s.mul(ld), od, 0);
    const at::Tensor p = scaled(mm_f32(grad_y.t(), u.value), u.scale);
    return {g, grad_d, p.mul_(b).sum(1)};
  }
  const int64_t n = lambda_d.size(0);
  const Segments seg = segments_of(*adapter_ids, n);
  const at::Tensor grad_d = bank_reduce(s.mul(g), seg, n, env);
  if (!need_lambda_b) return {g, grad_d, empty};
  // each row's grad_y * ((lambda_d[id] * s) B_N^T), summed per adapter
  const Operand u = operand(s.mul(ld), od, 1);
  const at::Tensor rows = scaled(mm_f32(u.value, b.t()), u.scale).mul_(grad_y);
  return {g, grad_d, bank_reduce(rows, seg, n, env)};
}

inline at::Tensor grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& g,
                             const at::Tensor& lambda_d, const std::optional<at::Tensor>& A, int64_t key0,
                             int64_t key1, double bound, int64_t drop_key0, int64_t drop_key1, int64_t drop_threshold,
                             double drop_scale, int64_t in_offset, const std::optional<at::Tensor>& adapter_ids,
                             const Env& env) {
  check_grad_input(grad_y, weight, g, lambda_d, adapter_ids);
  const int64_t K = weight.size(1), rank = g.size(1);
  const ProjectionSource src = make_source(kMatrixA, A, key0, key1, bound, rank, K, grad_y, in_offset);
  at::Tensor grad_x = at::mm(grad_y, weight);
  const at::Tensor a = projection_operand(A, src, rank, K, grad_y.scalar_type(), grad_y, env);  // [rank, K]
  const at::Tensor ld = adapter_ids.has_value() ? gather_bank_rows(lambda_d, *adapter_ids) : lambda_d;
  const Operand v = operand(g.mul(ld), grad_y.scalar_type(), 1);
  const at::Tensor t = mm_f32(v.value, a).contiguous();  // [M, K]; the epilogue applies mask * scale
  const AddScaled f{t.const_data_ptr<float>(), data_or_null(v.scale), nullptr, RowBank{nullptr, 0, nullptr, 0},
                    make_dropout(drop_key0, drop_key1, drop_threshold, drop_scale, in_offset)};
  check_launch(launch_add_scaled(grad_x.mutable_data_ptr(), dtype_of(grad_x), grad_x.stride(0), grad_x.stride(1),
                                 grad_x.size(0), K, f, env.stream));
  return grad_x;
}

// tests only: out (contiguous float32) = a generated tile of matrix `stream` from global (row0, col0).
inline void projection_tile(at::Tensor& out, int64_t stream, int64_t row0, int64_t col0, int64_t key0, int64_t key1,
                            double bound, const Env& env) {
  const ProjectionSource src = check_projection_tile(out, stream, row0, col0, key0, key1, bound);
  check_launch(launch_materialize(out.mutable_data_ptr(), DType::kFloat32, out.size(0), out.size(1), src, row0, col0,
                                  env.stream));
}

}  // namespace cuda
}  // namespace vera
