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
// GEMMs go straight to the BLAS that torch links (sgemm_/dgemm_), skipping the dispatcher: a tile GEMM is only
// ~10 us, so per-call overhead matters. Builds without those symbols fall back to at::addmm_out.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

extern "C" {
// Fortran BLAS (LP64) as exported by libtorch_cpu when torch is built with MKL or OpenBLAS. Weak, so that the
// extension still loads against a torch without them (then the GEMMs go through at::addmm_out).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// The element-wise passes are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (ifunc):
// the extension is built without -march flags, and these passes (C exponentials per pair) would otherwise run SSE2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define VITFAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VITFAST_SIMD_CLONES
#endif

namespace vitfast {
namespace {

// A tile's logits (C * Ti * N values) should stay in L2 between the GEMMs and the element-wise passes. (512 KB vs
// 1-2 MB tiles measured the same on a 1 MB-L2 Zen 4; larger tiles only help the GEMMs when L2 is larger.)
constexpr int64_t kTileBytes = 512 * 1024;

// ---- GEMM on row-major matrices ----------------------------------------------------------------------------
// C[m, n] (ldc) = alpha * op(A) op(B) + beta * C; op(A) is [m, k]: A stored [m, k] (lda), or [k, m] if trans_a.
template <typename T>
void gemm(bool use_blas, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (use_blas) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int ldai = static_cast<int>(ldb), ldbi = static_cast<int>(lda), ldci = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &ldai, a, &ldbi, &beta, c, &ldci);
    } else {
      dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &ldai, a, &ldbi, &beta, c, &ldci);
    }
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    return trans ? at::from_blob(const_cast<T*>(p), {rows, cols}, {1, ld}, options)
                 : at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, options);
  };
  at::Tensor out = view(c, m, n, ldc, false);
  // beta = 0 ignores the (uninitialised) contents of C, NaNs included.
  at::addmm_out(out, out, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
}

bool blas_available(at::ScalarType dtype) {
  static const bool forced_aten = [] {
    const char* env = std::getenv("VITFAST_CPU_GEMM");
    return env != nullptr && std::strcmp(env, "aten") == 0;
  }();
  if (forced_aten) return false;
  return dtype == at::kFloat ? sgemm_ != nullptr : dgemm_ != nullptr;
}

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
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * std::bit_cast<float>((n_int + 127) << 23);
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
inline void row_targets(const Tile<T>& t, int64_t i) {
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
  for (int64_t j = 0; j < t.n; ++j) {
    const int32_t dr = (ri > rows[j]) - (ri < rows[j]);
    const int32_t dc = (ci > cols[j]) - (ci < cols[j]);
    target[j] = 3 * (dr + 1) + (dc + 1);
  }
}

