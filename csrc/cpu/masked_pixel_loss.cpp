// masked_pixel_loss on the CPU: MAE's per-patch normalised MSE over masked patches, without a target tensor.
// OpenMP (at::parallel_for) over fixed blocks of patches. A patch whose mask weight is 0 is never read.
// For a masked patch the forward copies its pixels into a per-thread buffer of p*p*C values in MAE's
// (i, j, c) order (L1-resident), takes mean and unbiased variance in two passes over that buffer, then
// the squared error against pred; only (mean, 1/std) per patch is written. The backward recomputes the
// target from the image and those two numbers: d_pred = 2 w (pred - target) / (p*p*C sum(w)) * grad.
// pred may be a batch slice of a bigger tensor (MAE's decoder output without its CLS row: contiguous rows, any
// batch stride), so the decoder output is never copied. Everything is accumulated in opmath (fp32 for
// fp16/bf16/fp32, fp64 for fp64). The loss is summed per fixed block of kPatchesPerBlock patches and the block
// sums in order, so it does not depend on the number of threads.
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace vitfast {
namespace {

constexpr int64_t kPatchesPerBlock = 64;
constexpr double kNormPixEps = 1e-6;  // MAE: (var + 1.e-6) ** .5

struct Geometry {
  int64_t batch, channels, height, width, patch, grid_w, num_patches, patch_len;
  int64_t pred_stride_b;  // elements between images in pred (rows of one image are contiguous)
  int64_t rows() const { return batch * num_patches; }
  int64_t pred_row(int64_t m) const { return (m / num_patches) * pred_stride_b + (m % num_patches) * patch_len; }
};

// pred [B, N, E] with contiguous rows (stride(2) == 1, stride(1) == E); the batch stride is free.
bool rows_contiguous(const at::Tensor& pred) {
  return pred.dim() == 3 && (pred.size(2) <= 1 || pred.stride(2) == 1) &&
         (pred.size(1) <= 1 || pred.stride(1) == pred.size(2)) && pred.stride(0) >= 0;
}

Geometry geometry(const at::Tensor& pred, const at::Tensor& images, const at::Tensor& mask, int64_t patch) {
  TORCH_CHECK(patch >= 1, "masked_pixel_loss: patch_size must be positive, got ", patch);
  TORCH_CHECK(images.dim() == 4 && images.is_contiguous(), "masked_pixel_loss: images must be contiguous [B, C, H, W]");
  Geometry g{images.size(0), images.size(1), images.size(2), images.size(3), patch, images.size(3) / patch,
             (images.size(2) / patch) * (images.size(3) / patch), images.size(1) * patch * patch,
             pred.dim() == 3 ? pred.stride(0) : 0};
  TORCH_CHECK(g.height % patch == 0 && g.width % patch == 0, "masked_pixel_loss: image size ", g.height, "x",
              g.width, " is not divisible by the patch size ", patch);
  TORCH_CHECK(rows_contiguous(pred) && pred.size(0) == g.batch && pred.size(1) == g.num_patches &&
                  pred.size(2) == g.patch_len,
              "masked_pixel_loss: pred must be [B, N, p*p*C] = [", g.batch, ", ", g.num_patches, ", ",
              g.patch_len, "] with contiguous rows, got ", pred.sizes(), " with strides ", pred.strides());
  const auto acc = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mask.dim() == 2 && mask.is_contiguous() && mask.size(0) == g.batch && mask.size(1) == g.num_patches &&
                  mask.scalar_type() == acc,
              "masked_pixel_loss: mask must be contiguous ", acc, " [B, N] = [", g.batch, ", ", g.num_patches,
              "], got ", mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(images.scalar_type() == pred.scalar_type() ||
                  (images.scalar_type() == at::kFloat &&
                   (pred.scalar_type() == at::kHalf || pred.scalar_type() == at::kBFloat16)),
              "masked_pixel_loss: images must have the dtype of pred, or be float32 with a float16/bfloat16 pred; got ",
              images.scalar_type(), " and ", pred.scalar_type());
  return g;
}

// The pixels of patch m in MAE's patchify order: target[(i*p + j)*C + c] = images[b, c, y0 + i, x0 + j].
template <typename image_t, typename acc_t>
inline void gather_target(const Geometry& g, const image_t* images, int64_t m, acc_t* target) {
  const int64_t b = m / g.num_patches, n = m % g.num_patches;
  const image_t* origin = images + cpu::patch_origin(g, b, n);
  for (int64_t c = 0; c < g.channels; ++c)
    for (int64_t i = 0; i < g.patch; ++i) {
      const image_t* line = origin + (c * g.height + i) * g.width;
      acc_t* out = target + i * g.patch * g.channels + c;
      for (int64_t j = 0; j < g.patch; ++j) out[j * g.channels] = static_cast<acc_t>(line[j]);
    }
}

// (mean, 1 / sqrt(unbiased var + eps)) of target[0..len), two passes (the buffer is in L1).
template <typename acc_t>
inline std::pair<acc_t, acc_t> normalisation(const acc_t* target, int64_t len) {
  acc_t sum = 0;
  for (int64_t e = 0; e < len; ++e) sum += target[e];
  const acc_t mean = sum / static_cast<acc_t>(len);
  acc_t m2 = 0;
  for (int64_t e = 0; e < len; ++e) {
    const acc_t d = target[e] - mean;
    m2 += d * d;
  }
  const acc_t var = m2 / static_cast<acc_t>(len - 1);
  return {mean, acc_t(1) / std::sqrt(var + static_cast<acc_t>(kNormPixEps))};
}

template <typename acc_t>
acc_t ordered_sum(const acc_t* values, int64_t count) {
  acc_t total = 0;
  for (int64_t k = 0; k < count; ++k) total += values[k];
  return total;
}

template <typename pred_t, typename image_t>
at::Tensor forward_impl(const Geometry& g, const at::Tensor& pred, const at::Tensor& images, const at::Tensor& mask,
                        bool norm_pix, at::Tensor& stats) {
  using acc_t = at::opmath_type<pred_t>;
  const int64_t rows = g.rows();
  const int64_t blocks = (rows + kPatchesPerBlock - 1) / kPatchesPerBlock;
  std::vector<acc_t> partial(blocks, acc_t(0));
  const pred_t* pred_ptr = pred.const_data_ptr<pred_t>();
  const image_t* image_ptr = images.const_data_ptr<image_t>();
  const acc_t* mask_ptr = mask.const_data_ptr<acc_t>();
  acc_t* stats_ptr = norm_pix ? stats.data_ptr<acc_t>() : nullptr;
  const acc_t inv_len = acc_t(1) / static_cast<acc_t>(g.patch_len);
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> target(g.patch_len);
    for (int64_t k = k0; k < k1; ++k) {
      acc_t block_sum = 0;
      for (int64_t m = k * kPatchesPerBlock; m < std::min(rows, (k + 1) * kPatchesPerBlock); ++m) {
        const acc_t w = mask_ptr[m];
        if (w == acc_t(0)) {  // kept patch: contributes nothing, not read (a NaN weight is not 0 and propagates)
          if (stats_ptr) stats_ptr[2 * m] = stats_ptr[2 * m + 1] = 0;
          continue;
        }
        gather_target(g, image_ptr, m, target.data());
        acc_t mean = 0, rstd = 1;
        if (norm_pix) {
          std::tie(mean, rstd) = normalisation(target.data(), g.patch_len);
          stats_ptr[2 * m] = mean, stats_ptr[2 * m + 1] = rstd;
        }
        const pred_t* row = pred_ptr + g.pred_row(m);
        acc_t squared = 0;
        for (int64_t e = 0; e < g.patch_len; ++e) {
          const acc_t d = static_cast<acc_t>(row[e]) - (target[e] - mean) * rstd;
          squared += d * d;
        }
        block_sum += w * (squared * inv_len);
      }
      partial[k] = block_sum;
    }
  });
  const acc_t loss = ordered_sum(partial.data(), blocks) / ordered_sum(mask_ptr, rows);
  return at::scalar_tensor(loss, pred.options().dtype(c10::promoteTypes(pred.scalar_type(), images.scalar_type())));
}

