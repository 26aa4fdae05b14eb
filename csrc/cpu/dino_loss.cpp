// dino_loss on the CPU: the two streaming softmax primitives of vitfast/ops/dino_loss.py over K prototypes (the DINO
// loss and its gradients are assembled from them in Python), without the [R, K] logits.
//
//   softmax_rows(x [R, d], keys [K, d], key_scale [K], values [K, e], value_scale [K], bias [K], scale)
//       -> (lse [R], out [R, e])
//   softmax_columns(x [R, d], keys [K, d], key_scale [K], bias [K], scale, lse [R], y [R, e], out [K, e])
//       out += the transpose product, in place
//
// The logits come tile by tile from one single-threaded BLAS GEMM, x[I] keys[J]^T, into a per-thread buffer that
// stays in L2; the element-wise pass then makes z_rk = scale key_scale_k (...) + bias_k column by column (the fused
// weight norm: key_scale = 1 / ||keys_k||, so no normalised copy of the keys exists):
//   rows:    flash-attention's forward. Work item = (row tile I, chunk of key tiles): per row an online softmax over
//            the chunk's keys (running max, rescaled sum) with the accumulator out[I] (+)= exp(Z - max) value_scale
//            values[J] by a second GEMM (value_scale folded into the probability tile's columns). The chunks'
//            (max, sum, out) partials are merged per row in chunk order; the chunks follow from the problem size, not
//            the thread count (common.h: ChunkGrid): the same bits for any thread count, and enough items to fill
//            the threads when R is small (the teacher's 2B rows). Scratch: O(chunks R e).
//   columns: attention's dV. Work item = one key tile J, looping over all row tiles I: P = exp(Z - lse), then
//            out[J] += P^T y[I], in place in the caller's out (read-add-write; no [K, e] buffer of its own). Each key
//            tile has one writer: no atomics, no partials, thread-count independent.
// x is widened to the accumulation type once (O(R d)); fp16/bf16 keys and values one tile at a time (no fp32 copy of
// the K prototypes). Everything accumulates in fp32 (fp64 for fp64).
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace vitfast {
namespace {

// A logits tile is Tr x Tk = 256 x 512 (512 KB in fp32): it stays in L2 from the GEMM that makes it, through the
// exp pass, to the GEMM that consumes it; 256 and 512 are sizes at which the BLAS kernels run near peak.
constexpr int64_t kRowTile = 256;
constexpr int64_t kKeyTile = 512;
// softmax_rows' (row tile, key chunk) items: about this many, so that 640 student or 128 teacher rows still give
// every thread work.
constexpr int64_t kRowsItems = 16;

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// ---- element-wise passes over one tile z [rows, cols] (leading dimension ld) ------------------------------------

// Online softmax step on the raw dots z: z := z col_scale + bias (the logits), then z := exp(z - new_max)
// value_scale per row, with new_max = max(running max, the row's max); the running sum (of the unscaled exps) and the
// row's accumulator out [width] are rescaled to new_max first. A row with no finite logit so far contributes zeros.
template <typename T>
inline __attribute__((always_inline)) void rows_pass(T* z, int64_t rows, int64_t cols, int64_t ld, const T* col_scale,
                                                      const T* bias, const T* value_scale, T* max, T* sum, T* out,
                                                      int64_t width) {
  const T* __restrict m = col_scale;
  const T* __restrict b = bias;
  const T* __restrict v = value_scale;
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict s = z + r * ld;
    T tile_max = kNegInf<T>;
#pragma omp simd reduction(max : tile_max)
    for (int64_t c = 0; c < cols; ++c) {
      s[c] = s[c] * m[c] + b[c];
      tile_max = std::max(tile_max, s[c]);
    }
    const T old_max = max[r], new_max = std::max(old_max, tile_max);
    if (new_max == kNegInf<T>) {
      std::fill(s, s + cols, T(0));
      continue;
    }
    T tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
    for (int64_t c = 0; c < cols; ++c) {
      const T p = cpu::exp_shifted<T>(s[c] - new_max);
      tile_sum += p;
      s[c] = p * v[c];
    }
    if (new_max != old_max && old_max != kNegInf<T>) {  // (before any finite logit, sum and out are still 0)
      const T factor = cpu::exp_shifted<T>(old_max - new_max);
      sum[r] *= factor;
      T* __restrict o = out + r * width;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) o[c] *= factor;
    }
    sum[r] += tile_sum;
    max[r] = new_max;
  }
}

