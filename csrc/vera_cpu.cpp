// CPU implementations of the vera_kernels ops (DESIGN.md §1, §4).
//
// Every adapter product has the shape "activation [M, C] times the projection oriented [rank, C]"
// (C = K for A, C = N for B). The projection is generated one column tile at a time (OpenMP over
// rows x column segments, Philox vectorised across quads); each tile is generated once per call and
// reused by every row of the input, its products run through ATen's BLAS in float32, and the
// element-wise steps around them (fp32 conversion with the dropout mask, the epilogue that adds the
// expansion onto the base product and casts) are OpenMP loops over rows with vectorisable inner loops.
// Nothing of size rank x C is ever allocated: at most one tile (kTileFloats) and one chunk of rows.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "vera_ops.h"

namespace vera {

// Philox words of `stream` at `row`, columns [col0, col0 + n) into out[0, n). The aligned middle runs
// kLanes Philox calls side by side (one array per counter word, so the rounds vectorise across calls;
// an AVX2 clone is dispatched at load time on x86-64); the unaligned ends go one word at a time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void philox_row(uint32_t stream, int64_t row, int64_t col0, int64_t n, Key key, uint32_t* out) {
  constexpr int kLanes = 8;
  const int64_t end = col0 + n;
  int64_t c = col0;
  for (; c < end && (c & 3); ++c) out[c - col0] = philox_word(stream, row, c, key);
  int64_t q = c >> 2;
  const int64_t q_end = end >> 2;
  uint32_t* o = out + (c - col0);
  for (; q + kLanes <= q_end; q += kLanes, o += 4 * kLanes) {
    uint32_t w0[kLanes], w1[kLanes], w2[kLanes], w3[kLanes];
    for (int v = 0; v < kLanes; ++v) {
      w0[v] = static_cast<uint32_t>(q + v);
      w1[v] = static_cast<uint32_t>(row);
      w2[v] = stream;
      w3[v] = 0u;
    }
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      for (int v = 0; v < kLanes; ++v) philox_round(w0[v], w1[v], w2[v], w3[v], k0, k1);
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int v = 0; v < kLanes; ++v) {
      o[4 * v] = w0[v];
      o[4 * v + 1] = w1[v];
      o[4 * v + 2] = w2[v];
      o[4 * v + 3] = w3[v];
    }
  }
  for (; q < q_end; ++q, o += 4) philox_quad(stream, row, q, key, o);
  for (c = std::max(c, q_end * 4); c < end; ++c) out[c - col0] = philox_word(stream, row, c, key);
}

namespace {

constexpr int64_t kTileFloats = 1 << 18;   // one generated projection tile (1 MiB)
constexpr int64_t kChunkFloats = 1 << 20;  // one float32 chunk of activations (4 MiB)
constexpr int64_t kSegment = 1024;         // columns per parallel work item when generating

// Rows [row0, row0 + nrows) x columns [col0, col0 + ncols) of a generated projection, row-major.
void generate_tile(const ProjectionSource& src, int64_t row0, int64_t nrows, int64_t col0, int64_t ncols,
                   float* out) {
  const int64_t segs = (ncols + kSegment - 1) / kSegment;
  at::parallel_for(0, nrows * segs, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(std::min(ncols, kSegment));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / segs, c = (item % segs) * kSegment;
      const int64_t n = std::min(kSegment, ncols - c);
      philox_row(src.stream, row0 + i, col0 + c, n, src.key, words.data());
      float* o = out + i * ncols + c;
      for (int64_t j = 0; j < n; ++j) o[j] = projection_value(words[j], src.bound);
    }
  });
}

// Rows are handed to threads in blocks of about this many elements.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// out[m, j] = float(in[m0 + m, c0 + j]) (times keep * scale under dropout), out row-major [mb, cb].
template <typename scalar_t>
void load_chunk(const at::Tensor& in, int64_t m0, int64_t mb, int64_t c0, int64_t cb, const DropoutSpec& drop,
                float* out) {
  const scalar_t* base = in.const_data_ptr<scalar_t>();
  const int64_t s0 = in.stride(0), s1 = in.stride(1);
  at::parallel_for(0, mb, row_grain(cb), [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(drop.active() ? cb : 0);
    for (int64_t m = begin; m < end; ++m) {
      const scalar_t* src = base + (m0 + m) * s0 + c0 * s1;
      float* o = out + m * cb;
      for (int64_t j = 0; j < cb; ++j) o[j] = static_cast<float>(src[j * s1]);
      if (!drop.active()) continue;
      philox_row(kDropout, m0 + m, c0, cb, drop.key, words.data());
      for (int64_t j = 0; j < cb; ++j) o[j] = dropout_keep(words[j], drop.threshold) ? o[j] * drop.scale : 0.0f;
    }
  });
}

