// Pieces the CPU kernels share (csrc/cpu/*.cpp): BLAS GEMMs on tiles, per-target SIMD clones, exp of shifted logits,
// widening to the accumulation type (whole or per tile), the pair ops' optional inputs (positions, pair mask) and their
// grid cells, the (batch, tile) and (row tile, column chunk) work splits, the fixed-order mean over per-row sums, and
// the patch origin in a [B, C, H, W] image.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

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

// Element-wise passes marked with this are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time
// (ifunc): the extension is built without -march flags, and those passes would otherwise run SSE2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define VITFAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VITFAST_SIMD_CLONES
#endif

namespace vitfast::cpu {

// ---- GEMM on row-major tiles ---------------------------------------------------------------------------------
// C[m, n] (ldc) = alpha * op(A) op(B) + beta * C; op(A) is [m, k]: A stored [m, k] (lda), or [k, m] if trans_a.
// use_blas: straight to the BLAS that torch links (sgemm_/dgemm_), skipping the dispatcher (a tile GEMM is only
// ~10 us, so per-call overhead matters); otherwise at::addmm_out on views of the same memory.
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

// Whether gemm() may call the BLAS for this dtype (float / double); VITFAST_CPU_GEMM=aten forces at::addmm_out
// (the path of builds without the Fortran symbols, and how the tests reach it). Read on every call (once per op call,
// outside the parallel regions), so that a test can switch it within one process.
inline bool blas_available(at::ScalarType dtype) {
  const char* env = std::getenv("VITFAST_CPU_GEMM");
  if (env != nullptr && std::strcmp(env, "aten") == 0) return false;
  return dtype == at::kFloat ? sgemm_ != nullptr : dgemm_ != nullptr;
}

// exp(r) for |r| <= ln(2) / 2 by its Taylor polynomial of degree kDegree (Horner form), the core of the branch-free
// float exponentials that vectorise (std::exp does not without -ffast-math). Relative error before rounding:
// < 2e-7 at degree 6, < 1e-8 at degree 7.
// The coefficients are the rounded 1 / k! themselves: a division in the loop (1.0f / k!) is not always folded inside
// the target_clones copies and made the relation_loss CPU forward 20 % slower.
template <int kDegree>
inline __attribute__((always_inline)) float exp_taylor(float r) {
  constexpr float kInverseFactorial[] = {1.0f,         1.0f,         1.0f / 2.0f,   1.0f / 6.0f,
                                         1.0f / 24.0f, 1.0f / 120.0f, 1.0f / 720.0f, 1.0f / 5040.0f};
  static_assert(kDegree >= 1 && kDegree <= 7);
  float p = kInverseFactorial[kDegree];
#pragma GCC unroll 8
  for (int k = kDegree - 1; k >= 0; --k) p = p * r + kInverseFactorial[k];
  return p;
}

// exp(y) for y <= 0 in float, branch-free so that loops over it vectorise: n = round(y / ln2), |r| <= ln2 / 2,
// exp_taylor<7>(r) * 2^n (relative error < 1e-8 before rounding). y < -87, -inf and NaN give 0; so does y > ~1.04
// (callers pass max-shifted logits; a small positive rounding excess is still exp(y)). Forced inline: called from VITFAST_SIMD_CLONES loops, it must be compiled
// into each per-target copy.
inline __attribute__((always_inline)) float exp_nonpositive(float y) {
  // n = round(y / ln2) as an integer; out of range (y < -87, -inf, NaN) gives 0 through the mask below, with no
  // branch (a clamp to a constant gets the loop jump-threaded and no longer vectorised).
  const int32_t minus_n = static_cast<int32_t>(0.5f - y * 1.44269504088896341f);  // >= 0: truncation is floor
  const int32_t in_range = -static_cast<int32_t>(static_cast<uint32_t>(minus_n) <= 126u);  // all ones or zero
  const int32_t m = minus_n & in_range;
  const float n = -static_cast<float>(m);
  const float r = (y - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  const float p = cpu::exp_taylor<7>(r);
  const int32_t scale_bits = (127 - m) << 23;  // 2^-m, a normal float
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  const float value = p * scale;
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= in_range;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// exp(y) for max-shifted logits y <= 0 (a small positive rounding excess allowed) in the accumulation type: the
// vectorisable exp_nonpositive for float, std::exp for double.
template <typename T>
inline __attribute__((always_inline)) T exp_shifted(T y) {
  if constexpr (std::is_same_v<T, float>) return exp_nonpositive(y);
  else return std::exp(y);
}

// x detached, contiguous, in the accumulation type T: raw-pointer kernels run below autograd, and fp16/bf16 are
// widened once.
template <typename T>
at::Tensor as_acc(const at::Tensor& x) {
  return x.detach().to(c10::CppTypeToScalarType<T>::value).contiguous();
}

// Scratch memory of n values of T (filled with `fill`, or uninitialised), held by a tensor rather than a std::vector:
// the torch profiler then sees it, as the benchmarks' CPU peak-memory measurement does.
template <typename T>
struct Buffer {
  at::Tensor tensor;
  T* data;
  explicit Buffer(int64_t n, std::optional<double> fill = std::nullopt)
      : tensor(fill ? at::full({n}, *fill, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))
                    : at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))),
        data(tensor.data_ptr<T>()) {}
};

