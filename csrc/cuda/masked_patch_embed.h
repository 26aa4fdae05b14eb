// masked_patch_embed on CUDA: the memory-bound kernels (gather of kept patches, bias + pos-embed
// epilogue, scatter-adds of the backward) behind plain C++ launch functions. No torch and no CUDA
// header is needed to include this file: the torch glue (masked_patch_embed_cuda.cpp) calls the
// launchers, and tests/ops/test_masked_patch_embed_cuda_indexing.py compiles the index math below
// with g++ and replays the kernels' loops on the host.
//
// Index conventions (the same as csrc/cpu/masked_patch_embed.cpp):
//   images [B, C, H, W], patch p, S_w = W / p, N = (H / p) * S_w; patch n sits at grid row n / S_w,
//   column n % S_w. Token row m = b * K + k holds patch keep_idx[b, k] in Conv2d order: element
//   e = c * p * p + i * p + j is pixel images[b, c, row * p + i, col * p + j].
// Each kernel thread moves one "unit": `vec` consecutive elements of a token row, which lie inside one
// row of p pixels of the patch (vec divides p), so one 16/8/4-byte load or store moves the whole unit.
#pragma once

#include "common.cuh"  // DType, FastDivmod, Stream, vector_width, VITFAST_HD

namespace vitfast {
namespace cuda {

// ---- launch configuration: one place for every kernel of this file ----
constexpr int kThreadsPerBlock = 256;
// Every launch covers fewer units than this, so that all per-thread index math (flat unit index, token
// row, patch index) is 32-bit and can use FastDivmod; the launchers split larger problems into chunks.
constexpr int64_t kMaxUnitsPerLaunch = int64_t(1) << 30;

// Where the units of a [rows, C*p*p] token-row matrix come from (gather) or go to (scatter) in an image
// batch with element strides (stride_b, stride_c, stride_h, stride_w).
struct PatchGeometry {
  int64_t stride_b = 0, stride_c = 0, stride_h = 0, stride_w = 0;  // image strides, in elements
  int64_t patch = 1;                                                // p
  int64_t num_patches = 0;                                          // N (for bounds checks)
  uint32_t vec = 1;                                                 // elements per unit (divides p)
  FastDivmod units_per_row;                                         // C*p*p / vec
  FastDivmod kept;                                                  // K: token row -> image b
  FastDivmod grid_w;                                                // S_w: patch n -> (grid row, col)
  FastDivmod units_per_line;                                        // p / vec: unit -> (line, offset)
  FastDivmod patch_div;                                             // p: line -> (channel c, row i)

  // Flat unit index u (over the [rows, C*p*p / vec] unit matrix) -> token row m and unit r in the row.
  VITFAST_HD void split(uint32_t u, uint32_t& m, uint32_t& r) const { units_per_row.divmod(u, m, r); }