// z := exp(z col_scale + bias - lse_r) on the raw dots z: the softmax probabilities of the tile, normalised by the
// rows' saved lse.
template <typename T>
inline __attribute__((always_inline)) void columns_pass(T* z, int64_t rows, int64_t cols, int64_t ld,
                                                         const T* col_scale, const T* bias, const T* lse) {
  const T* __restrict m = col_scale;
  const T* __restrict b = bias;
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict s = z + r * ld;
    const T shift = lse[r];
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) s[c] = cpu::exp_shifted<T>(s[c] * m[c] + b[c] - shift);
  }
}

// The float passes are compiled per target (common.h: VITFAST_SIMD_CLONES).
VITFAST_SIMD_CLONES void rows_pass_f32(float* z, int64_t rows, int64_t cols, int64_t ld, const float* col_scale,
                                       const float* bias, const float* value_scale, float* max, float* sum, float* out,
                                       int64_t width) {
  rows_pass<float>(z, rows, cols, ld, col_scale, bias, value_scale, max, sum, out, width);
}
VITFAST_SIMD_CLONES void columns_pass_f32(float* z, int64_t rows, int64_t cols, int64_t ld, const float* col_scale,
                                          const float* bias, const float* lse) {
  columns_pass<float>(z, rows, cols, ld, col_scale, bias, lse);
}
template <typename T>
void rows_pass_any(T* z, int64_t rows, int64_t cols, int64_t ld, const T* col_scale, const T* bias,
                   const T* value_scale, T* max, T* sum, T* out, int64_t width) {
  if constexpr (std::is_same_v<T, float>) {
    rows_pass_f32(z, rows, cols, ld, col_scale, bias, value_scale, max, sum, out, width);
  } else {
    rows_pass<T>(z, rows, cols, ld, col_scale, bias, value_scale, max, sum, out, width);
  }
}
template <typename T>
void columns_pass_any(T* z, int64_t rows, int64_t cols, int64_t ld, const T* col_scale, const T* bias, const T* lse) {
  if constexpr (std::is_same_v<T, float>) columns_pass_f32(z, rows, cols, ld, col_scale, bias, lse);
  else columns_pass<T>(z, rows, cols, ld, col_scale, bias, lse);
}

// z [rows, cols] (leading dimension kKeyTile) = x_tile k_tile^T: a tile of raw dots (the pass scales them).
template <typename T>
void dots(bool blas, const T* x_tile, int64_t rows, const T* k_tile, int64_t cols, int64_t dim, T* z) {
  cpu::gemm<T>(blas, false, true, rows, cols, dim, T(1), x_tile, dim, k_tile, dim, T(0), z, kKeyTile);
}

// scale key_scale_k for a tile of keys [col0, col0 + cols): the logits' per-column factor, rounded as the reference
// rounds it (the product first, then the dot times it).
template <typename T>
void column_scales(const T* key_scale, int64_t col0, int64_t cols, double scale, T* col_scale) {
  const T s = static_cast<T>(scale);
  for (int64_t c = 0; c < cols; ++c) col_scale[c] = s * key_scale[col0 + c];
}

// ---- inputs ------------------------------------------------------------------------------------------------------
struct Shapes {
  int64_t rows, keys, dim;  // R, K, d
};

// A per-key vector (key_scale, value_scale, bias): [K] in the accumulation dtype.
void check_per_key(const char* name, const at::Tensor& t, int64_t keys, at::ScalarType acc) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == keys && t.scalar_type() == acc, name, " must be ", acc, " [K] = [", keys,
              "], got ", t.scalar_type(), " ", t.sizes());
}

Shapes check_common(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& key_scale, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2, "x must be [R, d], got ", x.sizes());
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == x.size(1) && keys.scalar_type() == x.scalar_type(),
              "keys must be [K, d] in x's dtype with d = ", x.size(1), ", got ", keys.scalar_type(), " ", keys.sizes());
  const auto acc = at::toOpMathType(x.scalar_type());
  check_per_key("key_scale", key_scale, keys.size(0), acc);
  check_per_key("bias", bias, keys.size(0), acc);
  return {x.size(0), keys.size(0), x.size(1)};
}

// The per-thread scratch of one work item: a logits tile, its column factors and, for fp16/bf16 inputs, the widened
// key / value tiles.
template <typename T, typename S>
struct Scratch {
  cpu::Buffer<T> z, col_scale, keys, values;
  Scratch(int64_t rows, int64_t dim, int64_t width)
      : z(rows * kKeyTile),
        col_scale(kKeyTile),
        keys(std::is_same_v<S, T> ? 0 : kKeyTile * dim),
        values(std::is_same_v<S, T> ? 0 : kKeyTile * width) {}
};