// `count` consecutive values of src in the accumulation type T: src itself when it already is T, else widened into
// buffer (which is returned). The streaming ops widen fp16/bf16 operands one tile at a time, so that no fp32 copy of a
// large operand (K prototypes, a Q-entry queue) is ever made.
template <typename T, typename S>
const T* widened(const S* src, int64_t count, T* buffer) {
  if constexpr (std::is_same_v<S, T>) {
    return src;
  } else {
    for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<T>(src[i]);
    return buffer;
  }
}

// ---- the pair ops' optional inputs ---------------------------------------------------------------------------
struct PairInputs {
  const int64_t* positions = nullptr;  // [B, N]: grid cell of every token, or null (identity order)
  const bool* mask = nullptr;          // [N, N] / [B, N, N]: selected pairs, or null (all pairs)
  int64_t mask_batch_stride = 0;       // 0 for a shared [N, N] mask

  // Row i of batch element b's pair mask ([N]), or null when every pair is selected.
  const bool* mask_row(int64_t b, int64_t i, int64_t n) const {
    return mask != nullptr ? mask + b * mask_batch_stride + i * n : nullptr;
  }

  // Grid row / column (cell // grid, cell % grid) of every token of batch element b.
  void grid_cells(int64_t b, int64_t n, int64_t grid, int32_t* rows, int32_t* cols) const {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t cell = positions != nullptr ? positions[b * n + j] : j;
      rows[j] = static_cast<int32_t>(cell / grid);
      cols[j] = static_cast<int32_t>(cell % grid);
    }
  }
};

// Checks positions ([B, N] int64) and pair_mask ([N, N] or [B, N, N] bool), both contiguous and optional.
inline PairInputs pair_inputs(const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& pair_mask,
                              int64_t batch, int64_t n) {
  PairInputs inputs;
  if (positions.has_value() && positions->defined()) {
    TORCH_CHECK(positions->scalar_type() == at::kLong && positions->is_contiguous() &&
                    positions->sizes() == at::IntArrayRef({batch, n}),
                "positions must be contiguous int64 [B, N]");
    inputs.positions = positions->const_data_ptr<int64_t>();
  }
  if (pair_mask.has_value() && pair_mask->defined()) {
    const at::Tensor& m = *pair_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() &&
                    (m.sizes() == at::IntArrayRef({n, n}) || m.sizes() == at::IntArrayRef({batch, n, n})),
                "pair_mask must be contiguous bool [N, N] or [B, N, N]");
    inputs.mask = m.const_data_ptr<bool>();
    inputs.mask_batch_stride = m.dim() == 3 ? n * n : 0;
  }
  return inputs;
}

// RelViT's direction class of token i relative to token j, 3 * vertical + horizontal, each in {0: i before j,
// 1: same, 2: after}. Branch-free, so that loops over j vectorise.
inline __attribute__((always_inline)) int32_t direction_class(int32_t row_i, int32_t col_i, int32_t row_j,
                                                              int32_t col_j) {
  const int32_t dr = (row_i > row_j) - (row_i < row_j);
  const int32_t dc = (col_i > col_j) - (col_i < col_j);
  return 3 * (dr + 1) + (dc + 1);
}

// ---- work split ----------------------------------------------------------------------------------------------
// The n rows in `count` tiles of `rows` rows (the last one possibly shorter), rows <= max_rows, as even as possible.
struct RowTiles {
  int64_t rows, count;
};

inline RowTiles balanced_row_tiles(int64_t n, int64_t max_rows) {
  int64_t count = std::max<int64_t>(1, (n + max_rows - 1) / max_rows);
  const int64_t rows = std::max<int64_t>(1, (n + count - 1) / count);
  count = std::max<int64_t>(1, (n + rows - 1) / rows);
  return {rows, count};
}

