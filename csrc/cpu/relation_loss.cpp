// relation_loss on the CPU: RelViT's pair cross-entropy over C bilinear class scores, without [B, C, N, N] logits.
//
// Work item = one batch element b and a tile of Ti query rows i (all N key columns j at once). Per item and class c
// one single-threaded GEMM  S_c[Ti, N] = Q_c[Ti, d_h] K_c[N, d_h]^T / sqrt(d_h)  fills a per-thread buffer of
// C * Ti * N values (sized to stay in L2); a vectorised pass then takes the log-sum-exp over classes per pair.
//   forward:  per-row sums (loss, correct, count) -> [3, B, N]; the mean is a fixed-order double sum of the rows.
//   backward: recompute S, overwrite it with dS_c = w * (softmax_c - y_c) (y = smoothed one-hot), then
//             dQ_c[Ti] = dS_c K_c and dK_c += dS_c^T Q_c. When B >= threads a work item is a whole batch element,
//             so dK[b] is accumulated in place by one thread (deterministic, no partial buffers); with fewer batch
//             elements than threads the items are (b, tile) and dK comes from per-tile partials summed in order.
// Reduced precision (fp16/bf16) is converted to fp32 once; everything accumulates in fp32 (fp64 for fp64).
// GEMMs go straight to the BLAS that torch links (common.h: gemm).
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace vitfast {
namespace {

using cpu::gemm;

// A tile's logits (C * Ti * N values) should stay in L2 between the GEMMs and the element-wise passes. (512 KB vs
// 1-2 MB tiles measured the same on a 1 MB-L2 Zen 4; larger tiles only help the GEMMs when L2 is larger.)
constexpr int64_t kTileBytes = 512 * 1024;

// ---- vectorisable exp / log for the float passes ----------------------------------------------------------
// std::exp does not vectorise without -ffast-math; these are branch-free and accurate to a few ulp.
inline float fast_exp(float x) {
  // exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2; degree-6 Taylor polynomial: relative error < 2e-7.
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds x / ln2 to an integer
  const float n = shifted - 12582912.0f;
  const int32_t n_int = std::bit_cast<int32_t>(shifted) - 0x4B400000;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606820309417232e-6f;
  return cpu::exp_taylor<6>(r) * std::bit_cast<float>((n_int + 127) << 23);
}

inline float fast_log(float x) {
  // x = 2^e m with m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172: 5 odd terms.
  const int32_t bits = std::bit_cast<int32_t>(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = std::bit_cast<float>((bits & 0x007fffff) | 0x3f800000);
  const bool big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  e += big ? 1 : 0;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return static_cast<float>(e) * 0.693147180559945309f + 2.0f * s * p;
}

template <typename T>
inline T exp_(T x) {
  if constexpr (std::is_same_v<T, float>) return fast_exp(x);
  else return std::exp(x);
}

template <typename T>
inline T log_(T x) {
  if constexpr (std::is_same_v<T, float>) return fast_log(x);
  else return std::log(x);
}

// ---- one tile of query rows: targets, masks and the passes over classes -----------------------------------
template <typename T>
struct Tile {
  T* logits;                    // [C][Ti][n] (class stride class_stride); the backward overwrites it with dS
  int64_t class_stride, rows, n, classes, row0;
  const int32_t* grid_row;      // [n] grid row / column of every token (direction targets), or null
  const int32_t* grid_col;
  const int64_t* targets;       // [n, n] explicit targets of this batch element, or null
  const bool* mask;             // [n, n] pair mask of this batch element, or null
  T keep, spread;               // y_c = keep * [c == target] + spread  (keep = 1 - eps, spread = eps / C)
  T grad;                       // backward: d loss / d loss_pair for a selected pair = grad_loss / count
  // Scratch, n each.
  T *max, *sum, *target_logit, *logit_sum, *weight;
  int32_t *target, *argmax;
};

template <typename T>
inline __attribute__((always_inline)) void row_targets(const Tile<T>& t, int64_t i) {
  int32_t* __restrict target = t.target;
  if (t.targets != nullptr) {
    const int64_t* src = t.targets + i * t.n;
    for (int64_t j = 0; j < t.n; ++j) target[j] = static_cast<int32_t>(src[j]);
    return;
  }
  const int32_t ri = t.grid_row[i], ci = t.grid_col[i];
  const int32_t* __restrict rows = t.grid_row;
  const int32_t* __restrict cols = t.grid_col;
#pragma omp simd
  for (int64_t j = 0; j < t.n; ++j) target[j] = cpu::direction_class(ri, ci, rows[j], cols[j]);
}

// Returns false when no pair of the row is selected (the row can be skipped).
template <typename T>
inline __attribute__((always_inline)) bool row_weights(const Tile<T>& t, int64_t i) {
  T* __restrict weight = t.weight;
  if (t.mask == nullptr) {
    for (int64_t j = 0; j < t.n; ++j) weight[j] = T(1);
    return true;
  }
  const bool* __restrict src = t.mask + i * t.n;
  int64_t any = 0;
#pragma omp simd reduction(+ : any)
  for (int64_t j = 0; j < t.n; ++j) {
    weight[j] = src[j] ? T(1) : T(0);
    any += src[j] ? 1 : 0;
  }
  return any > 0;
}

template <typename T>
inline __attribute__((always_inline)) void row_max(const Tile<T>& t, const T* s0) {
  T* __restrict mx = t.max;
  int32_t* __restrict arg = t.argmax;
  for (int64_t j = 0; j < t.n; ++j) mx[j] = s0[j], arg[j] = 0;
  for (int64_t c = 1; c < t.classes; ++c) {
    const T* __restrict s = s0 + c * t.class_stride;
    const int32_t cls = static_cast<int32_t>(c);
#pragma omp simd
    for (int64_t j = 0; j < t.n; ++j) {
      const bool better = s[j] > mx[j];  // strict: the first maximum wins, as torch.argmax
      mx[j] = better ? s[j] : mx[j];
      arg[j] = better ? cls : arg[j];
    }
  }
}

// Per-row sums for rows [row0, row0 + rows): out[0][i] loss, out[1][i] correct, out[2][i] selected pairs.
template <typename T>
inline __attribute__((always_inline)) void tile_forward(const Tile<T>& t, T* row_loss, T* row_correct, T* row_count) {
  T* __restrict mx = t.max;
  T* __restrict sum = t.sum;
  T* __restrict st = t.target_logit;
  T* __restrict ssum = t.logit_sum;
  const T* __restrict w = t.weight;
  const int32_t* __restrict target = t.target;
  const int32_t* __restrict arg = t.argmax;
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t i = t.row0 + r;
    row_loss[i] = row_correct[i] = row_count[i] = T(0);
    if (!row_weights(t, i)) continue;
    row_targets(t, i);
    const T* s0 = t.logits + r * t.n;
    row_max(t, s0);
    for (int64_t j = 0; j < t.n; ++j) sum[j] = st[j] = ssum[j] = T(0);
    for (int64_t c = 0; c < t.classes; ++c) {
      const T* __restrict s = s0 + c * t.class_stride;
      const int32_t cls = static_cast<int32_t>(c);
#pragma omp simd
      for (int64_t j = 0; j < t.n; ++j) {
        sum[j] += exp_<T>(s[j] - mx[j]);
        st[j] += target[j] == cls ? s[j] : T(0);
        ssum[j] += s[j];
      }
    }
    T loss = 0, correct = 0, count = 0;
#pragma omp simd reduction(+ : loss, correct, count)
    for (int64_t j = 0; j < t.n; ++j) {
      // Smoothed cross-entropy: lse - (1 - eps) s_target - (eps / C) sum_c s_c.
      const T pair = mx[j] + log_<T>(sum[j]) - t.keep * st[j] - t.spread * ssum[j];
      loss += w[j] * pair;
      correct += arg[j] == target[j] ? w[j] : T(0);
      count += w[j];
    }
    row_loss[i] = loss, row_correct[i] = correct, row_count[i] = count;
  }
}

// Overwrites the tile's logits with dS_c = grad * w * (softmax_c - y_c) (rows without a selected pair: 0).
template <typename T>
inline __attribute__((always_inline)) void tile_backward(const Tile<T>& t) {
  T* __restrict mx = t.max;
  T* __restrict sum = t.sum;
  T* __restrict inv = t.target_logit;  // scratch reuse: grad * w / sum
  T* __restrict wy = t.logit_sum;      // grad * w
  const T* __restrict w = t.weight;
  const int32_t* __restrict target = t.target;
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t i = t.row0 + r;
    T* s0 = t.logits + r * t.n;
    if (!row_weights(t, i)) {
      for (int64_t c = 0; c < t.classes; ++c) std::fill_n(s0 + c * t.class_stride, t.n, T(0));
      continue;
    }
    row_targets(t, i);
    row_max(t, s0);
    for (int64_t j = 0; j < t.n; ++j) sum[j] = T(0);
    for (int64_t c = 0; c < t.classes; ++c) {
      T* __restrict s = s0 + c * t.class_stride;
#pragma omp simd
      for (int64_t j = 0; j < t.n; ++j) {
        const T e = exp_<T>(s[j] - mx[j]);
        s[j] = e;
        sum[j] += e;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < t.n; ++j) {
      wy[j] = t.grad * w[j];
      inv[j] = wy[j] / sum[j];
    }
    for (int64_t c = 0; c < t.classes; ++c) {
      T* __restrict s = s0 + c * t.class_stride;
      const int32_t cls = static_cast<int32_t>(c);
#pragma omp simd
      for (int64_t j = 0; j < t.n; ++j) {
        const T y = (target[j] == cls ? t.keep : T(0)) + t.spread;
        s[j] = s[j] * inv[j] - wy[j] * y;
      }
    }
  }
}

// The float passes are compiled per target (common.h: VITFAST_SIMD_CLONES).
VITFAST_SIMD_CLONES void tile_forward_f32(const Tile<float>& t, float* loss, float* correct, float* count) {
  tile_forward<float>(t, loss, correct, count);
}
VITFAST_SIMD_CLONES void tile_backward_f32(const Tile<float>& t) { tile_backward<float>(t); }
void tile_forward_any(const Tile<float>& t, float* loss, float* correct, float* count) {
  tile_forward_f32(t, loss, correct, count);
}
void tile_forward_any(const Tile<double>& t, double* loss, double* correct, double* count) {
  tile_forward<double>(t, loss, correct, count);
}
void tile_backward_any(const Tile<float>& t) { tile_backward_f32(t); }
void tile_backward_any(const Tile<double>& t) { tile_backward<double>(t); }

// ---- problem geometry and per-thread scratch --------------------------------------------------------------
struct Problem {
  int64_t batch, n, classes, dim, grid, tile_rows, tiles;
  const int64_t* targets;  // [B, N, N] or null (direction targets from positions)
  cpu::PairInputs pairs;   // positions, pair mask
  double keep, spread;
};

Problem problem(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& positions,
                const std::optional<at::Tensor>& targets, const std::optional<at::Tensor>& pair_mask, int64_t grid,
                double smoothing, int64_t element_size) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "q must be contiguous [B, N, C, d_h]");
  TORCH_CHECK(k.sizes() == q.sizes() && k.is_contiguous() && k.scalar_type() == q.scalar_type(),
              "k must be contiguous [B, N, C, d_h] like q");
  Problem p{};
  p.batch = q.size(0), p.n = q.size(1), p.classes = q.size(2), p.dim = q.size(3), p.grid = grid;
  TORCH_CHECK(p.classes >= 2 && p.dim >= 1, "q must have C >= 2 classes and d_h >= 1");
  if (targets.has_value() && targets->defined()) {
    TORCH_CHECK(targets->scalar_type() == at::kLong && targets->is_contiguous() &&
                    targets->sizes() == at::IntArrayRef({p.batch, p.n, p.n}),
                "targets must be contiguous int64 [B, N, N]");
    p.targets = targets->const_data_ptr<int64_t>();
  } else {
    TORCH_CHECK(p.classes == 9, "direction targets need C = 9 classes");
    TORCH_CHECK(grid >= 1, "grid_size must be >= 1");
  }
  p.pairs = cpu::pair_inputs(positions, pair_mask, p.batch, p.n);
  p.keep = 1.0 - smoothing;
  p.spread = smoothing / static_cast<double>(p.classes);
  // Balanced row tiles whose logits fit kTileBytes (at least 8 rows).
  const int64_t per_row = std::max<int64_t>(1, p.classes * p.n * element_size);
  const cpu::RowTiles tiles = cpu::balanced_row_tiles(p.n, std::max<int64_t>(8, kTileBytes / per_row));
  p.tile_rows = tiles.rows, p.tiles = tiles.count;
  return p;
}