// ---- softmax_rows -----------------------------------------------------------------------------------------------
template <typename T, typename S>
std::tuple<at::Tensor, at::Tensor> rows_impl(const at::Tensor& x_in, const at::Tensor& keys_in,
                                             const at::Tensor& key_scale_in, const at::Tensor& values_in,
                                             const at::Tensor& value_scale_in, const at::Tensor& bias_in,
                                             const Shapes& n, double scale) {
  const at::Tensor x = cpu::as_acc<T>(x_in), keys = keys_in.contiguous(), values = values_in.contiguous();
  const at::Tensor key_scale = key_scale_in.contiguous(), value_scale = value_scale_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  const int64_t width = values.size(1);
  at::Tensor lse = at::empty({n.rows}, x.options()), out = at::empty({n.rows, width}, x.options());
  if (n.rows == 0) return {lse, out};
  const bool blas = cpu::blas_available(x.scalar_type());
  const T* xp = x.const_data_ptr<T>();
  const S* kp = keys.const_data_ptr<S>();
  const S* vp = values.const_data_ptr<S>();
  const T *bp = bias.const_data_ptr<T>(), *ksp = key_scale.const_data_ptr<T>();
  const T* vsp = value_scale.const_data_ptr<T>();
  // keys and values are one tensor in the student's call (and the teacher's, without teacher prototypes).
  const bool shared = kp == vp && width == n.dim;
  const cpu::ChunkGrid grid = cpu::chunk_grid(n.rows, kRowTile, n.keys, kKeyTile, kRowsItems);
  // Chunk c's partial statistics of row r: part_max / part_sum [c * R + r], part_out [(c * R + r) * e ...].
  const int64_t parts = grid.chunks * n.rows;
  const cpu::Buffer<T> part_max(parts, -std::numeric_limits<double>::infinity()), part_sum(parts, 0.0);
  const cpu::Buffer<T> part_out(parts * width, 0.0);
  at::parallel_for(0, grid.items(), 1, [&](int64_t w0, int64_t w1) {
    Scratch<T, S> scratch(grid.rows.rows, n.dim, width);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t chunk = w % grid.chunks, row0 = (w / grid.chunks) * grid.rows.rows;
      const int64_t rows = std::min(grid.rows.rows, n.rows - row0), at = chunk * n.rows + row0;
      for (int64_t col0 = grid.chunk_begin(chunk); col0 < grid.chunk_begin(chunk + 1); col0 += kKeyTile) {
        const int64_t cols = std::min(kKeyTile, n.keys - col0);
        const T* k_tile = cpu::widened(kp + col0 * n.dim, cols * n.dim, scratch.keys.data);
        const T* v_tile = shared ? k_tile : cpu::widened(vp + col0 * width, cols * width, scratch.values.data);
        T* z = scratch.z.data;
        dots<T>(blas, xp + row0 * n.dim, rows, k_tile, cols, n.dim, z);
        column_scales<T>(ksp, col0, cols, scale, scratch.col_scale.data);
        T* out_rows = part_out.data + at * width;
        rows_pass_any<T>(z, rows, cols, kKeyTile, scratch.col_scale.data, bp + col0, vsp + col0, part_max.data + at,
                         part_sum.data + at, out_rows, width);
        cpu::gemm<T>(blas, false, false, rows, width, cols, T(1), z, kKeyTile, v_tile, width, T(1), out_rows, width);
      }
    }
  });
  // Merge the chunks per row, in chunk order.
  T* lse_p = lse.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  at::parallel_for(0, n.rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T max = kNegInf<T>;
      for (int64_t c = 0; c < grid.chunks; ++c) max = std::max(max, part_max.data[c * n.rows + r]);
      T* __restrict o = out_p + r * width;
      std::fill(o, o + width, T(0));
      T sum = 0;
      if (max != kNegInf<T>) {
        for (int64_t c = 0; c < grid.chunks; ++c) {
          const int64_t at = c * n.rows + r;
          if (part_max.data[at] == kNegInf<T>) continue;
          const T factor = cpu::exp_shifted<T>(part_max.data[at] - max);
          sum += part_sum.data[at] * factor;
          const T* __restrict part = part_out.data + at * width;
#pragma omp simd
          for (int64_t e = 0; e < width; ++e) o[e] += part[e] * factor;
        }
        const T inverse = T(1) / sum;
#pragma omp simd
        for (int64_t e = 0; e < width; ++e) o[e] *= inverse;
      }
      lse_p[r] = max + std::log(sum);  // no finite logit (K = 0, or every bias -inf): -inf and out = 0
    }
  });
  return {lse, out};
}