  // Element offset of unit r of token row m (holding patch n) in the image batch.
  VITFAST_HD int64_t image_offset(uint32_t m, uint32_t n, uint32_t r) const {
    const uint32_t b = kept.div(m);
    uint32_t grid_row, grid_col, line, t, c, i;
    grid_w.divmod(n, grid_row, grid_col);
    units_per_line.divmod(r, line, t);  // line = c * p + i, t = unit within the line of p pixels
    patch_div.divmod(line, c, i);
    const int64_t y = int64_t(grid_row) * patch + i;
    const int64_t x = int64_t(grid_col) * patch + int64_t(t) * vec;
    return int64_t(b) * stride_b + int64_t(c) * stride_c + y * stride_h + x * stride_w;
  }
};

// Largest unit (elements) such that one aligned access of vec * elem_size <= 16 bytes moves it:
// vec divides p; with vec > 1 the pixel rows must be contiguous (stride_w == 1), every other stride a
// multiple of vec, and the base pointers aligned to vec * elem_size.
inline uint32_t patch_vector_width(int elem_size, int64_t patch, int64_t stride_b, int64_t stride_c,
                                   int64_t stride_h, int64_t stride_w, const void* image_ptr,
                                   const void* rows_ptr) {
  if (stride_w != 1) return 1;
  uint32_t vec = vector_width(elem_size, patch, image_ptr, rows_ptr);
  while (vec > 1 && (stride_b % vec != 0 || stride_c % vec != 0 || stride_h % vec != 0)) vec /= 2;
  return vec;
}

// Whole items (images, or token rows) per launch so that one launch covers at most `max_units` units;
// 0 when a single item is already too big.
inline int64_t items_per_launch(int64_t units_per_item, int64_t max_units = kMaxUnitsPerLaunch) {
  return units_per_item <= 0 ? max_units : max_units / units_per_item;
}

// Geometry shared by every launch of a problem; each launch covers whole images and the launcher offsets
// the base pointers (images, keep_idx, rows) to the chunk's first image, so b in image_offset is
// chunk-relative. Preconditions (checked by the launchers): p >= 1, C*p*p < 2^31, N < 2^31, and at most
// kMaxUnitsPerLaunch units per launch.
inline PatchGeometry make_patch_geometry(int64_t channels, int64_t height, int64_t width, int64_t patch,
                                         int64_t kept, int64_t stride_b, int64_t stride_c, int64_t stride_h,
                                         int64_t stride_w, uint32_t vec) {
  PatchGeometry g;
  g.stride_b = stride_b, g.stride_c = stride_c, g.stride_h = stride_h, g.stride_w = stride_w;
  g.patch = patch;
  const int64_t grid_w = width / patch;
  g.num_patches = (height / patch) * grid_w;
  g.vec = vec;
  g.units_per_row = FastDivmod(uint32_t(channels * patch * patch / vec));
  g.kept = FastDivmod(uint32_t(kept));
  g.grid_w = FastDivmod(uint32_t(grid_w > 0 ? grid_w : 1));
  g.units_per_line = FastDivmod(uint32_t(patch / vec));
  g.patch_div = FastDivmod(uint32_t(patch));
  return g;
}

// ---- launchers: 0 on success, otherwise a cudaError_t value (cudaErrorInvalidValue for bad sizes) ----
// Pointers are device pointers; index tensors are int64 row-major; every launch is asynchronous on
// `stream`. Out-of-range indices trip a device-side assertion.

// patches [B*K, C*p*p] (row-major, dtype of images) = the kept patches of images [B, C, H, W]
// (any element strides), keep_idx [B, K].
int launch_gather_patches(DType dtype, const void* images, int64_t batch, int64_t channels, int64_t height,
                          int64_t width, int64_t stride_b, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                          int64_t patch, const int64_t* keep_idx, int64_t kept, void* patches, Stream stream);

// tokens[m, :] += bias + pos_embed[pos_idx[m], :] for m < rows (tokens [rows, dim] row-major), computed
// in fp32 (fp64 for double) and rounded once. bias [dim] and pos_embed [num_positions, dim] may be null.
int launch_add_bias_pos(DType dtype, void* tokens, int64_t rows, int64_t dim, const void* bias,
                        const void* pos_embed, const int64_t* pos_idx, int64_t num_positions, Stream stream);

// accum[pos_idx[m], :] += grad[m, :] (grad [rows, dim] of `dtype`; accum [num_positions, dim] is fp32,
// or fp64 when dtype is fp64). Atomic: duplicate positions accumulate.
int launch_scatter_add_rows(DType dtype, const void* grad, int64_t rows, int64_t dim, const int64_t* pos_idx,
                            int64_t num_positions, void* accum, Stream stream);

// accum [B, C, H, W] (contiguous, fp32, or fp64 when dtype is fp64) += patch_grads [B*K, C*p*p] scattered
// to the pixels of the kept patches keep_idx [B, K]. Atomic: duplicate keep_idx accumulate.
int launch_scatter_add_patches(DType dtype, const void* patch_grads, int64_t batch, int64_t channels,
                               int64_t height, int64_t width, int64_t patch, const int64_t* keep_idx,
                               int64_t kept, void* accum, Stream stream);

}  // namespace cuda
}  // namespace vitfast
