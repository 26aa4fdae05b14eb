// contrastive_loss on the CPU: NT-Xent / InfoNCE / SupCon in the kernel-level form of vitfast/ops/contrastive_loss.py
// (anchors [A, D], pool [M, D], labels, anchor_self), without the [A, M] logits.
//
// The logits are made tile by tile, S[Ta, Tm] = inv_temperature * anchors[I] pool[J]^T, by one single-threaded BLAS
// GEMM into a per-thread buffer that stays in L2, then consumed by a vectorised pass:
//   forward:  work item = one anchor tile I, looping over the pool tiles J: per row an online log-sum-exp over the
//             allowed columns (running max and rescaled sum) and the sum and count of the positive logits. Per-row
//             losses are summed in row order in double: the same bits whatever the thread count.
//   backward: S recomputed once per (I, J) from the saved lse and counts, overwritten with
//             dS = w_a (allowed exp(s - lse_a) - positive / n_a), then d_anchors[I] (+)= dS pool[J] (one writer per
//             row) and d_pool[J] += dS^T anchors[I]. d_pool is accumulated per group of consecutive anchor tiles
//             (at most kPoolGroups groups, fixed by the problem size, not the thread count) and the group partials
//             are summed in group order: bitwise reproducible whatever the thread count, O(kPoolGroups * M * D)
//             scratch. inv_temperature is folded into the GEMMs' alpha.
// When the pool equals the anchors (NT-Xent, one-process SupCon: checked with at::equal, O(A * D)), S is symmetric and
// the symmetric path below computes each off-diagonal tile once for both of its row blocks (3 GEMM-equivalents per
// forward + backward instead of 4), with the same determinism.
// Reduced precision (fp16/bf16) is converted to fp32 once; everything accumulates in fp32 (fp64 for fp64).
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/_unique2.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace vitfast {
namespace {

using cpu::exp_shifted;
using cpu::gemm;

// Tile shape: Ta anchor rows x Tm pool columns of logits (256 x 512 fp32 = 512 KB, in L2 between the GEMM and the
// element-wise pass); both also are GEMM dimensions, large enough for the BLAS kernels to run near their peak.
constexpr int64_t kAnchorRows = 256;
constexpr int64_t kPoolColumns = 512;
// Groups of anchor tiles with their own d_pool partial in the backward: the backward's parallelism, and its scratch
// (kPoolGroups - 1 partials of [M, D]; group 0 writes into d_pool itself).
constexpr int64_t kPoolGroups = 4;
// Square tiles of the symmetric path (two 256 x 256 fp32 buffers per thread: the tile and its transpose).
constexpr int64_t kSquareTile = 256;

// 1 if the labels are equal, else 0, without a comparison: with `a == b` (as a select or a bool-to-number
// conversion) GCC 12 reports "control flow in loop" and leaves the column loops scalar.
inline __attribute__((always_inline)) int32_t same_label(int32_t a, int32_t b) {
  return 1 - static_cast<int32_t>(std::min(1u, static_cast<uint32_t>(a ^ b)));
}

// ---- one tile of logits: s [rows, cols] (leading dimension ld), anchor rows row0.., pool columns col0.. ----------
template <typename T>
struct Tile {
  T* s;
  int64_t rows, ld, col0;
  int32_t cols;
  const int32_t* anchor_labels;  // [rows] (offset to row0)
  const int64_t* anchor_self;    // [rows] pool index of the anchor itself, or -1
  const int32_t* pool_labels;    // [cols] (offset to col0)

  // Column of row r's own pool row in this tile, or -1. The column loops run on 32-bit lanes throughout (int32
  // labels and column indices beside the float logits), so that they vectorise at the float width.
  int32_t own_column(int64_t r) const {
    const int64_t c = anchor_self[r] - col0;
    return c >= 0 && c < cols ? static_cast<int32_t>(c) : -1;
  }
};

// Per-row running statistics over the pool tiles seen so far.
template <typename T>
struct RowStats {
  T* max;          // running max of the allowed logits (-inf before any)
  T* sum;          // sum of exp(s - max) over the allowed logits
  T* positive;     // sum of the positive logits
  int32_t* count;  // number of positives
};

// The anchor's own column is excluded by overwriting its logit (0 while positives are summed, then -inf, whose exp is
// 0), in separate row loops: the column loops do not see it, stay branch-free and vectorise. (With the own-column
// test or write in the same row iteration, GCC duplicated the row body by jump threading and left that copy scalar.)
template <typename T>
inline __attribute__((always_inline)) void set_own_columns(const Tile<T>& t, T value) {
  for (int64_t r = 0; r < t.rows; ++r) {
    const int32_t own = t.own_column(r);
    if (own >= 0) t.s[r * t.ld + own] = value;
  }
}

template <typename T>
inline __attribute__((always_inline)) void tile_forward(const Tile<T>& t, const RowStats<T>& stats) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int32_t* __restrict labels = t.pool_labels;
  set_own_columns(t, T(0));
  for (int64_t r = 0; r < t.rows; ++r) {
    const T* __restrict s = t.s + r * t.ld;
    const int32_t label = t.anchor_labels[r];
    T positive = 0;
    int32_t count = 0;
#pragma omp simd reduction(+ : positive, count)
    for (int32_t c = 0; c < t.cols; ++c) {
      const int32_t match = same_label(labels[c], label);
      positive += static_cast<T>(match) * s[c];
      count += match;
    }
    stats.positive[r] += positive;
    stats.count[r] += count;
  }
  for (int64_t r = 0; r < t.rows; ++r) {  // the own column was counted where its label matches (it always does)
    const int32_t own = t.own_column(r);
    if (own >= 0 && labels[own] == t.anchor_labels[r]) stats.count[r] -= 1;
  }
  set_own_columns(t, kNegInf);
  for (int64_t r = 0; r < t.rows; ++r) {
    const T* __restrict s = t.s + r * t.ld;
    T tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
    for (int32_t c = 0; c < t.cols; ++c) tile_max = std::max(tile_max, s[c]);
    const T old_max = stats.max[r], new_max = std::max(old_max, tile_max);
    if (new_max == kNegInf) continue;  // no allowed column yet (the anchor's own column alone)
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int32_t c = 0; c < t.cols; ++c) sum += exp_shifted<T>(s[c] - new_max);
    stats.sum[r] = (old_max == kNegInf ? T(0) : stats.sum[r] * exp_shifted<T>(old_max - new_max)) + sum;
    stats.max[r] = new_max;
  }
}