// A grid of work items over an [n_rows, n_columns] block that is never stored: the rows in balanced tiles of at most
// max_rows, the columns in tiles of column_tile, the column tiles in `chunks` contiguous chunks. A work item is (row
// tile, chunk) and leaves a partial result per row; the chunks' partials are merged per row in chunk order. The number
// of chunks follows from the problem size alone (about target_items items, at most one chunk per column tile), never
// from the thread count: every item and every merge is the same computation however many threads run them.
struct ChunkGrid {
  RowTiles rows;
  int64_t columns, column_tile, column_tiles, chunks;

  int64_t items() const { return rows.count * chunks; }
  // Columns [chunk_begin(c), chunk_begin(c + 1)) form chunk c; always whole column tiles but for the last.
  int64_t chunk_begin(int64_t c) const { return std::min(columns, c * column_tiles / chunks * column_tile); }
};

inline ChunkGrid chunk_grid(int64_t n_rows, int64_t max_rows, int64_t n_columns, int64_t column_tile,
                            int64_t target_items) {
  ChunkGrid g{balanced_row_tiles(n_rows, max_rows), n_columns, column_tile,
              std::max<int64_t>(1, (n_columns + column_tile - 1) / column_tile), 1};
  g.chunks = std::clamp<int64_t>((target_items + g.rows.count - 1) / g.rows.count, 1, g.column_tiles);
  return g;
}

// fn(state, b, t) for every work item (b, t) of a batch x tiles grid (b-major), the items split over threads in
// contiguous chunks (at::parallel_for, grain 1). Each thread builds one State(setup), its scratch memory, and reuses
// it for all its items.
template <typename State, typename Setup, typename Fn>
void parallel_items(int64_t batch, int64_t tiles, const Setup& setup, const Fn& fn) {
  at::parallel_for(0, batch * tiles, 1, [&](int64_t w0, int64_t w1) {
    State state(setup);
    for (int64_t w = w0; w < w1; ++w) fn(state, w / tiles, w % tiles);
  });
}

// ---- reductions ----------------------------------------------------------------------------------------------
// A pair loss's outputs from per-row sums row_sums[3][rows] (loss, correct, selected pairs): (mean loss in T's dtype,
// accuracy float32, count int64), over max(count, 1) pairs. Plain double sums in row order: the same bits whatever
// the thread count.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mean_over_pairs(const T* row_sums, int64_t rows,
                                                               const at::TensorOptions& options) {
  double sums[3] = {0, 0, 0};
  for (int s = 0; s < 3; ++s)
    for (int64_t r = 0; r < rows; ++r) sums[s] += static_cast<double>(row_sums[s * rows + r]);
  const double denominator = std::max(sums[2], 1.0);
  const auto scalar = [&](double value, at::ScalarType dtype) { return at::full({}, value, options.dtype(dtype)); };
  return {scalar(sums[0] / denominator, c10::CppTypeToScalarType<T>::value), scalar(sums[1] / denominator, at::kFloat),
          scalar(static_cast<double>(std::llround(sums[2])), at::kLong)};
}

// The backward's d loss / d (pair loss) of a selected pair: grad_loss / max(count, 1).
inline double mean_grad(const at::Tensor& grad_loss, const at::Tensor& count) {
  TORCH_CHECK(grad_loss.numel() == 1 && count.numel() == 1, "grad_loss and count must be scalars");
  return grad_loss.item<double>() / static_cast<double>(std::max<int64_t>(count.item<int64_t>(), 1));
}

// A gradient as returned to autograd: in the input's dtype and contiguous, or empty when output_mask did not ask.
inline at::Tensor requested(const at::Tensor& grad, bool needed, const at::Tensor& input) {
  return needed ? grad.to(input.scalar_type()).contiguous() : at::empty({0}, input.options());
}

// ---- images ---------------------------------------------------------------------------------------------------
// Offset of pixel (c = 0, y = 0, x = 0) of patch n (row-major on the H/p x W/p grid) of image b in a contiguous
// [B, C, H, W] tensor. G: a geometry with channels, height, width, patch and grid_w (= W / p).
template <typename G>
inline int64_t patch_origin(const G& g, int64_t b, int64_t n) {
  return ((b * g.channels) * g.height + (n / g.grid_w) * g.patch) * g.width + (n % g.grid_w) * g.patch;
}

}  // namespace vitfast::cpu
