// Helpers shared by the torch glue files (*_cuda.cpp) of the raw-pointer CUDA kernels.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <ATen/core/TensorBase.h>

#include "common.cuh"  // vitfast::cuda::DType

namespace vitfast::glue {

// The kernels' element type of a torch dtype; `op` names the op in the error.
inline cuda::DType kernel_dtype(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kDouble: return cuda::DType::kFloat64;
    default: TORCH_CHECK(false, op, " (CUDA): unsupported dtype ", type,
                         "; expected float16, bfloat16, float32 or float64");
  }
  return cuda::DType::kFloat32;  // unreachable
}

// A launcher's status (a cudaError_t) to a Python error naming the op and kernel.
inline void check_launch(int status, const char* op, const char* kernel) {
  TORCH_CHECK(status == 0, op, " (CUDA): ", kernel, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
}

}  // namespace vitfast::glue