// s := dS = weight_a (allowed exp(s - lse_a) - positive / n_a); weight_a = 0 (no positives) gives a zero row. The own
// column is computed like the others (exp_shifted cannot make a NaN of it) and then overwritten with 0.
template <typename T>
inline __attribute__((always_inline)) void tile_backward(const Tile<T>& t, const T* lse, const int32_t* count,
                                                         T weight) {
  const int32_t* __restrict labels = t.pool_labels;
  for (int64_t r = 0; r < t.rows; ++r) {
    T* __restrict s = t.s + r * t.ld;
    if (count[r] == 0) {
      std::fill(s, s + t.cols, T(0));
      continue;
    }
    const int32_t label = t.anchor_labels[r];
    const T shift = lse[r], target = weight / static_cast<T>(count[r]);
#pragma omp simd
    for (int32_t c = 0; c < t.cols; ++c) {
      s[c] = weight * exp_shifted<T>(s[c] - shift) - target * static_cast<T>(same_label(labels[c], label));
    }
  }
  set_own_columns(t, T(0));
}

// The float passes are compiled per target (common.h: VITFAST_SIMD_CLONES).
VITFAST_SIMD_CLONES void tile_forward_f32(const Tile<float>& t, const RowStats<float>& stats) {
  tile_forward<float>(t, stats);
}
VITFAST_SIMD_CLONES void tile_backward_f32(const Tile<float>& t, const float* lse, const int32_t* count,
                                           float weight) {
  tile_backward<float>(t, lse, count, weight);
}
void tile_forward_any(const Tile<float>& t, const RowStats<float>& stats) { tile_forward_f32(t, stats); }
void tile_forward_any(const Tile<double>& t, const RowStats<double>& stats) { tile_forward<double>(t, stats); }
void tile_backward_any(const Tile<float>& t, const float* lse, const int32_t* count, float weight) {
  tile_backward_f32(t, lse, count, weight);
}
void tile_backward_any(const Tile<double>& t, const double* lse, const int32_t* count, double weight) {
  tile_backward<double>(t, lse, count, weight);
}