template <typename T>
struct Scratch {
  std::vector<T> logits, values;
  std::vector<int32_t> ints;
  int64_t grid_b = -1;  // batch element whose grid rows / columns are in `ints`

  explicit Scratch(const Problem& p)
      : logits(p.classes * p.tile_rows * p.n), values(5 * p.n), ints(4 * p.n) {}

  Tile<T> tile(const Problem& p, int64_t b, int64_t row0) {
    if (p.targets == nullptr && grid_b != b) {
      p.pairs.grid_cells(b, p.n, p.grid, ints.data() + 2 * p.n, ints.data() + 3 * p.n);
      grid_b = b;
    }
    Tile<T> t{};
    t.logits = logits.data();
    t.class_stride = p.tile_rows * p.n;
    t.rows = std::min(p.tile_rows, p.n - row0);
    t.n = p.n, t.classes = p.classes, t.row0 = row0;
    t.grid_row = p.targets == nullptr ? ints.data() + 2 * p.n : nullptr;
    t.grid_col = p.targets == nullptr ? ints.data() + 3 * p.n : nullptr;
    t.targets = p.targets != nullptr ? p.targets + b * p.n * p.n : nullptr;
    t.mask = p.pairs.mask_row(b, 0, p.n);
    t.keep = static_cast<T>(p.keep), t.spread = static_cast<T>(p.spread);
    T* v = values.data();
    t.max = v, t.sum = v + p.n, t.target_logit = v + 2 * p.n, t.logit_sum = v + 3 * p.n, t.weight = v + 4 * p.n;
    t.target = ints.data(), t.argmax = ints.data() + p.n;
    return t;
  }
};