// out[m0 + m, c0 + j] = scalar_t(float(out) + colscale[j] * keep * scale * z[m, j]); z row-major [mb, cb],
// colscale may be null (1), the mask applies under dropout. The one rounding to out's dtype is here.
template <typename scalar_t>
void add_chunk(at::Tensor& out, int64_t m0, int64_t mb, int64_t c0, int64_t cb, const float* z,
               const float* colscale, const DropoutSpec& drop) {
  scalar_t* base = out.mutable_data_ptr<scalar_t>();
  const int64_t s0 = out.stride(0), s1 = out.stride(1);
  at::parallel_for(0, mb, row_grain(cb), [&](int64_t begin, int64_t end) {
    std::vector<float> adapter(cb);
    std::vector<uint32_t> words(drop.active() ? cb : 0);
    for (int64_t m = begin; m < end; ++m) {
      const float* zr = z + m * cb;
      float* a = adapter.data();
      if (colscale != nullptr) {
        for (int64_t j = 0; j < cb; ++j) a[j] = colscale[j] * zr[j];
      } else {
        std::copy(zr, zr + cb, a);
      }
      if (drop.active()) {
        philox_row(kDropout, m0 + m, c0, cb, drop.key, words.data());
        for (int64_t j = 0; j < cb; ++j) a[j] = dropout_keep(words[j], drop.threshold) ? a[j] * drop.scale : 0.0f;
      }
      scalar_t* o = base + (m0 + m) * s0 + c0 * s1;
      for (int64_t j = 0; j < cb; ++j) o[j * s1] = static_cast<scalar_t>(static_cast<float>(o[j * s1]) + a[j]);
    }
  });
}

#define VERA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// The projection oriented [rank, C] (A as stored; B transposed), handed out one column tile at a time.
// Generated tiles land in one reused buffer; stored matrices are sliced, never copied.
class ProjectionTiles {
 public:
  ProjectionTiles(const ProjectionSource& src, const std::optional<at::Tensor>& stored, int64_t rank, int64_t C,
                  const at::TensorOptions& options)
      : src_(src), stored_(stored), rank_(rank) {
    cols_ = stored_ ? std::max<int64_t>(C, 1) : std::clamp<int64_t>(kTileFloats / rank, 64, std::max<int64_t>(C, 64));
    if (!stored_) buffer_ = at::empty({rank * std::min(cols_, std::max<int64_t>(C, 1))}, options.dtype(at::kFloat));
  }

  int64_t tile_cols() const { return cols_; }

  // Columns [c0, c0 + cb) as a float32 [rank, cb] tensor (possibly a transposed view).
  at::Tensor tile(int64_t c0, int64_t cb) {
    const bool is_a = src_.stream == kMatrixA;
    if (stored_) return is_a ? stored_->narrow(1, c0, cb) : stored_->narrow(0, c0, cb).t();
    float* out = buffer_.mutable_data_ptr<float>();
    if (is_a) {
      generate_tile(src_, 0, rank_, c0, cb, out);
      return buffer_.narrow(0, 0, rank_ * cb).view({rank_, cb});
    }
    generate_tile(src_, c0, cb, 0, rank_, out);
    return buffer_.narrow(0, 0, rank_ * cb).view({cb, rank_}).t();
  }

 private:
  ProjectionSource src_;
  std::optional<at::Tensor> stored_;
  int64_t rank_, cols_;
  at::Tensor buffer_;
};