// ---- problem ----------------------------------------------------------------------------------------------------
struct Problem {
  int64_t anchors, pool, dim;
  cpu::RowTiles anchor_tiles;
  at::Tensor label_ids;  // [A + M] int32: anchor then pool labels renumbered densely (equal labels, equal ids)
  const int32_t *anchor_labels, *pool_labels;
  const int64_t* anchor_self;
};

Problem problem(const at::Tensor& anchors, const at::Tensor& pool, const at::Tensor& anchor_labels,
                const at::Tensor& pool_labels, const at::Tensor& anchor_self) {
  TORCH_CHECK(anchors.dim() == 2, "anchors must be [A, D], got ", anchors.sizes());
  TORCH_CHECK(pool.dim() == 2 && pool.size(1) == anchors.size(1) && pool.scalar_type() == anchors.scalar_type(),
              "pool must be [M, D] in anchors' dtype with D = ", anchors.size(1), ", got ", pool.scalar_type(), " ",
              pool.sizes());
  Problem p{};
  p.anchors = anchors.size(0), p.pool = pool.size(0), p.dim = anchors.size(1);
  const auto check_index = [](const at::Tensor& x, const char* name, int64_t n, const char* shape) {
    TORCH_CHECK(x.scalar_type() == at::kLong && x.is_contiguous() && x.dim() == 1 && x.size(0) == n, name,
                " must be contiguous int64 ", shape, ", got ", x.scalar_type(), " ", x.sizes());
    return x.const_data_ptr<int64_t>();
  };
  check_index(anchor_labels, "anchor_labels", p.anchors, "[A]");
  check_index(pool_labels, "pool_labels", p.pool, "[M]");
  p.anchor_self = check_index(anchor_self, "anchor_self", p.anchors, "[A]");
  // Only equality of labels matters: renumbering them into int32 (O((A + M) log(A + M)), once per call) keeps any
  // int64 label and lets the column loops compare 8 labels per AVX2 instruction.
  const at::Tensor labels = at::cat({anchor_labels, pool_labels});
  p.label_ids = std::get<1>(at::_unique2(labels, /*sorted=*/true, /*return_inverse=*/true)).to(at::kInt).contiguous();
  p.anchor_labels = p.label_ids.const_data_ptr<int32_t>();
  p.pool_labels = p.anchor_labels + p.anchors;
  p.anchor_tiles = cpu::balanced_row_tiles(p.anchors, kAnchorRows);
  return p;
}

// A tile over logits in s (leading dimension ld): anchor rows [row0, row0 + rows) against pool columns
// [col0, col0 + cols). The symmetric path also makes one over the transpose of another tile.
template <typename T>
Tile<T> make_tile(const Problem& p, T* s, int64_t ld, int64_t row0, int64_t rows, int64_t col0, int64_t cols) {
  return Tile<T>{s, rows, ld, col0, static_cast<int32_t>(cols), p.anchor_labels + row0, p.anchor_self + row0,
                 p.pool_labels + col0};
}

// The logits of that tile, computed into s.
template <typename T>
Tile<T> logits(const Problem& p, bool blas, const T* a, const T* b, T inv_temperature, T* s, int64_t ld, int64_t row0,
               int64_t rows, int64_t col0, int64_t cols) {
  gemm<T>(blas, false, true, rows, cols, p.dim, inv_temperature, a + row0 * p.dim, p.dim, b + col0 * p.dim, p.dim, T(0),
          s, ld);
  return make_tile(p, s, ld, row0, rows, col0, cols);
}

// The generic path's tile: kAnchorRows-balanced anchor rows x kPoolColumns pool columns.
template <typename T>
Tile<T> tile_logits(const Problem& p, bool blas, const T* a, const T* b, T inv_temperature, T* s, int64_t row0,
                    int64_t col0) {
  return logits(p, blas, a, b, inv_temperature, s, kPoolColumns, row0, std::min(p.anchor_tiles.rows, p.anchors - row0),
                col0, std::min(kPoolColumns, p.pool - col0));
}

