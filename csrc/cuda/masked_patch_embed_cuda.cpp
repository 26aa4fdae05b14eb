// masked_patch_embed on CUDA tensors: the GEMMs in cuBLAS (at::mm / at::addmm), the memory-bound parts
// (gather of the kept patches, bias + pos-embed epilogue, the scatter-adds of the backward) in the
// kernels of masked_patch_embed.cu, all on the current stream. Same semantics as
// csrc/cpu/masked_patch_embed.cpp; the differences are where rounding happens for fp16/bf16: the GEMM
// rounds its [B*K, D] output to the input dtype (cuBLAS accumulates in fp32), then the epilogue adds
// bias + pos-embed in fp32 and rounds once more; the scatter-adds accumulate in fp32 and round once.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "glue.h"
#include "masked_patch_embed.h"

namespace vitfast {
namespace {

namespace kern = vitfast::cuda;

constexpr const char* kOp = "masked_patch_embed";
kern::DType kernel_dtype(at::ScalarType type) { return glue::kernel_dtype(type, kOp); }
void check_launch(int status, const char* kernel) { glue::check_launch(status, kOp, kernel); }

// The accumulation dtype of the scatter-adds: fp32, or fp64 for fp64 inputs.
at::ScalarType accum_type(at::ScalarType type) { return type == at::kDouble ? at::kDouble : at::kFloat; }

struct Geometry {
  int64_t batch, channels, height, width, patch, kept, dim, patch_len;
};

Geometry geometry(const at::Tensor& images, const at::Tensor& weight, const at::Tensor& keep_idx, int64_t patch) {
  TORCH_CHECK(images.is_cuda() && images.dim() == 4, "images must be a CUDA tensor [B, C, H, W], got ",
              images.sizes(), " on ", images.device());
  kernel_dtype(images.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be contiguous [D, C*p*p], got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == images.device() && weight.scalar_type() == images.scalar_type(),
              "weight must be on ", images.device(), " with dtype ", images.scalar_type(), ", got ",
              weight.scalar_type(), " on ", weight.device());
  TORCH_CHECK(keep_idx.dim() == 2 && keep_idx.scalar_type() == at::kLong && keep_idx.is_contiguous() &&
                  keep_idx.device() == images.device() && keep_idx.size(0) == images.size(0),
              "keep_idx must be contiguous int64 [B, K] on ", images.device(), " with B = ", images.size(0),
              ", got ", keep_idx.scalar_type(), " ", keep_idx.sizes(), " on ", keep_idx.device());
  TORCH_CHECK(patch >= 1, "patch_size must be positive, got ", patch);
  Geometry g{images.size(0), images.size(1), images.size(2), images.size(3), patch,
             keep_idx.size(1), weight.size(0), images.size(1) * patch * patch};
  TORCH_CHECK(weight.size(1) == g.patch_len, "weight must be [D, C*p*p] = [D, ", g.patch_len, "], got ",
              weight.sizes());
  TORCH_CHECK(g.height % patch == 0 && g.width % patch == 0, "image size ", g.height, "x", g.width,
              " is not divisible by the patch size ", patch);
  // The kernels index token rows and patch elements with 32-bit arithmetic (see masked_patch_embed.h).
  constexpr int64_t limit = int64_t(1) << 30;
  TORCH_CHECK(g.patch_len * g.kept < limit && g.dim < limit && (g.height / patch) * (g.width / patch) < limit,
              "masked_patch_embed (CUDA): sizes too large (K*C*p*p, D and the number of patches must be < 2^30)");
  return g;
}

void check_pos_idx(const at::Tensor& pos_idx, const at::Tensor& keep_idx) {
  TORCH_CHECK(pos_idx.sizes() == keep_idx.sizes() && pos_idx.scalar_type() == at::kLong &&
                  pos_idx.is_contiguous() && pos_idx.device() == keep_idx.device(),
              "pos_idx must be contiguous int64 ", keep_idx.sizes(), " on ", keep_idx.device(), ", got ",
              pos_idx.scalar_type(), " ", pos_idx.sizes(), " on ", pos_idx.device());
}

// Kept patches [B*K, C*p*p] in Conv2d order (images may have any strides).
at::Tensor gather_patches(const at::Tensor& images, const at::Tensor& keep_idx, const Geometry& g,
                          cudaStream_t stream) {
  at::Tensor patches = at::empty({g.batch * g.kept, g.patch_len}, images.options());
  check_launch(kern::launch_gather_patches(kernel_dtype(images.scalar_type()), images.const_data_ptr(), g.batch,
                                           g.channels, g.height, g.width, images.stride(0), images.stride(1),
                                           images.stride(2), images.stride(3), g.patch,
                                           keep_idx.const_data_ptr<int64_t>(), g.kept, patches.data_ptr(), stream),
               "gather_patches");
  return patches;
}

at::Tensor forward(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& pos_embed, const at::Tensor& keep_idx, const at::Tensor& pos_idx,
                   int64_t patch) {
  const Geometry g = geometry(images, weight, keep_idx, patch);
  check_pos_idx(pos_idx, keep_idx);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_pos = pos_embed.has_value() && pos_embed->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.dim && bias->scalar_type() == images.scalar_type() &&
                    bias->device() == images.device(),
                "bias must be [D] = [", g.dim, "] with the dtype and device of images, got ", bias->scalar_type(),
                " ", bias->sizes(), " on ", bias->device());
  if (has_pos)
    TORCH_CHECK(pos_embed->dim() == 2 && pos_embed->size(1) == g.dim &&
                    pos_embed->scalar_type() == images.scalar_type() && pos_embed->device() == images.device(),
                "pos_embed must be [L, D] with D = ", g.dim, " and the dtype and device of images, got ",
                pos_embed->scalar_type(), " ", pos_embed->sizes(), " on ", pos_embed->device());