// S[M, rank] += (in * mask * scale)[M, C] @ (P * colscale)^T, tile by tile. When grad_colscale is
// given it also receives d/d colscale of sum(in . (u P)) = rowsum over rank of P^T . (in^T u), the
// lambda_b gradient of the backward (in = grad_y, u = lambda_d * s).
void reduce_projected(at::Tensor& S, const at::Tensor& in, ProjectionTiles& P, const at::Tensor& colscale,
                      const DropoutSpec& drop, const at::Tensor& u, at::Tensor* grad_colscale) {
  const int64_t M = in.size(0), C = in.size(1);
  if (M == 0 || C == 0) return;
  const bool direct = in.scalar_type() == at::kFloat && !drop.active();
  const int64_t cb_max = std::min(P.tile_cols(), C);
  const int64_t mb_max = direct ? M : std::clamp<int64_t>(kChunkFloats / cb_max, 1, M);
  at::Tensor chunk = direct ? at::Tensor() : at::empty({mb_max * cb_max}, S.options());
  for (int64_t c0 = 0; c0 < C; c0 += cb_max) {
    const int64_t cb = std::min(cb_max, C - c0);
    const at::Tensor T = P.tile(c0, cb);
    const at::Tensor TS = colscale.defined() ? T.mul(colscale.narrow(0, c0, cb)) : T;
    at::Tensor inT_u = grad_colscale ? at::zeros({cb, S.size(1)}, S.options()) : at::Tensor();
    for (int64_t m0 = 0; m0 < M; m0 += mb_max) {
      const int64_t mb = std::min(mb_max, M - m0);
      at::Tensor L;
      if (direct) {
        L = in.narrow(0, m0, mb).narrow(1, c0, cb);
      } else {
        VERA_DISPATCH(in.scalar_type(), "vera_load_chunk", [&] {
          load_chunk<scalar_t>(in, m0, mb, c0, cb, drop, chunk.mutable_data_ptr<float>());
        });
        L = chunk.narrow(0, 0, mb * cb).view({mb, cb});
      }
      S.narrow(0, m0, mb).addmm_(L, TS.t());
      if (grad_colscale) inT_u.addmm_(L.t(), u.narrow(0, m0, mb));
    }
    if (grad_colscale) grad_colscale->narrow(0, c0, cb).copy_(T.t().mul(inT_u).sum(1));
  }
}

// out[M, C] (holding the base product, in its dtype) += colscale * mask * scale * (U[M, rank] @ P), tile by tile.
void add_expansion(at::Tensor& out, const at::Tensor& U, ProjectionTiles& P, const at::Tensor& colscale,
                   const DropoutSpec& drop) {
  const int64_t M = out.size(0), C = out.size(1);
  if (M == 0 || C == 0) return;
  const int64_t cb_max = std::min(P.tile_cols(), C);
  const int64_t mb_max = std::clamp<int64_t>(kChunkFloats / cb_max, 1, M);
  at::Tensor zbuf = at::empty({mb_max * cb_max}, U.options());
  const float* cs = colscale.defined() ? colscale.const_data_ptr<float>() : nullptr;
  for (int64_t c0 = 0; c0 < C; c0 += cb_max) {
    const int64_t cb = std::min(cb_max, C - c0);
    const at::Tensor T = P.tile(c0, cb);
    for (int64_t m0 = 0; m0 < M; m0 += mb_max) {
      const int64_t mb = std::min(mb_max, M - m0);
      at::Tensor z = zbuf.narrow(0, 0, mb * cb).view({mb, cb});
      at::mm_out(z, U.narrow(0, m0, mb), T);
      VERA_DISPATCH(out.scalar_type(), "vera_add_chunk", [&] {
        add_chunk<scalar_t>(out, m0, mb, c0, cb, z.const_data_ptr<float>(), cs ? cs + c0 : nullptr, drop);
      });
    }
  }
}

// ---- the ops ---------------------------------------------------------------------------------

// s = (x * mask * scale) A_K^T, float32 [M, rank].
at::Tensor shrink_cpu(const at::Tensor& x, const std::optional<at::Tensor>& A, int64_t rank, int64_t key0,
                      int64_t key1, double bound, int64_t drop_key0, int64_t drop_key1, int64_t drop_threshold,
                      double drop_scale) {
  const int64_t K = check_shrink(x);
  ProjectionTiles P(make_source(kMatrixA, A, key0, key1, bound, rank, K, x), A, rank, K, x.options());
  at::Tensor s = at::zeros({x.size(0), rank}, x.options().dtype(at::kFloat));
  reduce_projected(s, x, P, at::Tensor(), make_dropout(drop_key0, drop_key1, drop_threshold, drop_scale),
                   at::Tensor(), nullptr);
  return s;
}

