// masked_pixel_loss on CUDA: MAE's per-patch normalised MSE over masked patches, behind plain C++ launch
// functions. No torch and no CUDA header is needed to include this file: the torch glue
// (masked_pixel_loss_cuda.cpp) calls the launchers, and tests/ops/test_masked_pixel_loss_cuda_indexing.py
// compiles the index math below with g++ and replays the kernels' loops on the host.
//
// Index conventions (the same as csrc/cpu/masked_pixel_loss.cpp):
//   images [B, C, H, W] contiguous, patch p, S_w = W / p, N = (H / p) * S_w; patch row m = b * N + n sits at
//   grid row n / S_w, column n % S_w. pred [B, N, P] has contiguous rows and any batch stride (MAE's decoder
//   output without its CLS row is a slice), d_pred [B, N, P] is contiguous; P = p*p*C, element
//   e = (i*p + j)*C + c (MAE's patchify order) pairs with pixel images[b, c, row*p + i, col*p + j].
// Work split: a group of G lanes (a power of two <= 32, inside one warp) owns one patch row. The patch is
// cut into U = C * p * (p / vec) "units": unit r = (i * (p / vec) + jb) * C + c is `vec` consecutive pixels
// j = jb*vec .. jb*vec + vec-1 of row i of channel c: one aligned 16/8/4/2-byte image load. Its pred elements
// are e = (i*p + j)*C + c: contiguous (one vector access) when C == 1, else C-strided; the C lanes of
// neighbouring units then cover one contiguous stretch of the pred row together. Lane l of a group takes
// units l, l + G, l + 2G, ...
#pragma once

#include "common.cuh"  // DType, FastDivmod, Stream, vector_width, VITFAST_HD

namespace vitfast {
namespace cuda {
namespace pixel_loss {

// ---- launch configuration: one place for every kernel of this file ----
constexpr int kThreadsPerBlock = 256;
constexpr int kMaxGroup = 32;  // lanes per patch: one warp at most (group reductions are warp shuffles)
constexpr double kNormPixEps = 1e-6;

// Geometry of one problem; every per-thread index is 32-bit: B*N, P and U must be < 2^31 (launcher checks).
struct Geometry {
  int64_t width = 0, plane = 0, image = 0;  // image strides in elements: W, H*W, C*H*W (contiguous images)
  int64_t pred_stride_b = 0;                // elements between images in pred
  uint32_t patch = 1, channels = 1, vec = 1;
  uint32_t patch_len = 1;                   // P = p*p*C
  uint32_t units = 1;                       // U = C * p * (p / vec)
  uint32_t rows = 0;                        // B*N
  FastDivmod num_patches;                   // N: row m -> (b, n)
  FastDivmod grid_w;                        // S_w: n -> (grid row, grid col)
  FastDivmod channels_div;                  // C: unit r -> (q, c)
  FastDivmod units_per_line;                // p / vec: q -> (i, jb)

  // Element offset in images of pixel (channel 0, row 0, col 0) of patch row m.
  VITFAST_HD int64_t patch_origin(uint32_t m) const {
    uint32_t b, n, grid_row, grid_col;
    num_patches.divmod(m, b, n);
    grid_w.divmod(n, grid_row, grid_col);
    return int64_t(b) * image + int64_t(grid_row) * patch * width + int64_t(grid_col) * patch;
  }

  // Element offset in pred of row m (d_pred is contiguous: row m starts at m * P there).
  VITFAST_HD int64_t pred_row(uint32_t m) const {
    uint32_t b, n;
    num_patches.divmod(m, b, n);
    return int64_t(b) * pred_stride_b + int64_t(n) * patch_len;
  }

  // Unit r of a patch: offset of its first pixel from the patch origin, and index in the pred row of its
  // first element (element k < vec of the unit is at pred_index + k * channels).
  VITFAST_HD void unit(uint32_t r, int64_t& image_offset, uint32_t& pred_index) const {
    uint32_t q, c, i, jb;
    channels_div.divmod(r, q, c);
    units_per_line.divmod(q, i, jb);
    image_offset = int64_t(c) * plane + int64_t(i) * width + int64_t(jb) * vec;
    pred_index = (i * patch + jb * vec) * channels + c;
  }
};

// Running (count, mean, sum of squared deviations) of a set of pixels; merge() is Chan et al.'s pairwise
// update, exact in exact arithmetic and stable in floating point. An empty side leaves the other unchanged.
template <typename A>
struct Moments {
  A n, mean, m2;

