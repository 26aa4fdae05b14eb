// masked_patch_embed on the CPU: tiles of whole images, OpenMP (at::parallel_for) over tiles, one
// single-threaded BLAS GEMM per tile on a gathered tile of kept patches. Only kept patches are ever
// embedded, and the gathered tile lives in a per-thread buffer (never a [B*K, C*p*p] tensor).
// Reduced precision (fp16/bf16) is computed in fp32 and rounded once at the end.
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

namespace vitfast {
namespace {

// About this many token rows per tile: large enough for an efficient GEMM, small enough for L2.
constexpr int64_t kTileRows = 128;

struct Geometry {
  int64_t batch, channels, height, width, patch, grid_w, kept, dim, patch_len;
};

Geometry geometry(const at::Tensor& images, const at::Tensor& weight, const at::Tensor& keep_idx, int64_t patch) {
  TORCH_CHECK(images.dim() == 4 && images.is_contiguous(), "images must be contiguous [B, C, H, W]");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be contiguous [D, C*p*p]");
  TORCH_CHECK(keep_idx.dim() == 2 && keep_idx.scalar_type() == at::kLong && keep_idx.is_contiguous(),
              "keep_idx must be contiguous int64 [B, K]");
  Geometry g{images.size(0), images.size(1), images.size(2), images.size(3), patch, images.size(3) / patch,
             keep_idx.size(1), weight.size(0), images.size(1) * patch * patch};
  TORCH_CHECK(weight.size(1) == g.patch_len, "weight must be [D, C*p*p]");
  TORCH_CHECK(g.height % patch == 0 && g.width % patch == 0, "image size not divisible by the patch size");
  return g;
}

// Copies the kept patches of images [b0, b1) into rows of `dst` ([rows, C*p*p], opmath), Conv2d order.
template <typename scalar_t, typename acc_t>
void gather_patches(const Geometry& g, const scalar_t* images, const int64_t* keep_idx, int64_t b0, int64_t b1,
                    acc_t* dst) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t k = 0; k < g.kept; ++k) {
      const int64_t n = keep_idx[b * g.kept + k];
      const scalar_t* src = images + cpu::patch_origin(g, b, n);
      acc_t* row = dst + ((b - b0) * g.kept + k) * g.patch_len;
      for (int64_t c = 0; c < g.channels; ++c)
        for (int64_t i = 0; i < g.patch; ++i) {
          const scalar_t* line = src + (c * g.height + i) * g.width;
          acc_t* out = row + (c * g.patch + i) * g.patch;
          for (int64_t j = 0; j < g.patch; ++j) out[j] = static_cast<acc_t>(line[j]);
        }
    }
  }
}

// Adds the rows `src` ([rows, C*p*p]) back onto the kept patches of images [b0, b1) of `images`.
template <typename acc_t>
void scatter_add_patches(const Geometry& g, const acc_t* src, const int64_t* keep_idx, int64_t b0, int64_t b1,
                         acc_t* images) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t k = 0; k < g.kept; ++k) {
      const int64_t n = keep_idx[b * g.kept + k];
      acc_t* dst = images + cpu::patch_origin(g, b, n);
      const acc_t* row = src + ((b - b0) * g.kept + k) * g.patch_len;
      for (int64_t c = 0; c < g.channels; ++c)
        for (int64_t i = 0; i < g.patch; ++i) {
          acc_t* line = dst + (c * g.height + i) * g.width;
          const acc_t* in = row + (c * g.patch + i) * g.patch;
          for (int64_t j = 0; j < g.patch; ++j) line[j] += in[j];
        }
    }
  }
}

int64_t images_per_tile(const Geometry& g) { return std::max<int64_t>(1, kTileRows / std::max<int64_t>(1, g.kept)); }