// y = x W^T + bias (at::addmm, x's dtype) + lambda_b * ((lambda_d * s) B_N^T) (float32), cast once.
at::Tensor expand_add_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                          const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound) {
  check_expand(x, weight, bias, s, lambda_d, lambda_b);
  const int64_t N = weight.size(0), rank = s.size(1);
  ProjectionTiles P(make_source(kMatrixB, B, key0, key1, bound, rank, N, x), B, rank, N, x.options());
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  add_expansion(y, s.mul(lambda_d), P, lambda_b, no_dropout());
  return y;
}

// (g = (grad_y * lambda_b) B_N, grad_lambda_d = sum_m s * g, grad_lambda_b = rowsum(B_N * (grad_y^T (lambda_d * s))))
std::tuple<at::Tensor, at::Tensor, at::Tensor> adapter_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
    const std::optional<at::Tensor>& B, int64_t key0, int64_t key1, double bound, bool need_lambda_b) {
  check_adapter_backward(grad_y, s, lambda_d, lambda_b);
  const int64_t M = grad_y.size(0), N = grad_y.size(1), rank = s.size(1);
  ProjectionTiles P(make_source(kMatrixB, B, key0, key1, bound, rank, N, grad_y), B, rank, N, s.options());
  at::Tensor g = at::zeros({M, rank}, s.options());
  at::Tensor grad_b = at::zeros({need_lambda_b ? N : 0}, s.options());
  const at::Tensor u = need_lambda_b ? s.mul(lambda_d) : at::Tensor();
  reduce_projected(g, grad_y, P, lambda_b, no_dropout(), u, need_lambda_b ? &grad_b : nullptr);
  return {g, s.mul(g).sum(0), grad_b};
}

// grad_x = grad_y W (x's dtype) + mask * scale * ((g.mul(lambda_d)) A_K) (float32), cast once.
at::Tensor grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& g,
                          const at::Tensor& lambda_d, const std::optional<at::Tensor>& A, int64_t key0, int64_t key1,
                          double bound, int64_t drop_key0, int64_t drop_key1, int64_t drop_threshold,
                          double drop_scale) {
  check_grad_input(grad_y, weight, g, lambda_d);
  const int64_t K = weight.size(1), rank = g.size(1);
  ProjectionTiles P(make_source(kMatrixA, A, key0, key1, bound, rank, K, grad_y), A, rank, K, g.options());
  at::Tensor grad_x = at::mm(grad_y, weight);
  add_expansion(grad_x, g.mul(lambda_d), P, at::Tensor(), make_dropout(drop_key0, drop_key1, drop_threshold, drop_scale));
  return grad_x;
}

// Test helper: out[i, j] = element (row0 + i, col0 + j) of generated matrix `stream` (0 = A, 1 = B).
void projection_tile_cpu(at::Tensor& out, int64_t stream, int64_t row0, int64_t col0, int64_t key0, int64_t key1,
                         double bound) {
  TORCH_CHECK(stream == kMatrixA || stream == kMatrixB, "vera_kernels: stream must be 0 (A) or 1 (B), got ", stream);
  TORCH_CHECK(row0 >= 0 && col0 >= 0, "vera_kernels: row0 and col0 must be non-negative");
  check_fp32(out, "out", 2, out);
  TORCH_CHECK(out.is_contiguous(), "vera_kernels: out must be contiguous");
  const ProjectionSource src{static_cast<uint32_t>(stream), make_key(key0, key1, "projection key"),
                             static_cast<float>(bound), nullptr, 0, 0};
  generate_tile(src, row0, out.size(0), col0, out.size(1), out.mutable_data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_IMPL(vera_kernels, CPU, m) {
  m.impl("shrink", &shrink_cpu);
  m.impl("expand_add", &expand_add_cpu);
  m.impl("adapter_backward", &adapter_backward_cpu);
  m.impl("grad_input", &grad_input_cpu);
  m.impl("projection_tile", &projection_tile_cpu);
}

}  // namespace vera
