// Pieces shared by every raw-pointer CUDA kernel file (csrc/cuda/*.cu), their headers and the torch glue.
//
// Host part (plain C++; g++ compiles it in the host-replay tests and the glue .cpp files include it):
//   Stream, DType, FastDivmod, vector_width, kMaxVectorBytes, kIndexLimit, kInvalid.
// Device part (only under nvcc, __CUDACC__): Pack, Acc, to_acc / from_acc, the dtype and vector-width
//   dispatch (runtime value -> template argument), launch_status, VITFAST_KERNEL_ASSERT.
// No torch and no op header here: every op header includes this file and never another op's header.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define VITFAST_HD __host__ __device__ __forceinline__
#else
#define VITFAST_HD inline
#endif

struct CUstream_st;  // cudaStream_t is `CUstream_st*`; declared here so that no CUDA header is needed

namespace vitfast {
namespace cuda {

using Stream = CUstream_st*;

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

constexpr int kMaxVectorBytes = 16;               // one 128-bit load or store
constexpr int64_t kIndexLimit = int64_t(1) << 31;  // per-thread indices are 32-bit below this
constexpr int kInvalid = 1;                       // == cudaErrorInvalidValue: a launcher's "bad sizes"

// Unsigned division by a runtime-invariant divisor d >= 1 for dividends n < 2^31: one multiply-high,
// one add, one shift (Granlund & Montgomery 1994, "round-up" method with l = ceil(log2 d)).
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 1;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    uint32_t l = 0;
    while (l < 32 && (uint64_t(1) << l) < d) ++l;
    shift = l;
    multiplier = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << l) - d)) / d + 1);
  }

  VITFAST_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, multiplier);
#else
    const uint32_t hi = uint32_t((uint64_t(n) * multiplier) >> 32);
#endif
    return (hi + n) >> shift;  // hi <= n < 2^31: no overflow
  }
  VITFAST_HD void divmod(uint32_t n, uint32_t& quotient, uint32_t& remainder) const {
    quotient = div(n);
    remainder = n - quotient * divisor;
  }
};

// Largest vec (elements, a power of two with vec * elem_size <= 16 bytes) dividing `dim` with every
// pointer aligned to vec * elem_size (null pointers ignored): the widest single access that moves `vec`
// consecutive elements of rows of length `dim`.
inline uint32_t vector_width(int elem_size, int64_t dim, const void* a, const void* b = nullptr,
                             const void* c = nullptr) {
  for (int64_t vec = kMaxVectorBytes / elem_size; vec > 1; vec /= 2) {
    const uint64_t bytes = uint64_t(vec) * uint64_t(elem_size);
    const auto aligned = [&](const void* p) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
    if (dim % vec == 0 && aligned(a) && aligned(b) && aligned(c)) return uint32_t(vec);
  }
  return 1;
}

}  // namespace cuda
}  // namespace vitfast

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

// A device-side bounds check that survives NDEBUG (the indices come from user tensors; the Python
// boundary validates them, this catches misuse of the raw op). Failing it aborts the kernel with a
// message naming the condition, like torch's CUDA_KERNEL_ASSERT.
#define VITFAST_KERNEL_ASSERT(cond)                                   \
  do {                                                                \
    if (!(cond)) __assert_fail(#cond, __FILE__, __LINE__, __func__);  \
  } while (0)

namespace vitfast {
namespace cuda {

static_assert(kInvalid == static_cast<int>(cudaErrorInvalidValue), "kInvalid must be cudaErrorInvalidValue");

// N elements moved as one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The accumulation type of element type T: fp32, fp64 for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Calls fn(T{}) with the element type of `dtype`; returns fn's status.
template <typename Fn>
int dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
    case DType::kFloat64: return fn(double{});
  }
  return kInvalid;
}

// Calls fn(std::integral_constant<int, V>{}) for the runtime vector width vec of elements of type T
// (V * sizeof(T) <= 16 bytes); kInvalid for any other vec. fn returns a status.
template <typename T, typename Fn>
int dispatch_vec(uint32_t vec, Fn&& fn) {
  switch (vec) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: if constexpr (sizeof(T) <= 4) return fn(std::integral_constant<int, 4>{}); break;
    case 8: if constexpr (sizeof(T) <= 2) return fn(std::integral_constant<int, 8>{}); break;
    default: break;
  }
  return kInvalid;
}

// A launcher's final status: its own error, else a launch failure of this call (a sticky error from
// earlier work shows up here as well).
inline int launch_status(int status) {
  return status != 0 ? status : static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace vitfast
#endif  // __CUDACC__