  VITFAST_HD void merge(A n_b, A mean_b, A m2_b) {
    if (n_b == A(0)) return;
    if (n == A(0)) {
      n = n_b, mean = mean_b, m2 = m2_b;
      return;
    }
    const A total = n + n_b;
    const A delta = mean_b - mean;
    const A share = n_b / total;
    mean += delta * share;
    m2 += m2_b + delta * delta * n * share;
    n = total;
  }
};

// Whether the pred elements of a unit can move as one vector of vec * pred_elem bytes: C == 1 (contiguous),
// every pred-side pointer aligned to it and pred's batch stride a multiple of vec (row starts inside an image
// are multiples of P = p*p, hence of vec).
inline bool pred_vectorised(uint32_t vec, int pred_elem, int64_t channels, int64_t pred_stride_b, const void* a,
                            const void* b = nullptr) {
  const uint64_t bytes = uint64_t(vec) * uint64_t(pred_elem);
  const auto aligned = [&](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; };
  return vec > 1 && channels == 1 && pred_stride_b % vec == 0 && aligned(a) && aligned(b);
}

// Lanes per patch: the smallest power of two >= U, at most one warp.
inline uint32_t group_size(uint32_t units) {
  uint32_t g = 1;
  while (g < units && g < uint32_t(kMaxGroup)) g *= 2;
  return g;
}

inline uint32_t log2_exact(uint32_t g) {
  uint32_t l = 0;
  while ((uint32_t(1) << l) < g) ++l;
  return l;
}

// Preconditions (checked by the launchers): p >= 1, H % p == W % p == 0, B*N, P < 2^31, vec | p.
inline Geometry make_geometry(int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t patch,
                              int64_t pred_stride_b, uint32_t vec) {
  Geometry g;
  g.width = width, g.plane = height * width, g.image = channels * height * width;
  g.pred_stride_b = pred_stride_b;
  g.patch = uint32_t(patch), g.channels = uint32_t(channels), g.vec = vec;
  g.patch_len = uint32_t(channels * patch * patch);
  g.units = uint32_t(channels * patch * (patch / vec));
  const int64_t grid_w = width / patch, num_patches = (height / patch) * grid_w;
  g.rows = uint32_t(batch * num_patches);
  g.num_patches = FastDivmod(uint32_t(num_patches > 0 ? num_patches : 1));
  g.grid_w = FastDivmod(uint32_t(grid_w > 0 ? grid_w : 1));
  g.channels_div = FastDivmod(uint32_t(channels > 0 ? channels : 1));
  g.units_per_line = FastDivmod(uint32_t(patch / vec));
  return g;
}

// ---- launchers: 0 on success, otherwise a cudaError_t value (cudaErrorInvalidValue for bad sizes) ----
// Pointers are device pointers, every launch is asynchronous on `stream`. pred_stride_b: elements between
// images in pred (>= 0; N * P when pred is contiguous). pred_dtype / image_dtype: equal,
// or fp16/bf16 pred with fp32 images. The accumulation type A is fp32, or fp64 when pred is fp64: mask,
// patch_loss, stats and scale are A.

// patch_loss[m] = mask[m] * mean_e (pred[m, e] - target[m, e])^2 for every row m < B*N (0 where mask[m] == 0,
// without reading the patch); with norm_pix also stats[m] = (mean, 1/sqrt(var + eps)) of the patch's pixels
// (0, 0 where mask[m] == 0). stats may be null without norm_pix.
int launch_forward(DType pred_dtype, DType image_dtype, const void* pred, int64_t pred_stride_b,
                   const void* images, const void* mask, int64_t batch, int64_t channels, int64_t height,
                   int64_t width, int64_t patch, bool norm_pix, void* patch_loss, void* stats, Stream stream);

// d_pred[m, e] = scale[0] * mask[m] * (pred[m, e] - target[m, e]) with target recomputed from images and
// stats (mean 0, 1/std 1 without norm_pix); 0 where mask[m] == 0, without reading pred or images there.
int launch_backward(DType pred_dtype, DType image_dtype, const void* pred, int64_t pred_stride_b,
                    const void* images, const void* mask, const void* stats, const void* scale, int64_t batch,
                    int64_t channels, int64_t height, int64_t width, int64_t patch, bool norm_pix, void* d_pred,
                    Stream stream);

}  // namespace pixel_loss
}  // namespace cuda
}  // namespace vitfast