template <typename pred_t, typename image_t>
void backward_impl(const Geometry& g, const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& images,
                   const at::Tensor& mask, const at::Tensor& stats, bool norm_pix, at::Tensor& d_pred) {
  using acc_t = at::opmath_type<pred_t>;
  const int64_t rows = g.rows();
  const pred_t* pred_ptr = pred.const_data_ptr<pred_t>();
  const image_t* image_ptr = images.const_data_ptr<image_t>();
  const acc_t* mask_ptr = mask.const_data_ptr<acc_t>();
  const acc_t* stats_ptr = norm_pix ? stats.const_data_ptr<acc_t>() : nullptr;
  pred_t* out_ptr = d_pred.data_ptr<pred_t>();
  // The same ordered mask sum as the forward: 2 * grad / (p*p*C * sum(w)).
  const acc_t scale = static_cast<acc_t>(2) * static_cast<acc_t>(grad_loss.item<double>()) /
                      (static_cast<acc_t>(g.patch_len) * ordered_sum(mask_ptr, rows));
  at::parallel_for(0, rows, kPatchesPerBlock, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      pred_t* out = out_ptr + m * g.patch_len;
      const acc_t w = mask_ptr[m];
      if (w == acc_t(0)) {
        std::fill(out, out + g.patch_len, pred_t(0));
        continue;
      }
      const acc_t mean = stats_ptr ? stats_ptr[2 * m] : acc_t(0);
      const acc_t rstd = stats_ptr ? stats_ptr[2 * m + 1] : acc_t(1);
      const acc_t coef = scale * w;
      const pred_t* row = pred_ptr + g.pred_row(m);
      const int64_t b = m / g.num_patches, n = m % g.num_patches;
      const image_t* origin = image_ptr + cpu::patch_origin(g, b, n);
      for (int64_t c = 0; c < g.channels; ++c)
        for (int64_t i = 0; i < g.patch; ++i) {
          const image_t* line = origin + (c * g.height + i) * g.width;
          const int64_t e0 = i * g.patch * g.channels + c;
          for (int64_t j = 0; j < g.patch; ++j) {
            const int64_t e = e0 + j * g.channels;
            const acc_t target = (static_cast<acc_t>(line[j]) - mean) * rstd;
            out[e] = static_cast<pred_t>(coef * (static_cast<acc_t>(row[e]) - target));
          }
        }
    }
  });
}