  const c10::cuda::CUDAGuard guard(images.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor patches = gather_patches(images, keep_idx, g, stream);  // [B*K, C*p*p]
  at::Tensor tokens;                                                       // [B*K, D]
  if (has_pos) {
    tokens = at::mm(patches, weight.t());
    TORCH_INTERNAL_ASSERT(tokens.is_contiguous());
    const at::Tensor pos = pos_embed->contiguous();
    const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
    check_launch(kern::launch_add_bias_pos(kernel_dtype(images.scalar_type()), tokens.data_ptr(), tokens.size(0),
                                           g.dim, has_bias ? bias_c.const_data_ptr() : nullptr, pos.const_data_ptr(),
                                           pos_idx.const_data_ptr<int64_t>(), pos.size(0), stream),
                 "add_bias_pos");
  } else if (has_bias) {
    tokens = at::addmm(*bias, patches, weight.t());  // cuBLASLt bias epilogue
  } else {
    tokens = at::mm(patches, weight.t());
  }
  return tokens.view({g.batch, g.kept, g.dim});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_tokens, const at::Tensor& images, const at::Tensor& weight, const at::Tensor& keep_idx,
    const at::Tensor& pos_idx, int64_t patch, int64_t num_positions, std::array<bool, 4> output_mask) {
  const Geometry g = geometry(images, weight, keep_idx, patch);
  TORCH_CHECK(grad_tokens.sizes() == at::IntArrayRef({g.batch, g.kept, g.dim}) &&
                  grad_tokens.scalar_type() == images.scalar_type() && grad_tokens.device() == images.device(),
              "grad_tokens must be [B, K, D] = [", g.batch, ", ", g.kept, ", ", g.dim, "] with the dtype and "
              "device of images, got ", grad_tokens.scalar_type(), " ", grad_tokens.sizes(), " on ",
              grad_tokens.device());
  const auto [need_images, need_weight, need_bias, need_pos] = output_mask;

  const c10::cuda::CUDAGuard guard(images.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const kern::DType dtype = kernel_dtype(images.scalar_type());
  const at::ScalarType acc_type = accum_type(images.scalar_type());
  const at::Tensor grad = grad_tokens.contiguous().view({g.batch * g.kept, g.dim});  // [B*K, D]
  at::Tensor d_images, d_weight, d_bias, d_pos;

  if (need_bias) d_bias = grad.sum(0);  // fp32 accumulation inside ATen's reduction for fp16/bf16
  if (need_pos) {
    check_pos_idx(pos_idx, keep_idx);
    TORCH_CHECK(num_positions >= 0, "num_positions must be non-negative, got ", num_positions);
    at::Tensor accum = at::zeros({num_positions, g.dim}, grad.options().dtype(acc_type));
    check_launch(kern::launch_scatter_add_rows(dtype, grad.const_data_ptr(), grad.size(0), g.dim,
                                               pos_idx.const_data_ptr<int64_t>(), num_positions, accum.data_ptr(),
                                               stream),
                 "scatter_add_rows");
    d_pos = accum.to(images.scalar_type());  // no copy for fp32 / fp64
  }
  if (need_weight) {
    // Recompute the kept patches: nothing of size B*K*C*p*p was saved by the forward.
    const at::Tensor patches = gather_patches(images, keep_idx, g, stream);
    d_weight = at::mm(grad.t(), patches);  // [D, C*p*p]
  }
  if (need_images) {
    const at::Tensor patch_grads = at::mm(grad, weight);  // [B*K, C*p*p]
    at::Tensor accum = at::zeros({g.batch, g.channels, g.height, g.width}, grad.options().dtype(acc_type));
    check_launch(kern::launch_scatter_add_patches(dtype, patch_grads.const_data_ptr(), g.batch, g.channels, g.height,
                                                  g.width, g.patch, keep_idx.const_data_ptr<int64_t>(), g.kept,
                                                  accum.data_ptr(), stream),
                 "scatter_add_patches");
    d_images = accum.to(images.scalar_type());
  }
  const auto empty = [&](at::Tensor& t) {
    if (!t.defined()) t = at::empty({0}, images.options());
  };
  empty(d_images), empty(d_weight), empty(d_bias), empty(d_pos);
  return {d_images, d_weight, d_bias, d_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CUDA, m) {
  m.impl("masked_patch_embed_forward", &forward);
  m.impl("masked_patch_embed_backward", &backward);
}

}  // namespace vitfast
