// masked_pixel_loss on CUDA tensors: the kernels of masked_pixel_loss.cu on the current stream, plus two
// reductions over [B*N] values in ATen (deterministic). Same semantics as csrc/cpu/masked_pixel_loss.cpp;
// no host synchronisation (the backward's scale 2 * grad / (p*p*C * sum(mask)) stays on the device).
#include <ATen/TensorOperators.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/div.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "glue.h"
#include "masked_pixel_loss.h"

namespace vitfast {
namespace {

namespace kern = vitfast::cuda;

constexpr const char* kOp = "masked_pixel_loss";
kern::DType kernel_dtype(at::ScalarType type) { return glue::kernel_dtype(type, kOp); }
void check_launch(int status, const char* kernel) { glue::check_launch(status, kOp, kernel); }

struct Geometry {
  int64_t batch, channels, height, width, patch, num_patches, patch_len;
};

Geometry geometry(const at::Tensor& pred, const at::Tensor& images, const at::Tensor& mask, int64_t patch) {
  TORCH_CHECK(patch >= 1, "masked_pixel_loss: patch_size must be positive, got ", patch);
  TORCH_CHECK(images.is_cuda() && images.dim() == 4 && images.is_contiguous(),
              "masked_pixel_loss: images must be a contiguous CUDA tensor [B, C, H, W], got ", images.sizes(), " on ",
              images.device());
  Geometry g{images.size(0), images.size(1), images.size(2), images.size(3), patch,
             (images.size(2) / patch) * (images.size(3) / patch), images.size(1) * patch * patch};
  TORCH_CHECK(g.height % patch == 0 && g.width % patch == 0, "masked_pixel_loss: image size ", g.height, "x",
              g.width, " is not divisible by the patch size ", patch);
  // Rows contiguous, any batch stride (MAE's decoder output without its CLS row is a slice: no copy).
  TORCH_CHECK(pred.device() == images.device() && pred.dim() == 3 && pred.size(0) == g.batch &&
                  pred.size(1) == g.num_patches && pred.size(2) == g.patch_len &&
                  (g.patch_len <= 1 || pred.stride(2) == 1) && (g.num_patches <= 1 || pred.stride(1) == g.patch_len) &&
                  pred.stride(0) >= 0,
              "masked_pixel_loss: pred must be [B, N, p*p*C] = [", g.batch, ", ", g.num_patches, ", ", g.patch_len,
              "] with contiguous rows on ", images.device(), ", got ", pred.sizes(), " with strides ", pred.strides(),
              " on ", pred.device());
  const auto acc = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mask.device() == images.device() && mask.dim() == 2 && mask.is_contiguous() &&
                  mask.size(0) == g.batch && mask.size(1) == g.num_patches && mask.scalar_type() == acc,
              "masked_pixel_loss: mask must be contiguous ", acc, " [B, N] = [", g.batch, ", ", g.num_patches,
              "] on ", images.device(), ", got ", mask.scalar_type(), " ", mask.sizes(), " on ", mask.device());
  kernel_dtype(pred.scalar_type());
  TORCH_CHECK(images.scalar_type() == pred.scalar_type() ||
                  (images.scalar_type() == at::kFloat &&
                   (pred.scalar_type() == at::kHalf || pred.scalar_type() == at::kBFloat16)),
              "masked_pixel_loss: images must have the dtype of pred, or be float32 with a float16/bfloat16 pred; got ",
              images.scalar_type(), " and ", pred.scalar_type());
  // The kernels index rows and patch elements with 32-bit arithmetic (see masked_pixel_loss.h).
  constexpr int64_t limit = int64_t(1) << 31;
  TORCH_CHECK(g.batch * g.num_patches < limit && g.patch_len < limit,
              "masked_pixel_loss (CUDA): sizes too large (B*N and p*p*C must be < 2^31)");
  return g;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& pred, const at::Tensor& images, const at::Tensor& mask,
                                           int64_t patch, bool norm_pix) {
  const Geometry g = geometry(pred, images, mask, patch);
  TORCH_CHECK(!norm_pix || g.patch_len >= 2, "masked_pixel_loss: norm_pix needs p*p*C >= 2");
  const c10::cuda::CUDAGuard guard(images.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor patch_loss = at::empty({g.batch, g.num_patches}, mask.options());  // weighted per-patch losses
  at::Tensor stats = norm_pix ? at::empty({g.batch, g.num_patches, 2}, mask.options()) : at::empty({0}, mask.options());
  check_launch(kern::pixel_loss::launch_forward(kernel_dtype(pred.scalar_type()), kernel_dtype(images.scalar_type()),
                                                pred.const_data_ptr(), pred.stride(0), images.const_data_ptr(),
                                                mask.const_data_ptr(), g.batch, g.channels, g.height, g.width,
                                                g.patch, norm_pix, patch_loss.data_ptr(),
                                                norm_pix ? stats.data_ptr() : nullptr, stream),
               "forward");
  const at::Tensor loss = patch_loss.sum() / mask.sum();
  return {loss.to(c10::promoteTypes(pred.scalar_type(), images.scalar_type())), stats};
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& images,
                    const at::Tensor& mask, const at::Tensor& stats, int64_t patch, bool norm_pix) {
  const Geometry g = geometry(pred, images, mask, patch);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.device() == images.device(),
              "masked_pixel_loss: grad_loss must be a scalar on ", images.device(), ", got ", grad_loss.sizes(), " on ",
              grad_loss.device());
  if (norm_pix)
    TORCH_CHECK(stats.device() == images.device() && stats.dim() == 3 && stats.size(0) == g.batch &&
                    stats.size(1) == g.num_patches && stats.size(2) == 2 && stats.is_contiguous() &&
                    stats.scalar_type() == mask.scalar_type(),
                "masked_pixel_loss: stats must be contiguous ", mask.scalar_type(), " [B, N, 2], got ",
                stats.scalar_type(), " ", stats.sizes());
  const c10::cuda::CUDAGuard guard(images.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // [1] on the device: 2 * grad / (p*p*C * sum(mask)), the same mask sum as the forward.
  const at::Tensor scale =
      (grad_loss.reshape({1}).to(mask.scalar_type()) * 2.0 / (mask.sum() * double(g.patch_len))).contiguous();
  at::Tensor d_pred = at::empty(pred.sizes(), pred.options());  // contiguous, whatever pred's batch stride
  check_launch(kern::pixel_loss::launch_backward(kernel_dtype(pred.scalar_type()), kernel_dtype(images.scalar_type()),
                                                 pred.const_data_ptr(), pred.stride(0), images.const_data_ptr(),
                                                 mask.const_data_ptr(), norm_pix ? stats.const_data_ptr() : nullptr,
                                                 scale.const_data_ptr(), g.batch, g.channels, g.height, g.width,
                                                 g.patch, norm_pix, d_pred.data_ptr(), stream),
               "backward");
  return d_pred;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CUDA, m) {
  m.impl("masked_pixel_loss_forward", &forward);
  m.impl("masked_pixel_loss_backward", &backward);
}

}  // namespace vitfast