// Calls fn(pred_t{}, image_t{}) for the (pred, images) dtype pair; geometry() has checked the pair is native.
template <typename Fn>
void dispatch_pair(const at::Tensor& pred, const at::Tensor& images, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "masked_pixel_loss", [&] {
    if (images.scalar_type() == pred.scalar_type()) {
      fn(scalar_t{}, scalar_t{});
    } else if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      fn(scalar_t{}, float{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& pred, const at::Tensor& images, const at::Tensor& mask,
                                           int64_t patch, bool norm_pix) {
  const Geometry g = geometry(pred, images, mask, patch);
  TORCH_CHECK(!norm_pix || g.patch_len >= 2, "masked_pixel_loss: norm_pix needs p*p*C >= 2");
  at::Tensor stats = norm_pix ? at::empty({g.batch, g.num_patches, 2}, mask.options()) : at::empty({0}, mask.options());
  at::Tensor loss;
  dispatch_pair(pred, images, [&](auto p, auto i) {
    loss = forward_impl<decltype(p), decltype(i)>(g, pred, images, mask, norm_pix, stats);
  });
  return {loss, stats};
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& images,
                    const at::Tensor& mask, const at::Tensor& stats, int64_t patch, bool norm_pix) {
  const Geometry g = geometry(pred, images, mask, patch);
  TORCH_CHECK(grad_loss.numel() == 1, "masked_pixel_loss: grad_loss must be a scalar, got ", grad_loss.sizes());
  if (norm_pix)
    TORCH_CHECK(stats.dim() == 3 && stats.size(0) == g.batch && stats.size(1) == g.num_patches && stats.size(2) == 2 &&
                    stats.is_contiguous() && stats.scalar_type() == mask.scalar_type(),
                "masked_pixel_loss: stats must be contiguous ", mask.scalar_type(), " [B, N, 2], got ",
                stats.scalar_type(), " ", stats.sizes());
  at::Tensor d_pred = at::empty(pred.sizes(), pred.options());  // contiguous, whatever pred's batch stride
  dispatch_pair(pred, images, [&](auto p, auto i) {
    backward_impl<decltype(p), decltype(i)>(g, grad_loss, pred, images, mask, stats, norm_pix, d_pred);
  });
  return d_pred;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CPU, m) {
  m.impl("masked_pixel_loss_forward", &forward);
  m.impl("masked_pixel_loss_backward", &backward);
}

}  // namespace vitfast