// ---- symmetric path: the pool is the anchors themselves (NT-Xent, SupCon on one process) -----------------------
// S = S^T, so only the tile pairs (I, J), I <= J, of a square tiling are computed: the tile gives rows I against
// columns J, and its transpose rows J against columns I (labels, own columns and statistics stay per row). That halves
// the forward's GEMM work and the backward's recomputation: 3 GEMM-equivalents in all instead of 4.
//   forward:  every pair writes per-row partial statistics of its column block (no shared state), merged per row in
//             column-block order: the same bits whatever the thread count. O(A^2 / kSquareTile) scratch.
//   backward: dS_IJ and dS_JI from the one tile; four GEMMs add them to d_anchors[I], d_pool[J], d_anchors[J] and
//             d_pool[I] of the pair's group (kPoolGroups groups of consecutive pairs, each with its own zeroed
//             d_anchors and d_pool, summed in group order).
bool symmetric(const at::Tensor& anchors, const at::Tensor& pool) {
  return anchors.sizes() == pool.sizes() && at::equal(anchors, pool);
}

struct Pairs {
  int64_t tile, tiles;
  std::vector<std::array<int64_t, 2>> pairs;  // (I, J), I <= J, I-major
  explicit Pairs(int64_t n) : tile(kSquareTile), tiles(std::max<int64_t>(1, (n + kSquareTile - 1) / kSquareTile)) {
    for (int64_t i = 0; i < tiles; ++i)
      for (int64_t j = i; j < tiles; ++j) pairs.push_back({i, j});
  }
  int64_t rows(int64_t n, int64_t i) const { return std::min(tile, n - i * tile); }
};

// Copies the rows x cols tile s (ld) transposed into st (ld).
template <typename T>
void transpose_tile(const T* s, int64_t rows, int64_t cols, int64_t ld, T* st) {
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) st[c * ld + r] = s[r * ld + c];
}

template <typename T>
void forward_symmetric(const Problem& p, bool blas, const T* a, T inv_t, T* lse, int32_t* count, T* row_loss) {
  const Pairs pairs(p.anchors);
  const int64_t n = p.anchors, ld = pairs.tile;
  // Partial statistics [column block][row]: max, sum, positive sum, count.
  std::vector<T> part_max(pairs.tiles * n, -std::numeric_limits<T>::infinity()), part_sum(pairs.tiles * n, T(0)),
      part_positive(pairs.tiles * n, T(0));
  std::vector<int32_t> part_count(pairs.tiles * n, 0);
  const auto stats = [&](int64_t block, int64_t row0) {
    const int64_t at = block * n + row0;
    return RowStats<T>{part_max.data() + at, part_sum.data() + at, part_positive.data() + at, part_count.data() + at};
  };
  at::parallel_for(0, static_cast<int64_t>(pairs.pairs.size()), 1, [&](int64_t w0, int64_t w1) {
    std::vector<T> s(ld * ld), st(ld * ld);
    for (int64_t w = w0; w < w1; ++w) {
      const auto [i, j] = pairs.pairs[w];
      const int64_t rows = pairs.rows(n, i), cols = pairs.rows(n, j);
      const Tile<T> t = logits(p, blas, a, a, inv_t, s.data(), ld, i * ld, rows, j * ld, cols);
      if (i != j) transpose_tile(s.data(), rows, cols, ld, st.data());  // before the row pass overwrites own columns
      tile_forward_any(t, stats(j, i * ld));
      if (i != j) tile_forward_any(make_tile(p, st.data(), ld, j * ld, cols, i * ld, rows), stats(i, j * ld));
    }
  });
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T max = -std::numeric_limits<T>::infinity(), sum = 0, positive = 0;
      int32_t n_positive = 0;
      for (int64_t block = 0; block < pairs.tiles; ++block) {  // block order: fixed
        const int64_t at = block * n + r;
        positive += part_positive[at];
        n_positive += part_count[at];
        const T block_max = part_max[at];
        if (block_max == -std::numeric_limits<T>::infinity()) continue;
        const T new_max = std::max(max, block_max);
        sum = (max == -std::numeric_limits<T>::infinity() ? T(0) : sum * exp_shifted<T>(max - new_max)) +
              part_sum[at] * exp_shifted<T>(block_max - new_max);
        max = new_max;
      }
      count[r] = n_positive;
      const T value = n_positive > 0 ? max + std::log(sum) : T(0);
      lse[r] = value;
      row_loss[r] = n_positive > 0 ? value - positive / static_cast<T>(n_positive) : T(0);
    }
  });
}