// Returns false when no pair of the row is selected (the row can be skipped).
template <typename T>
inline bool row_weights(const Tile<T>& t, int64_t i) {
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
inline void row_max(const Tile<T>& t, const T* s0) {
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
  int64_t batch, n, classes, dim, grid, tile_rows, tiles, mask_batch_stride;
  const int64_t* positions;  // [B, N] or null (identity order)
  const int64_t* targets;    // [B, N, N] or null (direction targets from positions)
  const bool* mask;          // [N, N] / [B, N, N] or null
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
  const bool has_targets = targets.has_value() && targets->defined();
  const bool has_positions = positions.has_value() && positions->defined();
  if (has_targets) {
    TORCH_CHECK(targets->scalar_type() == at::kLong && targets->is_contiguous() &&
                    targets->sizes() == at::IntArrayRef({p.batch, p.n, p.n}),
                "targets must be contiguous int64 [B, N, N]");
    p.targets = targets->const_data_ptr<int64_t>();
  } else {
    TORCH_CHECK(p.classes == 9, "direction targets need C = 9 classes");
    TORCH_CHECK(grid >= 1, "grid_size must be >= 1");
  }
  if (has_positions) {
    TORCH_CHECK(positions->scalar_type() == at::kLong && positions->is_contiguous() &&
                    positions->sizes() == at::IntArrayRef({p.batch, p.n}),
                "positions must be contiguous int64 [B, N]");
    p.positions = positions->const_data_ptr<int64_t>();
  }
  if (pair_mask.has_value() && pair_mask->defined()) {
    const at::Tensor& m = *pair_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() &&
                    (m.sizes() == at::IntArrayRef({p.n, p.n}) || m.sizes() == at::IntArrayRef({p.batch, p.n, p.n})),
                "pair_mask must be contiguous bool [N, N] or [B, N, N]");
    p.mask = m.const_data_ptr<bool>();
    p.mask_batch_stride = m.dim() == 3 ? p.n * p.n : 0;
  }
  p.keep = 1.0 - smoothing;
  p.spread = smoothing / static_cast<double>(p.classes);
  // Balanced row tiles whose logits fit kTileBytes (at least 8 rows).
  const int64_t per_row = std::max<int64_t>(1, p.classes * p.n * element_size);
  const int64_t max_rows = std::max<int64_t>(8, kTileBytes / per_row);
  p.tiles = std::max<int64_t>(1, (p.n + max_rows - 1) / max_rows);
  p.tile_rows = (p.n + p.tiles - 1) / p.tiles;
  p.tiles = std::max<int64_t>(1, (p.n + p.tile_rows - 1) / p.tile_rows);
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
      for (int64_t j = 0; j < p.n; ++j) {
        const int64_t cell = p.positions != nullptr ? p.positions[b * p.n + j] : j;
        ints[2 * p.n + j] = static_cast<int32_t>(cell / p.grid);
        ints[3 * p.n + j] = static_cast<int32_t>(cell % p.grid);
      }
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
    t.mask = p.mask != nullptr ? p.mask + b * p.mask_batch_stride : nullptr;
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
at::Tensor as_acc(const at::Tensor& x) {
  // detach(): raw-pointer kernels below autograd; fp16/bf16 are widened once.
  return x.detach().to(c10::CppTypeToScalarType<T>::value).contiguous();
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& q_in, const at::Tensor& k_in,
                                                            const Problem& p) {
  const at::Tensor q = as_acc<T>(q_in), k = as_acc<T>(k_in);
  const bool blas = blas_available(q.scalar_type());
  at::Tensor rows = at::empty({3, p.batch, p.n}, q.options());
  T* row_loss = rows.data_ptr<T>();
  T* row_correct = row_loss + p.batch * p.n;
  T* row_count = row_correct + p.batch * p.n;
  at::parallel_for(0, p.batch * p.tiles, 1, [&](int64_t w0, int64_t w1) {
    Scratch<T> scratch(p);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / p.tiles, row0 = (w % p.tiles) * p.tile_rows;
      const Tile<T> t = scratch.tile(p, b, row0);
      tile_logits<T>(p, blas, q.const_data_ptr<T>(), k.const_data_ptr<T>(), b, t);
      tile_forward_any(t, row_loss + b * p.n, row_correct + b * p.n, row_count + b * p.n);
    }
  });
  // Fixed-order double sums of the per-row statistics: deterministic whatever the thread count.
  const at::Tensor totals = rows.reshape({3, -1}).to(at::kDouble).sum(1);
  const double* s = totals.const_data_ptr<double>();
  const double count = s[2], denominator = std::max(count, 1.0);
  const auto scalar = [&](double v, at::ScalarType dtype) { return at::full({}, v, q.options().dtype(dtype)); };
  return {scalar(s[0] / denominator, q.scalar_type()), scalar(s[1] / denominator, at::kFloat),
          scalar(std::llround(count), at::kLong)};
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
  const at::Tensor q = as_acc<T>(q_in), k = as_acc<T>(k_in);
  const bool blas = blas_available(q.scalar_type());
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
    at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
      Scratch<T> scratch(p);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t tile = 0; tile < p.tiles; ++tile)
          run_tile(scratch, b, tile, need_k ? d_k.data_ptr<T>() + b * per_batch : nullptr, tile > 0);
    });
  } else {
    at::parallel_for(0, p.batch * p.tiles, 1, [&](int64_t w0, int64_t w1) {
      Scratch<T> scratch(p);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t b = w / p.tiles, tile = w % p.tiles;
        run_tile(scratch, b, tile, need_k ? d_k_parts.data_ptr<T>() + (b * p.tiles + tile) * per_batch : nullptr,
                 false);
      }
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
  TORCH_CHECK(grad_loss.numel() == 1 && count.numel() == 1, "grad_loss and count must be scalars");
  const auto [need_q, need_k] = output_mask;
  const double grad = grad_loss.item<double>() / static_cast<double>(std::max<int64_t>(count.item<int64_t>(), 1));
  at::Tensor d_q, d_k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "relation_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Problem p = problem(q, k, positions, targets, pair_mask, grid_size, label_smoothing, sizeof(acc_t));
    std::tie(d_q, d_k) = backward_impl<acc_t>(grad, q, k, p, need_q, need_k);
  });
  d_q = need_q ? d_q.to(q.scalar_type()) : at::empty({0}, q.options());
  d_k = need_k ? d_k.to(k.scalar_type()) : at::empty({0}, k.options());
  return {d_q, d_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CPU, m) {
  m.impl("relation_loss_forward", &forward);
  m.impl("relation_loss_backward", &backward);
}

}  // namespace vitfast
