// masked_pixel_loss: the CUDA kernels (see masked_pixel_loss.h for the index conventions and the work split).
// Raw pointers, sizes and a stream; no torch. The op is memory-bound: a masked patch's pixels and pred row
// are read once from HBM by the forward and once by the backward, an unmasked patch is never read (its
// d_pred row is written as zeros), and no target tensor exists anywhere.
//
//   forward_kernel    per masked patch: mean / unbiased variance of its pixels (pass 1: per-lane Welford over
//                     vector units, Chan-merged across the lane group), then the squared error against pred
//                     (pass 2 re-reads the pixels, from L1/L2: the group just loaded them); writes the weighted
//                     per-patch loss and (mean, 1/std). The glue sums the [B*N] losses (deterministic).
//   backward_kernel   per masked patch: d_pred = scale * w * (pred - (pixel - mean) / std), elementwise.
//
// Accumulation in fp32 (fp64 for fp64 pred); every group reduction ends with a broadcast of the group
// leader's value, so all lanes use bit-identical statistics and results do not depend on scheduling.
#include "masked_pixel_loss.h"  // and common.cuh: Pack, Acc, to_acc/from_acc, the dtype/vector dispatch

#include <cstdint>

namespace vitfast {
namespace cuda {
namespace pixel_loss {
namespace {

// The shuffle mask of the G-lane group holding this thread (groups are aligned inside a warp).
__device__ __forceinline__ unsigned group_lanes(uint32_t group) {
  if (group >= 32) return 0xffffffffu;
  const uint32_t lane = threadIdx.x & 31u;
  return ((1u << group) - 1u) << (lane & ~(group - 1u));
}

template <typename A>
__device__ __forceinline__ A group_sum_to_all(A v, uint32_t group, unsigned lanes) {
  for (uint32_t offset = group / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(lanes, v, offset, group);
  return __shfl_sync(lanes, v, 0, group);  // the leader's order of additions, on every lane
}

// The `V` pred elements of a unit (contiguous when `vectorised`, else `stride` apart), as A.
template <typename TP, int V, typename A>
__device__ __forceinline__ void load_pred(const TP* __restrict__ src, uint32_t stride, bool vectorised, A (&out)[V]) {
  if constexpr (V > 1) {
    if (vectorised) {
      const Pack<TP, V> x = *reinterpret_cast<const Pack<TP, V>*>(src);
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = to_acc(x.v[k]);
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_acc(src[k * stride]);
}

template <typename TP, int V, typename A>
__device__ __forceinline__ void store_pred(TP* __restrict__ dst, uint32_t stride, bool vectorised, const A (&in)[V]) {
  if constexpr (V > 1) {
    if (vectorised) {
      Pack<TP, V> y;
#pragma unroll
      for (int k = 0; k < V; ++k) y.v[k] = from_acc<TP>(in[k]);
      *reinterpret_cast<Pack<TP, V>*>(dst) = y;
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) dst[k * stride] = from_acc<TP>(in[k]);
}

template <typename TI, int V, typename A>
__device__ __forceinline__ void load_pixels(const TI* __restrict__ src, A (&out)[V]) {
  const Pack<TI, V> x = *reinterpret_cast<const Pack<TI, V>*>(src);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_acc(x.v[k]);
}

// ---- kernels ----

template <typename TP, typename TI, int V>
__global__ void __launch_bounds__(kThreadsPerBlock)
forward_kernel(const TP* __restrict__ pred, const TI* __restrict__ images,
               const typename Acc<TP>::type* __restrict__ mask, typename Acc<TP>::type* __restrict__ patch_loss,
               typename Acc<TP>::type* __restrict__ stats, Geometry g, uint32_t group_log2, bool norm_pix,
               bool pred_vec) {
  using A = typename Acc<TP>::type;
  const uint32_t group = 1u << group_log2;
  const uint32_t lane = threadIdx.x & (group - 1u);
  const uint32_t m = blockIdx.x * (uint32_t(kThreadsPerBlock) >> group_log2) + (threadIdx.x >> group_log2);
  if (m >= g.rows) return;  // the whole group leaves together
  const A w = mask[m];
  if (w == A(0)) {  // a kept patch adds nothing and is not read (a NaN weight is not 0 and propagates)
    if (lane == 0) {
      patch_loss[m] = A(0);
      if (norm_pix) stats[2 * int64_t(m)] = stats[2 * int64_t(m) + 1] = A(0);
    }
    return;
  }
  const unsigned lanes = group_lanes(group);
  const TI* origin = images + g.patch_origin(m);
  const TP* row = pred + g.pred_row(m);

  A mean = A(0), rstd = A(1);
  if (norm_pix) {
    Moments<A> s{A(0), A(0), A(0)};
    for (uint32_t r = lane; r < g.units; r += group) {
      int64_t offset;
      uint32_t e;
      g.unit(r, offset, e);
      A x[V];
      load_pixels<TI, V>(origin + offset, x);
      A sum = A(0);
#pragma unroll
      for (int k = 0; k < V; ++k) sum += x[k];
      const A unit_mean = sum / A(V);
      A unit_m2 = A(0);
#pragma unroll
      for (int k = 0; k < V; ++k) unit_m2 += (x[k] - unit_mean) * (x[k] - unit_mean);
      s.merge(A(V), unit_mean, unit_m2);
    }
    for (uint32_t offset = group / 2; offset > 0; offset /= 2) {
      const A n_b = __shfl_xor_sync(lanes, s.n, offset, group);
      const A mean_b = __shfl_xor_sync(lanes, s.mean, offset, group);
      const A m2_b = __shfl_xor_sync(lanes, s.m2, offset, group);
      s.merge(n_b, mean_b, m2_b);
    }
    mean = __shfl_sync(lanes, s.mean, 0, group);
    const A m2 = __shfl_sync(lanes, s.m2, 0, group);
    rstd = A(1) / sqrt(m2 / A(g.patch_len - 1) + A(kNormPixEps));
  }

  A squared = A(0);
  for (uint32_t r = lane; r < g.units; r += group) {
    int64_t offset;
    uint32_t e;
    g.unit(r, offset, e);
    A x[V], y[V];
    load_pixels<TI, V>(origin + offset, x);
    load_pred<TP, V>(row + e, g.channels, pred_vec, y);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A d = y[k] - (x[k] - mean) * rstd;
      squared += d * d;
    }
  }
  squared = group_sum_to_all(squared, group, lanes);
  if (lane == 0) {
    patch_loss[m] = w * (squared / A(g.patch_len));
    if (norm_pix) stats[2 * int64_t(m)] = mean, stats[2 * int64_t(m) + 1] = rstd;
  }
}

template <typename TP, typename TI, int V>
__global__ void __launch_bounds__(kThreadsPerBlock)
backward_kernel(const TP* __restrict__ pred, const TI* __restrict__ images,
                const typename Acc<TP>::type* __restrict__ mask, const typename Acc<TP>::type* __restrict__ stats,
                const typename Acc<TP>::type* __restrict__ scale, TP* __restrict__ d_pred, Geometry g,
                uint32_t group_log2, bool norm_pix, bool pred_vec) {
  using A = typename Acc<TP>::type;
  const uint32_t group = 1u << group_log2;
  const uint32_t lane = threadIdx.x & (group - 1u);
  const uint32_t m = blockIdx.x * (uint32_t(kThreadsPerBlock) >> group_log2) + (threadIdx.x >> group_log2);
  if (m >= g.rows) return;
  const A w = mask[m];
  TP* out = d_pred + int64_t(m) * g.patch_len;
  if (w == A(0)) {
    A zeros[V];
#pragma unroll
    for (int k = 0; k < V; ++k) zeros[k] = A(0);
    for (uint32_t r = lane; r < g.units; r += group) {
      int64_t offset;
      uint32_t e;
      g.unit(r, offset, e);
      store_pred<TP, V>(out + e, g.channels, pred_vec, zeros);
    }
    return;
  }
  const A mean = norm_pix ? stats[2 * int64_t(m)] : A(0);
  const A rstd = norm_pix ? stats[2 * int64_t(m) + 1] : A(1);
  const A coef = scale[0] * w;
  const TI* origin = images + g.patch_origin(m);
  const TP* row = pred + g.pred_row(m);
  for (uint32_t r = lane; r < g.units; r += group) {
    int64_t offset;
    uint32_t e;
    g.unit(r, offset, e);
    A x[V], y[V];
    load_pixels<TI, V>(origin + offset, x);
    load_pred<TP, V>(row + e, g.channels, pred_vec, y);
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = coef * (y[k] - (x[k] - mean) * rstd);
    store_pred<TP, V>(out + e, g.channels, pred_vec, y);
  }
}

// ---- host side ----

bool valid_problem(int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t patch, bool norm_pix) {
  if (batch < 0 || channels < 1 || height < 0 || width < 0 || patch < 1) return false;
  if (height % patch != 0 || width % patch != 0) return false;
  const int64_t patch_len = channels * patch * patch;
  if (patch_len >= kIndexLimit || (norm_pix && patch_len < 2)) return false;
  return batch * (height / patch) * (width / patch) < kIndexLimit;
}

inline unsigned blocks_for(uint32_t rows, uint32_t group_log2) {
  const uint32_t per_block = uint32_t(kThreadsPerBlock) >> group_log2;
  return static_cast<unsigned>((uint64_t(rows) + per_block - 1) / per_block);
}

// Calls fn(TP{}, TI{}) for a native (pred, images) dtype pair: equal, or fp16/bf16 pred with fp32 images.
template <typename Fn>
int dispatch_pair(DType pred_dtype, DType image_dtype, Fn&& fn) {
  if (pred_dtype == image_dtype) {
    switch (pred_dtype) {
      case DType::kFloat32: return fn(float{}, float{});
      case DType::kFloat16: return fn(__half{}, __half{});
      case DType::kBFloat16: return fn(__nv_bfloat16{}, __nv_bfloat16{});
      case DType::kFloat64: return fn(double{}, double{});
    }
    return kInvalid;
  }
  if (image_dtype == DType::kFloat32 && pred_dtype == DType::kFloat16) return fn(__half{}, float{});
  if (image_dtype == DType::kFloat32 && pred_dtype == DType::kBFloat16) return fn(__nv_bfloat16{}, float{});
  return kInvalid;
}

}  // namespace

int launch_forward(DType pred_dtype, DType image_dtype, const void* pred, int64_t pred_stride_b,
                   const void* images, const void* mask, int64_t batch, int64_t channels, int64_t height,
                   int64_t width, int64_t patch, bool norm_pix, void* patch_loss, void* stats, Stream stream) {
  if (!valid_problem(batch, channels, height, width, patch, norm_pix) || pred_stride_b < 0) return kInvalid;
  if (norm_pix && stats == nullptr) return kInvalid;
  if (batch == 0 || height == 0 || width == 0) return 0;
  const int status = dispatch_pair(pred_dtype, image_dtype, [&](auto tp, auto ti) {
    using TP = decltype(tp);
    using TI = decltype(ti);
    using A = typename Acc<TP>::type;
    const uint32_t vec = vector_width(sizeof(TI), patch, images);
    const bool pred_vec = pred_vectorised(vec, sizeof(TP), channels, pred_stride_b, pred);
    return dispatch_vec<TI>(vec, [&](auto v) {
      const Geometry g = make_geometry(batch, channels, height, width, patch, pred_stride_b, vec);
      const uint32_t group_log2 = log2_exact(group_size(g.units));
      forward_kernel<TP, TI, decltype(v)::value><<<blocks_for(g.rows, group_log2), kThreadsPerBlock, 0, stream>>>(
          static_cast<const TP*>(pred), static_cast<const TI*>(images), static_cast<const A*>(mask),
          static_cast<A*>(patch_loss), static_cast<A*>(stats), g, group_log2, norm_pix, pred_vec);
      return 0;
    });
  });
  return launch_status(status);
}

int launch_backward(DType pred_dtype, DType image_dtype, const void* pred, int64_t pred_stride_b,
                    const void* images, const void* mask, const void* stats, const void* scale, int64_t batch,
                    int64_t channels, int64_t height, int64_t width, int64_t patch, bool norm_pix, void* d_pred,
                    Stream stream) {
  if (!valid_problem(batch, channels, height, width, patch, norm_pix) || pred_stride_b < 0) return kInvalid;
  if (norm_pix && stats == nullptr) return kInvalid;
  if (batch == 0 || height == 0 || width == 0) return 0;
  const int status = dispatch_pair(pred_dtype, image_dtype, [&](auto tp, auto ti) {
    using TP = decltype(tp);
    using TI = decltype(ti);
    using A = typename Acc<TP>::type;
    const uint32_t vec = vector_width(sizeof(TI), patch, images);
    const bool pred_vec = pred_vectorised(vec, sizeof(TP), channels, pred_stride_b, pred, d_pred);
    return dispatch_vec<TI>(vec, [&](auto v) {
      const Geometry g = make_geometry(batch, channels, height, width, patch, pred_stride_b, vec);
      const uint32_t group_log2 = log2_exact(group_size(g.units));
      backward_kernel<TP, TI, decltype(v)::value><<<blocks_for(g.rows, group_log2), kThreadsPerBlock, 0, stream>>>(
          static_cast<const TP*>(pred), static_cast<const TI*>(images), static_cast<const A*>(mask),
          static_cast<const A*>(stats), static_cast<const A*>(scale), static_cast<TP*>(d_pred), g, group_log2,
          norm_pix, pred_vec);
      return 0;
    });
  });
  return launch_status(status);
}

}  // namespace pixel_loss
}  // namespace cuda
}  // namespace vitfast