template <typename T>
void backward_symmetric(const Problem& p, bool blas, const T* a, T inv_t, T weight, const T* lse, const int32_t* count,
                        T* d_anchors, T* d_pool) {
  const Pairs pairs(p.anchors);
  const int64_t n = p.anchors, ld = pairs.tile, size = n * p.dim;
  const int64_t total = static_cast<int64_t>(pairs.pairs.size()), groups = std::min(total, kPoolGroups);
  // Group g's d_anchors and d_pool: the outputs for g = 0, zeroed scratch for the others.
  std::vector<T> scratch(2 * (groups - 1) * size, T(0));
  if (d_anchors != nullptr) std::fill(d_anchors, d_anchors + size, T(0));
  if (d_pool != nullptr) std::fill(d_pool, d_pool + size, T(0));
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<T> s(ld * ld), st(ld * ld);
    for (int64_t g = g0; g < g1; ++g) {
      T* da = d_anchors == nullptr ? nullptr : g == 0 ? d_anchors : scratch.data() + (2 * (g - 1)) * size;
      T* dp = d_pool == nullptr ? nullptr : g == 0 ? d_pool : scratch.data() + (2 * (g - 1) + 1) * size;
      for (int64_t w = g * total / groups; w < (g + 1) * total / groups; ++w) {
        const auto [i, j] = pairs.pairs[w];
        const int64_t rows = pairs.rows(n, i), cols = pairs.rows(n, j);
        const Tile<T> t = logits(p, blas, a, a, inv_t, s.data(), ld, i * ld, rows, j * ld, cols);
        if (i != j) transpose_tile(s.data(), rows, cols, ld, st.data());
        tile_backward_any(t, lse + i * ld, count + i * ld, weight);  // dS_IJ [rows, cols]
        // (row block, column block, dS of those rows against those columns, its row count, column count)
        const auto add = [&](int64_t ri, int64_t cj, const T* ds, int64_t nr, int64_t nc) {
          if (da != nullptr)
            gemm<T>(blas, false, false, nr, p.dim, nc, inv_t, ds, ld, a + cj * ld * p.dim, p.dim, T(1),
                    da + ri * ld * p.dim, p.dim);
          if (dp != nullptr)
            gemm<T>(blas, true, false, nc, p.dim, nr, inv_t, ds, ld, a + ri * ld * p.dim, p.dim, T(1),
                    dp + cj * ld * p.dim, p.dim);
        };
        add(i, j, s.data(), rows, cols);
        if (i != j) {
          tile_backward_any(make_tile(p, st.data(), ld, j * ld, cols, i * ld, rows), lse + j * ld, count + j * ld,
                            weight);  // dS_JI [cols, rows]
          add(j, i, st.data(), cols, rows);
        }
      }
    }
  });
  if (groups > 1) {  // the other groups' partials, added in group order
    at::parallel_for(0, size, 16384, [&](int64_t e0, int64_t e1) {
      for (int64_t g = 1; g < groups; ++g) {
        for (int which = 0; which < 2; ++which) {
          T* __restrict dst = which == 0 ? d_anchors : d_pool;
          if (dst == nullptr) continue;
          const T* __restrict part = scratch.data() + (2 * (g - 1) + which) * size;
#pragma omp simd
          for (int64_t e = e0; e < e1; ++e) dst[e] += part[e];
        }
      }
    });
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& anchors_in, const at::Tensor& pool_in,
                                                            const Problem& p, double inv_temperature,
                                                            double loss_scale) {
  const at::Tensor anchors = cpu::as_acc<T>(anchors_in), pool = cpu::as_acc<T>(pool_in);
  const bool blas = cpu::blas_available(anchors.scalar_type());
  const T* a = anchors.const_data_ptr<T>();
  const T* b = pool.const_data_ptr<T>();
  at::Tensor lse = at::empty({p.anchors}, anchors.options());
  at::Tensor count = at::empty({p.anchors}, anchors.options().dtype(at::kInt));
  std::vector<T> row_loss(p.anchors);
  T* lse_p = lse.data_ptr<T>();
  int32_t* count_p = count.data_ptr<int32_t>();
  if (symmetric(anchors, pool)) {
    forward_symmetric<T>(p, blas, a, static_cast<T>(inv_temperature), lse_p, count_p, row_loss.data());
  } else {
    const int64_t tile_rows = p.anchor_tiles.rows;
    at::parallel_for(0, p.anchor_tiles.count, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> s(tile_rows * kPoolColumns), max(tile_rows), sum(tile_rows), positive(tile_rows);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row0 = i * tile_rows, rows = std::min(tile_rows, p.anchors - row0);
        std::fill(max.begin(), max.end(), -std::numeric_limits<T>::infinity());
        std::fill(sum.begin(), sum.end(), T(0));
        std::fill(positive.begin(), positive.end(), T(0));
        std::fill(count_p + row0, count_p + row0 + rows, 0);
        const RowStats<T> stats{max.data(), sum.data(), positive.data(), count_p + row0};
        for (int64_t col0 = 0; col0 < p.pool; col0 += kPoolColumns) {
          tile_forward_any(tile_logits<T>(p, blas, a, b, static_cast<T>(inv_temperature), s.data(), row0, col0),
                           stats);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t n = count_p[row0 + r];
          // max is finite when n > 0 (a positive is an allowed column); lse and the loss are 0 without positives.
          const T value = n > 0 ? max[r] + std::log(sum[r]) : T(0);
          lse_p[row0 + r] = value;
          row_loss[row0 + r] = n > 0 ? value - positive[r] / static_cast<T>(n) : T(0);
        }
      }
    });
  }
  double total = 0;  // row order: the same bits whatever the thread count
  for (int64_t r = 0; r < p.anchors; ++r) total += static_cast<double>(row_loss[r]);
  at::Tensor loss = at::full({}, loss_scale * total, anchors.options());
  return {loss, lse, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& anchors, const at::Tensor& pool,
                                                       const at::Tensor& anchor_labels, const at::Tensor& pool_labels,
                                                       const at::Tensor& anchor_self, double inv_temperature,
                                                       double loss_scale) {
  const Problem p = problem(anchors, pool, anchor_labels, pool_labels, anchor_self);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchors.scalar_type(), "contrastive_loss_forward", [&] {
    out = forward_impl<at::opmath_type<scalar_t>>(anchors, pool, p, inv_temperature, loss_scale);
  });
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(double grad, const at::Tensor& anchors_in, const at::Tensor& pool_in,
                                                 const at::Tensor& lse_in, const at::Tensor& count_in,
                                                 const Problem& p, double inv_temperature, double loss_scale,
                                                 bool need_anchors, bool need_pool) {
  const at::Tensor anchors = cpu::as_acc<T>(anchors_in), pool = cpu::as_acc<T>(pool_in);
  const at::Tensor lse = cpu::as_acc<T>(lse_in), count = count_in.contiguous();
  const bool blas = cpu::blas_available(anchors.scalar_type());
  const T* a = anchors.const_data_ptr<T>();
  const T* b = pool.const_data_ptr<T>();
  const T* lse_p = lse.const_data_ptr<T>();
  const int32_t* count_p = count.const_data_ptr<int32_t>();
  const T inv_t = static_cast<T>(inv_temperature), weight = static_cast<T>(grad * loss_scale);
  const int64_t tiles = p.anchor_tiles.count, tile_rows = p.anchor_tiles.rows;
  // Without d_pool every anchor tile is its own group (all independent); with it, at most kPoolGroups groups.
  const int64_t groups = need_pool ? std::min(tiles, kPoolGroups) : tiles;
  // Zero-filled only when a side is empty (no GEMM then writes them).
  const auto make = [&](bool needed, const at::Tensor& like) {
    if (!needed) return at::Tensor();
    return p.anchors == 0 || p.pool == 0 ? at::zeros(like.sizes(), like.options())
                                         : at::empty(like.sizes(), like.options());
  };
  at::Tensor d_anchors = make(need_anchors, anchors), d_pool = make(need_pool, pool);
  if (symmetric(anchors, pool)) {
    backward_symmetric<T>(p, blas, a, inv_t, weight, lse_p, count_p, need_anchors ? d_anchors.data_ptr<T>() : nullptr,
                          need_pool ? d_pool.data_ptr<T>() : nullptr);
    return {d_anchors, d_pool};
  }
  at::Tensor d_pool_parts = need_pool && groups > 1 ? at::empty({groups - 1, p.pool, p.dim}, pool.options())
                                                    : at::Tensor();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<T> s(tile_rows * kPoolColumns);
    for (int64_t g = g0; g < g1; ++g) {
      T* d_pool_g = !need_pool ? nullptr
                    : g == 0   ? d_pool.data_ptr<T>()
                               : d_pool_parts.data_ptr<T>() + (g - 1) * p.pool * p.dim;
      const int64_t first = g * tiles / groups, last = (g + 1) * tiles / groups;
      for (int64_t i = first; i < last; ++i) {
        const int64_t row0 = i * tile_rows;
        for (int64_t col0 = 0; col0 < p.pool; col0 += kPoolColumns) {
          const Tile<T> t = tile_logits<T>(p, blas, a, b, inv_t, s.data(), row0, col0);
          tile_backward_any(t, lse_p + row0, count_p + row0, weight);
          if (need_anchors) {  // d_anchors[I] (+)= inv_t dS pool[J]
            gemm<T>(blas, false, false, t.rows, p.dim, t.cols, inv_t, t.s, t.ld, b + col0 * p.dim, p.dim,
                    col0 > 0 ? T(1) : T(0), d_anchors.data_ptr<T>() + row0 * p.dim, p.dim);
          }
          if (need_pool) {  // d_pool[J] (+)= inv_t dS^T anchors[I]
            gemm<T>(blas, true, false, t.cols, p.dim, t.rows, inv_t, t.s, t.ld, a + row0 * p.dim, p.dim,
                    i > first ? T(1) : T(0), d_pool_g + col0 * p.dim, p.dim);
          }
        }
      }
    }
  });
  if (need_pool && groups > 1) {  // d_pool += the other groups' partials, in group order
    T* out = d_pool.data_ptr<T>();
    const T* parts = d_pool_parts.const_data_ptr<T>();
    const int64_t size = p.pool * p.dim;
    at::parallel_for(0, size, 16384, [&](int64_t e0, int64_t e1) {
      for (int64_t g = 0; g < groups - 1; ++g) {
        const T* __restrict part = parts + g * size;
        T* __restrict dst = out;
#pragma omp simd
        for (int64_t e = e0; e < e1; ++e) dst[e] += part[e];
      }
    });
  }
  return {d_anchors, d_pool};
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_loss, const at::Tensor& anchors,
                                            const at::Tensor& pool, const at::Tensor& anchor_labels,
                                            const at::Tensor& pool_labels, const at::Tensor& anchor_self,
                                            const at::Tensor& lse, const at::Tensor& count, double inv_temperature,
                                            double loss_scale, std::array<bool, 2> output_mask) {
  const auto [need_anchors, need_pool] = output_mask;
  const Problem p = problem(anchors, pool, anchor_labels, pool_labels, anchor_self);
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar, got ", grad_loss.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == p.anchors, "lse must be [A] = [", p.anchors, "], got ", lse.sizes());
  TORCH_CHECK(count.scalar_type() == at::kInt && count.dim() == 1 && count.size(0) == p.anchors,
              "count must be int32 [A] = [", p.anchors, "], got ", count.scalar_type(), " ", count.sizes());
  const double grad = grad_loss.item<double>();
  at::Tensor d_anchors, d_pool;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchors.scalar_type(), "contrastive_loss_backward", [&] {
    std::tie(d_anchors, d_pool) = backward_impl<at::opmath_type<scalar_t>>(
        grad, anchors, pool, lse, count, p, inv_temperature, loss_scale, need_anchors, need_pool);
  });
  return {cpu::requested(d_anchors, need_anchors, anchors), cpu::requested(d_pool, need_pool, pool)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CPU, m) {
  m.impl("contrastive_loss_forward", &forward);
  m.impl("contrastive_loss_backward", &backward);
}

}  // namespace vitfast