std::tuple<at::Tensor, at::Tensor> softmax_rows(const at::Tensor& x, const at::Tensor& keys,
                                                const at::Tensor& key_scale, const at::Tensor& values,
                                                const at::Tensor& value_scale, const at::Tensor& bias, double scale) {
  const Shapes n = check_common(x, keys, key_scale, bias);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == n.keys && values.scalar_type() == x.scalar_type(),
              "values must be [K, e] in x's dtype with K = ", n.keys, ", got ", values.scalar_type(), " ",
              values.sizes());
  check_per_key("value_scale", value_scale, n.keys, bias.scalar_type());
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dino_softmax_rows", [&] {
    result = rows_impl<at::opmath_type<scalar_t>, scalar_t>(x, keys, key_scale, values, value_scale, bias, n, scale);
  });
  return result;
}

// ---- softmax_columns --------------------------------------------------------------------------------------------
template <typename T, typename S>
void columns_impl(const at::Tensor& x_in, const at::Tensor& keys_in, const at::Tensor& key_scale_in,
                  const at::Tensor& bias_in, const at::Tensor& lse_in, const at::Tensor& y_in, const at::Tensor& out,
                  const Shapes& n, double scale) {
  const at::Tensor x = cpu::as_acc<T>(x_in), keys = keys_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor key_scale = key_scale_in.contiguous(), lse = lse_in.contiguous(), y = y_in.contiguous();
  const int64_t width = y.size(1);
  if (n.rows == 0 || n.keys == 0 || width == 0) return;  // nothing to add
  const bool blas = cpu::blas_available(x.scalar_type());
  const T* xp = x.const_data_ptr<T>();
  const S* kp = keys.const_data_ptr<S>();
  const T *bp = bias.const_data_ptr<T>(), *ksp = key_scale.const_data_ptr<T>();
  const T *lse_p = lse.const_data_ptr<T>(), *yp = y.const_data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  const cpu::RowTiles row_tiles = cpu::balanced_row_tiles(n.rows, kRowTile);
  const int64_t key_tiles = (n.keys + kKeyTile - 1) / kKeyTile;
  at::parallel_for(0, key_tiles, 1, [&](int64_t j0, int64_t j1) {
    Scratch<T, S> scratch(row_tiles.rows, n.dim, 0);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t col0 = j * kKeyTile, cols = std::min(kKeyTile, n.keys - col0);
      const T* k_tile = cpu::widened(kp + col0 * n.dim, cols * n.dim, scratch.keys.data);
      T* z = scratch.z.data;
      column_scales<T>(ksp, col0, cols, scale, scratch.col_scale.data);
      for (int64_t row0 = 0; row0 < n.rows; row0 += row_tiles.rows) {
        const int64_t rows = std::min(row_tiles.rows, n.rows - row0);
        dots<T>(blas, xp + row0 * n.dim, rows, k_tile, cols, n.dim, z);
        columns_pass_any<T>(z, rows, cols, kKeyTile, scratch.col_scale.data, bp + col0, lse_p + row0);
        // out[J] += P^T y[I]: this thread is the key tile's only writer.
        cpu::gemm<T>(blas, true, false, cols, width, rows, T(1), z, kKeyTile, yp + row0 * width, width, T(1),
                     out_p + col0 * width, width);
      }
    }
  });
}

void softmax_columns(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& key_scale, const at::Tensor& bias,
                     double scale, const at::Tensor& lse, const at::Tensor& y, const at::Tensor& out) {
  const Shapes n = check_common(x, keys, key_scale, bias);
  const auto acc = bias.scalar_type();
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n.rows && lse.scalar_type() == acc, "lse must be ", acc, " [R] = [",
              n.rows, "], got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == n.rows && y.scalar_type() == acc, "y must be ", acc, " [R, e] with R = ",
              n.rows, ", got ", y.scalar_type(), " ", y.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == n.keys && out.size(1) == y.size(1) && out.scalar_type() == acc &&
                  out.is_contiguous(),
              "out must be a contiguous ", acc, " [K, e] = [", n.keys, ", ", y.size(1), "], got ", out.scalar_type(),
              " ", out.sizes(), out.is_contiguous() ? "" : " (not contiguous)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dino_softmax_columns", [&] {
    columns_impl<at::opmath_type<scalar_t>, scalar_t>(x, keys, key_scale, bias, lse, y, out, n, scale);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CPU, m) {
  m.impl("dino_softmax_rows", &softmax_rows);
  m.impl("dino_softmax_columns", &softmax_columns);
}

}  // namespace vitfast