// S_c = Q_c K_c^T / sqrt(d_h) for the tile's rows, every class.
template <typename T>
void tile_logits(const Problem& p, bool blas, const T* q, const T* k, int64_t b, const Tile<T>& t) {
  const int64_t ld = p.classes * p.dim;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(p.dim)));
  for (int64_t c = 0; c < p.classes; ++c) {
    const T* q_c = q + ((b * p.n + t.row0) * p.classes + c) * p.dim;
    const T* k_c = k + (b * p.n * p.classes + c) * p.dim;
    gemm<T>(blas, false, true, t.rows, p.n, p.dim, scale, q_c, ld, k_c, ld, T(0), t.logits + c * t.class_stride,
            p.n);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& q_in, const at::Tensor& k_in,
                                                            const Problem& p) {
  const at::Tensor q = cpu::as_acc<T>(q_in), k = cpu::as_acc<T>(k_in);
  const bool blas = cpu::blas_available(q.scalar_type());
  std::vector<T> rows(3 * p.batch * p.n);  // per-row loss, correct, count
  T* row_loss = rows.data();
  T* row_correct = row_loss + p.batch * p.n;
  T* row_count = row_correct + p.batch * p.n;
  cpu::parallel_items<Scratch<T>>(p.batch, p.tiles, p, [&](Scratch<T>& scratch, int64_t b, int64_t tile) {
    const Tile<T> t = scratch.tile(p, b, tile * p.tile_rows);
    tile_logits<T>(p, blas, q.const_data_ptr<T>(), k.const_data_ptr<T>(), b, t);
    tile_forward_any(t, row_loss + b * p.n, row_correct + b * p.n, row_count + b * p.n);
  });
  return cpu::mean_over_pairs(rows.data(), p.batch * p.n, q.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                                       const std::optional<at::Tensor>& positions,
                                                       const std::optional<at::Tensor>& targets,
                                                       const std::optional<at::Tensor>& pair_mask, int64_t grid_size,
                                                       double label_smoothing) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "relation_loss_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Problem p = problem(q, k, positions, targets, pair_mask, grid_size, label_smoothing, sizeof(acc_t));
    out = forward_impl<acc_t>(q, k, p);
  });
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(double grad, const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const Problem& p, bool need_q, bool need_k) {
  const at::Tensor q = cpu::as_acc<T>(q_in), k = cpu::as_acc<T>(k_in);
  const bool blas = cpu::blas_available(q.scalar_type());
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const int64_t ld = p.classes * p.dim, per_batch = p.n * ld;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(p.dim)));
  at::Tensor d_q = need_q ? at::empty(q.sizes(), q.options()) : at::Tensor();
  at::Tensor d_k = need_k ? at::empty(k.sizes(), k.options()) : at::Tensor();
  // One batch element per work item when there are enough of them (dK[b] then has a single writer); otherwise
  // (b, tile) items, each writing its own dK partial.
  const bool whole_batches = p.tiles == 1 || p.batch >= at::get_num_threads();
  const bool partials = need_k && !whole_batches;
  at::Tensor d_k_parts = partials ? at::empty({p.batch, p.tiles, p.n, p.classes, p.dim}, q.options()) : at::Tensor();

  const auto run_tile = [&](Scratch<T>& scratch, int64_t b, int64_t tile, T* d_k_dst, bool accumulate) {
    Tile<T> t = scratch.tile(p, b, tile * p.tile_rows);
    t.grad = static_cast<T>(grad);
    tile_logits<T>(p, blas, qp, kp, b, t);
    tile_backward_any(t);
    for (int64_t c = 0; c < p.classes; ++c) {
      const T* ds = t.logits + c * t.class_stride;  // [rows, N]
      const T* k_c = kp + b * per_batch + c * p.dim;
      const T* q_c = qp + b * per_batch + t.row0 * ld + c * p.dim;
      if (need_q) {  // dQ_c[rows] = dS_c K_c / sqrt(d_h)
        T* dq_c = d_q.data_ptr<T>() + b * per_batch + t.row0 * ld + c * p.dim;
        gemm<T>(blas, false, false, t.rows, p.dim, p.n, scale, ds, p.n, k_c, ld, T(0), dq_c, ld);
      }
      if (need_k) {  // dK_c (+)= dS_c^T Q_c[rows] / sqrt(d_h)
        gemm<T>(blas, true, false, p.n, p.dim, t.rows, scale, ds, p.n, q_c, ld, accumulate ? T(1) : T(0),
                d_k_dst + c * p.dim, ld);
      }
    }
  };
  if (whole_batches) {
    cpu::parallel_items<Scratch<T>>(p.batch, 1, p, [&](Scratch<T>& scratch, int64_t b, int64_t) {
      for (int64_t tile = 0; tile < p.tiles; ++tile)
        run_tile(scratch, b, tile, need_k ? d_k.data_ptr<T>() + b * per_batch : nullptr, tile > 0);
    });
  } else {
    cpu::parallel_items<Scratch<T>>(p.batch, p.tiles, p, [&](Scratch<T>& scratch, int64_t b, int64_t tile) {
      run_tile(scratch, b, tile, need_k ? d_k_parts.data_ptr<T>() + (b * p.tiles + tile) * per_batch : nullptr,
               false);
    });
    if (need_k) at::sum_out(d_k, d_k_parts, {1});
  }
  return {d_q, d_k};
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_loss, const at::Tensor& count,
                                            const at::Tensor& q, const at::Tensor& k,
                                            const std::optional<at::Tensor>& positions,
                                            const std::optional<at::Tensor>& targets,
                                            const std::optional<at::Tensor>& pair_mask, int64_t grid_size,
                                            double label_smoothing, std::array<bool, 2> output_mask) {
  const auto [need_q, need_k] = output_mask;
  const double grad = cpu::mean_grad(grad_loss, count);
  at::Tensor d_q, d_k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "relation_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Problem p = problem(q, k, positions, targets, pair_mask, grid_size, label_smoothing, sizeof(acc_t));
    std::tie(d_q, d_k) = backward_impl<acc_t>(grad, q, k, p, need_q, need_k);
  });
  return {cpu::requested(d_q, need_q, q), cpu::requested(d_k, need_k, k)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CPU, m) {
  m.impl("relation_loss_forward", &forward);
  m.impl("relation_loss_backward", &backward);
}

}  // namespace vitfast