at::Tensor forward(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& pos_embed, const at::Tensor& keep_idx, const at::Tensor& pos_idx,
                   int64_t patch) {
  const Geometry g = geometry(images, weight, keep_idx, patch);
  TORCH_CHECK(pos_idx.sizes() == keep_idx.sizes() && pos_idx.scalar_type() == at::kLong && pos_idx.is_contiguous(),
              "pos_idx must be contiguous int64 [B, K]");
  at::Tensor tokens = at::empty({g.batch, g.kept, g.dim}, images.options());
  if (tokens.numel() == 0) return tokens;
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_pos = pos_embed.has_value() && pos_embed->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "masked_patch_embed_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = images.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor weight_t = weight.detach().to(acc_options.dtype()).t().contiguous();  // [C*p*p, D]
    const at::Tensor bias_acc = has_bias ? bias->to(acc_options.dtype()).contiguous() : at::Tensor();
    const at::Tensor pos_acc = has_pos ? pos_embed->contiguous() : at::Tensor();
    const int64_t per_tile = images_per_tile(g);
    const int64_t tiles = (g.batch + per_tile - 1) / per_tile;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      at::Tensor patches = at::empty({per_tile * g.kept, g.patch_len}, acc_options);
      at::Tensor embedded = at::empty({per_tile * g.kept, g.dim}, acc_options);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b0 = t * per_tile, b1 = std::min(g.batch, b0 + per_tile), rows = (b1 - b0) * g.kept;
        gather_patches(g, images.const_data_ptr<scalar_t>(), keep_idx.const_data_ptr<int64_t>(), b0, b1,
                       patches.data_ptr<acc_t>());
        at::Tensor out = embedded.narrow(0, 0, rows);
        at::mm_out(out, patches.narrow(0, 0, rows), weight_t);
        const acc_t* e = out.const_data_ptr<acc_t>();
        const acc_t* bias_ptr = has_bias ? bias_acc.const_data_ptr<acc_t>() : nullptr;
        const scalar_t* pos_ptr = has_pos ? pos_acc.const_data_ptr<scalar_t>() : nullptr;
        const int64_t* pos_rows = pos_idx.const_data_ptr<int64_t>() + b0 * g.kept;
        scalar_t* dst = tokens.data_ptr<scalar_t>() + b0 * g.kept * g.dim;
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* pos_row = has_pos ? pos_ptr + pos_rows[r] * g.dim : nullptr;
          for (int64_t d = 0; d < g.dim; ++d) {
            acc_t v = e[r * g.dim + d];
            if (bias_ptr) v += bias_ptr[d];
            if (pos_row) v += static_cast<acc_t>(pos_row[d]);
            dst[r * g.dim + d] = static_cast<scalar_t>(v);
          }
        }
      }
    });
  });
  return tokens;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_tokens, const at::Tensor& images, const at::Tensor& weight, const at::Tensor& keep_idx,
    const at::Tensor& pos_idx, int64_t patch, int64_t num_positions, std::array<bool, 4> output_mask) {
  const Geometry g = geometry(images, weight, keep_idx, patch);
  TORCH_CHECK(grad_tokens.sizes() == at::IntArrayRef({g.batch, g.kept, g.dim}), "grad_tokens must be [B, K, D]");
  const at::Tensor grad = grad_tokens.contiguous();
  const auto [need_images, need_weight, need_bias, need_pos] = output_mask;
  at::Tensor d_images, d_weight, d_bias, d_pos;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "masked_patch_embed_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor grad_rows = grad.view({g.batch * g.kept, g.dim}).to(acc_dtype);  // [B*K, D]
    if (need_bias) d_bias = grad_rows.sum(0).to(images.scalar_type());
    if (need_pos) {
      // Duplicate positions accumulate (index_add_ is an ordered scatter-add).
      d_pos = at::zeros({num_positions, g.dim}, grad_rows.options());
      d_pos.index_add_(0, pos_idx.reshape(-1), grad_rows);
      d_pos = d_pos.to(images.scalar_type());
    }
    if (!need_images && !need_weight) return;
    // detach(): out= GEMMs refuse inputs flagged requires_grad, even below autograd.
    const at::Tensor weight_acc = weight.detach().to(acc_dtype).contiguous();  // [D, C*p*p]
    const int64_t per_tile = images_per_tile(g);
    const int64_t tiles = (g.batch + per_tile - 1) / per_tile;
    // Per-thread partial weight gradients, summed at the end (deterministic for a fixed thread count).
    const int64_t threads = at::get_num_threads();
    at::Tensor d_weight_parts = need_weight ? at::zeros({threads, g.dim, g.patch_len}, grad_rows.options()) : at::Tensor();
    at::Tensor d_images_acc = need_images ? at::zeros(images.sizes(), grad_rows.options()) : at::Tensor();
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      at::Tensor patches = at::empty({per_tile * g.kept, g.patch_len}, grad_rows.options());
      at::Tensor part = need_weight ? d_weight_parts[at::get_thread_num()] : at::Tensor();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b0 = t * per_tile, b1 = std::min(g.batch, b0 + per_tile), rows = (b1 - b0) * g.kept;
        const at::Tensor grad_tile = grad_rows.narrow(0, b0 * g.kept, rows);
        at::Tensor tile = patches.narrow(0, 0, rows);
        if (need_weight) {
          gather_patches(g, images.const_data_ptr<scalar_t>(), keep_idx.const_data_ptr<int64_t>(), b0, b1,
                         tile.data_ptr<acc_t>());
          part.addmm_(grad_tile.t(), tile);
        }
        if (need_images) {
          at::mm_out(tile, grad_tile, weight_acc);  // [rows, C*p*p]: d(patch) = g @ W
          scatter_add_patches(g, tile.const_data_ptr<acc_t>(), keep_idx.const_data_ptr<int64_t>(), b0, b1,
                              d_images_acc.data_ptr<acc_t>());
        }
      }
    });
    if (need_weight) d_weight = d_weight_parts.sum(0).to(images.scalar_type());
    if (need_images) d_images = d_images_acc.to(images.scalar_type());
  });
  const auto empty = [&](at::Tensor& t) { if (!t.defined()) t = at::empty({0}, images.options()); };
  empty(d_images), empty(d_weight), empty(d_bias), empty(d_pos);
  return {d_images, d_weight, d_bias, d_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CPU, m) {
  m.impl("masked_patch_embed_forward", &forward);
  m.impl("masked_patch_embed_backward", &backward);
}

}  // namespace vitfast
