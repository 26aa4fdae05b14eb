// masked_patch_embed: the memory-bound CUDA kernels (see masked_patch_embed.h for the index conventions).
// The GEMMs (kept patches x weight^T, and the two weight-side GEMMs of the backward) run in cuBLAS from
// the torch glue; this file only moves bytes: raw pointers, sizes, strides and a stream, no torch.
//
//   gather_patches        images -> [B*K, C*p*p] kept patches           (forward, and backward for d_weight)
//   add_bias_pos          tokens += bias + pos_embed[pos_idx]            (forward epilogue)
//   scatter_add_rows      d_pos_embed[pos_idx] += grad_tokens             (backward)
//   scatter_add_patches   d_images[kept pixels] += grad_tokens @ weight   (backward)
//
// Every kernel is one thread per unit of `vec` elements (16 bytes where sizes and alignment allow) with a
// flat 32-bit unit index; launchers split problems above kMaxUnitsPerLaunch units into chunks.
#include "masked_patch_embed.h"  // and common.cuh: Pack, Acc, to_acc/from_acc, the dtype/vector dispatch

#include <algorithm>
#include <cstdint>

namespace vitfast {
namespace cuda {
namespace {

// dst[0..N) += v[0..N) atomically. dst is N-element aligned when `aligned`; Hopper then uses its
// vector float atomics (one RED per 2 or 4 floats), older GPUs one RED per element.
template <int N>
__device__ __forceinline__ void atomic_add_vec(float* dst, const float (&v)[N], bool aligned) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (N % 4 == 0) {
    if (aligned) {
#pragma unroll
      for (int j = 0; j < N; j += 4)
        atomicAdd(reinterpret_cast<float4*>(dst + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
      return;
    }
  } else if constexpr (N == 2) {
    if (aligned) {
      atomicAdd(reinterpret_cast<float2*>(dst), make_float2(v[0], v[1]));
      return;
    }
  }
#endif
#pragma unroll
  for (int j = 0; j < N; ++j) atomicAdd(dst + j, v[j]);
}

template <int N>
__device__ __forceinline__ void atomic_add_vec(double* dst, const double (&v)[N], bool /*aligned*/) {
#pragma unroll
  for (int j = 0; j < N; ++j) atomicAdd(dst + j, v[j]);
}

__device__ __forceinline__ uint32_t flat_index() { return blockIdx.x * uint32_t(blockDim.x) + threadIdx.x; }

// ---- kernels ----

// patches[u] = the unit of the image it maps to. Type-agnostic: `Unit` is a plain bit container of
// vec * kElemBytes bytes (uint4, uint2, unsigned, unsigned short).
template <int kElemBytes, typename Unit>
__global__ void __launch_bounds__(kThreadsPerBlock)
gather_patches_kernel(const char* __restrict__ images, const int64_t* __restrict__ keep_idx,
                      Unit* __restrict__ patches, PatchGeometry g, uint32_t units) {
  const uint32_t u = flat_index();
  if (u >= units) return;
  uint32_t m, r;
  g.split(u, m, r);
  const int64_t n = keep_idx[m];
  VITFAST_KERNEL_ASSERT(n >= 0 && n < g.num_patches);
  const int64_t offset = g.image_offset(m, uint32_t(n), r);
  patches[u] = *reinterpret_cast<const Unit*>(images + offset * kElemBytes);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreadsPerBlock)
add_bias_pos_kernel(Pack<T, kVec>* __restrict__ tokens, const Pack<T, kVec>* __restrict__ bias,
                    const Pack<T, kVec>* __restrict__ pos_embed, const int64_t* __restrict__ pos_idx,
                    FastDivmod units_per_row, int64_t num_positions, uint32_t units) {
  using A = typename Acc<T>::type;
  const uint32_t u = flat_index();
  if (u >= units) return;
  uint32_t m, d;
  units_per_row.divmod(u, m, d);
  const Pack<T, kVec> x = tokens[u];
  A acc[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) acc[j] = to_acc(x.v[j]);
  if (bias != nullptr) {
    const Pack<T, kVec> b = bias[d];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] += to_acc(b.v[j]);
  }
  if (pos_embed != nullptr) {
    const int64_t pos = pos_idx[m];
    VITFAST_KERNEL_ASSERT(pos >= 0 && pos < num_positions);
    const Pack<T, kVec> p = pos_embed[pos * units_per_row.divisor + d];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] += to_acc(p.v[j]);
  }
  Pack<T, kVec> y;
#pragma unroll
  for (int j = 0; j < kVec; ++j) y.v[j] = from_acc<T>(acc[j]);
  tokens[u] = y;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreadsPerBlock)
scatter_add_rows_kernel(const Pack<T, kVec>* __restrict__ grad, const int64_t* __restrict__ pos_idx,
                        typename Acc<T>::type* __restrict__ accum, FastDivmod units_per_row,
                        int64_t num_positions, bool aligned, uint32_t units) {
  using A = typename Acc<T>::type;
  const uint32_t u = flat_index();
  if (u >= units) return;
  uint32_t m, d;
  units_per_row.divmod(u, m, d);
  const int64_t pos = pos_idx[m];
  VITFAST_KERNEL_ASSERT(pos >= 0 && pos < num_positions);
  const Pack<T, kVec> x = grad[u];
  A v[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) v[j] = to_acc(x.v[j]);
  atomic_add_vec<kVec>(accum + (pos * units_per_row.divisor + d) * kVec, v, aligned);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreadsPerBlock)
scatter_add_patches_kernel(const Pack<T, kVec>* __restrict__ patch_grads, const int64_t* __restrict__ keep_idx,
                           typename Acc<T>::type* __restrict__ accum, PatchGeometry g, bool aligned,
                           uint32_t units) {
  using A = typename Acc<T>::type;
  const uint32_t u = flat_index();
  if (u >= units) return;
  uint32_t m, r;
  g.split(u, m, r);
  const int64_t n = keep_idx[m];
  VITFAST_KERNEL_ASSERT(n >= 0 && n < g.num_patches);
  const Pack<T, kVec> x = patch_grads[u];
  A v[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) v[j] = to_acc(x.v[j]);
  atomic_add_vec<kVec>(accum + g.image_offset(m, uint32_t(n), r), v, aligned);
}

// ---- host side ----

inline unsigned blocks_for(int64_t units) {
  return static_cast<unsigned>((units + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline bool valid_patch_problem(int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t patch,
                                int64_t kept) {
  if (batch < 0 || channels < 0 || height < 0 || width < 0 || kept < 0 || patch < 1) return false;
  if (height % patch != 0 || width % patch != 0) return false;
  if (channels * patch * patch >= kIndexLimit || kept >= kIndexLimit) return false;
  const int64_t num_patches = (height / patch) * (width / patch);
  if (num_patches >= kIndexLimit) return false;
  return !(kept > 0 && batch > 0 && num_patches == 0);  // every keep_idx would be out of range
}

template <int kElemBytes, typename Unit>
void gather_patches_impl(const char* images, int64_t batch, int64_t channels, int64_t height, int64_t width,
                         int64_t stride_b, int64_t stride_c, int64_t stride_h, int64_t stride_w, int64_t patch,
                         const int64_t* keep_idx, int64_t kept, char* patches, cudaStream_t stream) {
  constexpr uint32_t vec = sizeof(Unit) / kElemBytes;
  const int64_t row_units = channels * patch * patch / vec;
  const int64_t per_launch = items_per_launch(kept * row_units);
  const PatchGeometry g =
      make_patch_geometry(channels, height, width, patch, kept, stride_b, stride_c, stride_h, stride_w, vec);
  for (int64_t b0 = 0; b0 < batch; b0 += per_launch) {
    const int64_t units = std::min(per_launch, batch - b0) * kept * row_units;
    gather_patches_kernel<kElemBytes, Unit><<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(
        images + b0 * stride_b * kElemBytes, keep_idx + b0 * kept,
        reinterpret_cast<Unit*>(patches + b0 * kept * row_units * sizeof(Unit)), g, uint32_t(units));
  }
}

template <int kElemBytes>
int gather_patches_dispatch(const void* images, int64_t batch, int64_t channels, int64_t height, int64_t width,
                            int64_t stride_b, int64_t stride_c, int64_t stride_h, int64_t stride_w, int64_t patch,
                            const int64_t* keep_idx, int64_t kept, void* patches, cudaStream_t stream) {
  const uint32_t vec =
      patch_vector_width(kElemBytes, patch, stride_b, stride_c, stride_h, stride_w, images, patches);
  const auto run = [&](auto unit) {
    using Unit = decltype(unit);
    if constexpr (sizeof(Unit) >= kElemBytes)  // a unit holds whole elements
      gather_patches_impl<kElemBytes, Unit>(static_cast<const char*>(images), batch, channels, height, width,
                                          stride_b, stride_c, stride_h, stride_w, patch, keep_idx, kept,
                                          static_cast<char*>(patches), stream);
  };
  switch (vec * kElemBytes) {
    case 16: run(uint4{}); break;
    case 8: run(uint2{}); break;
    case 4: run(0u); break;
    case 2: run(static_cast<unsigned short>(0)); break;
    default: return kInvalid;
  }
  return 0;
}

template <typename T, int kVec>
void add_bias_pos_impl(T* tokens, int64_t rows, int64_t dim, const T* bias, const T* pos_embed,
                       const int64_t* pos_idx, int64_t num_positions, cudaStream_t stream) {
  using P = Pack<T, kVec>;
  const int64_t row_units = dim / kVec;
  const int64_t per_launch = items_per_launch(row_units);
  const FastDivmod units_per_row(static_cast<uint32_t>(row_units));
  for (int64_t m0 = 0; m0 < rows; m0 += per_launch) {
    const int64_t units = std::min(per_launch, rows - m0) * row_units;
    add_bias_pos_kernel<T, kVec><<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(
        reinterpret_cast<P*>(tokens + m0 * dim), reinterpret_cast<const P*>(bias),
        reinterpret_cast<const P*>(pos_embed), pos_idx + m0, units_per_row, num_positions, uint32_t(units));
  }
}

template <typename T>
int add_bias_pos_dispatch(void* tokens, int64_t rows, int64_t dim, const void* bias, const void* pos_embed,
                          const int64_t* pos_idx, int64_t num_positions, cudaStream_t stream) {
  const uint32_t vec = vector_width(sizeof(T), dim, tokens, bias, pos_embed);
  const auto run = [&](auto vec_constant) {
    add_bias_pos_impl<T, decltype(vec_constant)::value>(static_cast<T*>(tokens), rows, dim,
                                                        static_cast<const T*>(bias), static_cast<const T*>(pos_embed),
                                                        pos_idx, num_positions, stream);
    return 0;
  };
  return dispatch_vec<T>(vec, run);
}

template <typename T, int kVec>
void scatter_add_rows_impl(const T* grad, int64_t rows, int64_t dim, const int64_t* pos_idx, int64_t num_positions,
                           typename Acc<T>::type* accum, cudaStream_t stream) {
  using P = Pack<T, kVec>;
  const int64_t row_units = dim / kVec;
  const int64_t per_launch = items_per_launch(row_units);
  const FastDivmod units_per_row(static_cast<uint32_t>(row_units));
  const bool aligned = aligned_to(accum, std::min<size_t>(kVec, 4) * sizeof(*accum));
  for (int64_t m0 = 0; m0 < rows; m0 += per_launch) {
    const int64_t units = std::min(per_launch, rows - m0) * row_units;
    scatter_add_rows_kernel<T, kVec><<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(
        reinterpret_cast<const P*>(grad + m0 * dim), pos_idx + m0, accum, units_per_row, num_positions, aligned,
        uint32_t(units));
  }
}

template <typename T>
int scatter_add_rows_dispatch(const void* grad, int64_t rows, int64_t dim, const int64_t* pos_idx,
                              int64_t num_positions, void* accum, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const uint32_t vec = vector_width(sizeof(T), dim, grad);
  const auto run = [&](auto vec_constant) {
    scatter_add_rows_impl<T, decltype(vec_constant)::value>(static_cast<const T*>(grad), rows, dim, pos_idx,
                                                            num_positions, static_cast<A*>(accum), stream);
    return 0;
  };
  return dispatch_vec<T>(vec, run);
}

template <typename T, int kVec>
void scatter_add_patches_impl(const T* patch_grads, int64_t batch, int64_t channels, int64_t height, int64_t width,
                              int64_t patch, const int64_t* keep_idx, int64_t kept, typename Acc<T>::type* accum,
                              cudaStream_t stream) {
  using P = Pack<T, kVec>;
  const int64_t row_units = channels * patch * patch / kVec;
  const int64_t row_elems = channels * patch * patch;
  const int64_t image_elems = channels * height * width;
  const int64_t per_launch = items_per_launch(kept * row_units);
  const PatchGeometry g =
      make_patch_geometry(channels, height, width, patch, kept, image_elems, height * width, width, 1, kVec);
  const bool aligned = aligned_to(accum, std::min<size_t>(kVec, 4) * sizeof(*accum));
  for (int64_t b0 = 0; b0 < batch; b0 += per_launch) {
    const int64_t units = std::min(per_launch, batch - b0) * kept * row_units;
    scatter_add_patches_kernel<T, kVec><<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(
        reinterpret_cast<const P*>(patch_grads + b0 * kept * row_elems), keep_idx + b0 * kept,
        accum + b0 * image_elems, g, aligned, uint32_t(units));
  }
}

template <typename T>
int scatter_add_patches_dispatch(const void* patch_grads, int64_t batch, int64_t channels, int64_t height,
                                 int64_t width, int64_t patch, const int64_t* keep_idx, int64_t kept, void* accum,
                                 cudaStream_t stream) {
  using A = typename Acc<T>::type;
  // The accumulator is contiguous; only the patch_grads rows decide the unit (vec divides p).
  const int64_t hw = height * width;
  const uint32_t vec =
      patch_vector_width(sizeof(T), patch, channels * hw, hw, width, 1, patch_grads, patch_grads);
  const auto run = [&](auto vec_constant) {
    scatter_add_patches_impl<T, decltype(vec_constant)::value>(static_cast<const T*>(patch_grads), batch, channels,
                                                               height, width, patch, keep_idx, kept,
                                                               static_cast<A*>(accum), stream);
    return 0;
  };
  return dispatch_vec<T>(vec, run);
}

}  // namespace

int launch_gather_patches(DType dtype, const void* images, int64_t batch, int64_t channels, int64_t height,
                          int64_t width, int64_t stride_b, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                          int64_t patch, const int64_t* keep_idx, int64_t kept, void* patches, Stream stream) {
  if (!valid_patch_problem(batch, channels, height, width, patch, kept)) return kInvalid;
  if (stride_b < 0 || stride_c < 0 || stride_h < 0 || stride_w < 0) return kInvalid;
  if (batch == 0 || kept == 0 || channels == 0) return 0;
  if (items_per_launch(kept * channels * patch * patch) == 0) return kInvalid;
  int status = kInvalid;
  switch (dtype_size(dtype)) {
    case 2: status = gather_patches_dispatch<2>(images, batch, channels, height, width, stride_b, stride_c, stride_h,
                                                stride_w, patch, keep_idx, kept, patches, stream); break;
    case 4: status = gather_patches_dispatch<4>(images, batch, channels, height, width, stride_b, stride_c, stride_h,
                                                stride_w, patch, keep_idx, kept, patches, stream); break;
    case 8: status = gather_patches_dispatch<8>(images, batch, channels, height, width, stride_b, stride_c, stride_h,
                                                stride_w, patch, keep_idx, kept, patches, stream); break;
    default: break;
  }
  return launch_status(status);
}

int launch_add_bias_pos(DType dtype, void* tokens, int64_t rows, int64_t dim, const void* bias,
                        const void* pos_embed, const int64_t* pos_idx, int64_t num_positions, Stream stream) {
  if (rows < 0 || dim < 0 || dim > kMaxUnitsPerLaunch || num_positions < 0) return kInvalid;
  if (pos_embed != nullptr && pos_idx == nullptr) return kInvalid;
  if (rows == 0 || dim == 0 || (bias == nullptr && pos_embed == nullptr)) return 0;
  const int status = dispatch_dtype(dtype, [&](auto t) {
    return add_bias_pos_dispatch<decltype(t)>(tokens, rows, dim, bias, pos_embed, pos_idx, num_positions, stream);
  });
  return launch_status(status);
}

int launch_scatter_add_rows(DType dtype, const void* grad, int64_t rows, int64_t dim, const int64_t* pos_idx,
                            int64_t num_positions, void* accum, Stream stream) {
  if (rows < 0 || dim < 0 || dim > kMaxUnitsPerLaunch || num_positions < 0) return kInvalid;
  if (rows == 0 || dim == 0) return 0;
  const int status = dispatch_dtype(dtype, [&](auto t) {
    return scatter_add_rows_dispatch<decltype(t)>(grad, rows, dim, pos_idx, num_positions, accum, stream);
  });
  return launch_status(status);
}

int launch_scatter_add_patches(DType dtype, const void* patch_grads, int64_t batch, int64_t channels,
                               int64_t height, int64_t width, int64_t patch, const int64_t* keep_idx,
                               int64_t kept, void* accum, Stream stream) {
  if (!valid_patch_problem(batch, channels, height, width, patch, kept)) return kInvalid;
  if (batch == 0 || kept == 0 || channels == 0) return 0;
  if (items_per_launch(kept * channels * patch * patch) == 0) return kInvalid;
  const int status = dispatch_dtype(dtype, [&](auto t) {
    return scatter_add_patches_dispatch<decltype(t)>(patch_grads, batch, channels, height, width, patch, keep_idx,
                                                     kept, accum, stream);
  });
  return launch_status(status);
}

}  // namespace cuda
}  // namespace vitfast
