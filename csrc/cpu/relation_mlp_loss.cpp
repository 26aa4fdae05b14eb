// relation_mlp_loss on the CPU: the MLP pair head's loss, out(i, j) = W act(u_i + v_j) + bias, over all (selected)
// ordered pairs, without the [B, N, N, H] hidden activations.
//
// v is transposed once to vT [B, H, N], so that for a query row (b, i) and a hidden unit k the N pre-activations
// u[b, i, k] + vT[b, k, :] form one contiguous row: every inner loop runs over j (unit stride, vectorisable as
// axpy without reassociating sums) and the per-row scratch is O(C * N).
//   forward:  work item = one query row (b, i): out[C, N] = bias + sum_k W[:, k] act(u_ik + vT[k, :]), then the
//             per-pair loss; per-row sums (loss, correct, count) -> [3, B, N], summed in fixed order in double.
//   backward: work item = one batch element b (it owns dU[b] and dVT[b]; dW, dbias go to per-b partials summed in
//             batch order), so results are bitwise reproducible whatever the thread count. Per row the outputs are
//             recomputed, dOut = w * (softmax - y) or w * (out - t), then per hidden unit k the pre-activation row is
//             recomputed: dW[:, k] += dOut h_k, dPre_k = (W[:, k]^T dOut) * act'(pre_k), dU[b, i, k] = sum_j dPre_k,
//             dVT[b, k, :] += dPre_k.
// Reduced precision (fp16/bf16) is converted to fp32 once; everything accumulates in fp32 (fp64 for fp64).
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

namespace vitfast {
namespace {

enum class Task { kDirection, kOffset };
enum class Activation { kGelu, kRelu };

struct Problem {
  int64_t batch, n, hidden, outputs, grid;
  cpu::PairInputs pairs;  // positions, pair mask
  Task task;
  Activation activation;
  double keep, spread, offset_scale;
};

Problem problem(const at::Tensor& u, const at::Tensor& v, const at::Tensor& weight, const at::Tensor& bias,
                const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& pair_mask, int64_t grid,
                c10::string_view task, c10::string_view activation, double smoothing) {
  TORCH_CHECK(u.dim() == 3, "u must be [B, N, H]");
  TORCH_CHECK(v.sizes() == u.sizes() && v.scalar_type() == u.scalar_type(), "v must be [B, N, H] like u");
  Problem p{};
  p.batch = u.size(0), p.n = u.size(1), p.hidden = u.size(2), p.grid = grid;
  TORCH_CHECK(task == "direction" || task == "offset", "task must be direction or offset");
  TORCH_CHECK(activation == "gelu" || activation == "relu", "activation must be gelu or relu");
  p.task = task == "direction" ? Task::kDirection : Task::kOffset;
  p.activation = activation == "gelu" ? Activation::kGelu : Activation::kRelu;
  p.outputs = p.task == Task::kDirection ? 9 : 2;
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == p.outputs && weight.size(1) == p.hidden &&
                  weight.scalar_type() == u.scalar_type(),
              "weight must be [C_out, H] with C_out = 9 (direction) or 2 (offset), in u's dtype");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == p.outputs && bias.scalar_type() == u.scalar_type(),
              "bias must be [C_out] in u's dtype");
  TORCH_CHECK(grid >= 1, "grid_size must be >= 1");
  p.pairs = cpu::pair_inputs(positions, pair_mask, p.batch, p.n);
  p.keep = 1.0 - smoothing;
  p.spread = smoothing / static_cast<double>(p.outputs);
  p.offset_scale = 1.0 / static_cast<double>(std::max<int64_t>(grid - 1, 1));  // S = 1: every offset is 0
  return p;
}

// fp32 GELU rows run N * H erf (and exp) per query row: libm's scalar calls would dominate, so the float path uses
// branch-free approximations the compiler vectorises (per target below): exp(y) for y <= 0 by reduction to
// |r| <= ln2/2 and a degree-7 Taylor polynomial (rel. error < 1e-8 before rounding), and erf(z) for z >= 0 from
// Abramowitz & Stegun 7.1.26 (abs. error <= 1.5e-7), whose exp(-z^2) with z = |x|/sqrt(2) is also the GELU slope's
// exp(-x^2/2). fp64 keeps std::erf / std::exp (gradcheck runs there).

using cpu::exp_nonpositive;  // common.h

template <bool kSlope>
inline __attribute__((always_inline)) void gelu_row(float u_k, const float* vt_k, int64_t n, float* h, float* slope) {
  constexpr float kInvSqrt2 = 0.70710678118654752440f, kInvSqrt2Pi = 0.39894228040143267794f;
  for (int64_t j = 0; j < n; ++j) {
    const float x = u_k + vt_k[j];
    const float e = exp_nonpositive(-0.5f * x * x);  // exp(-z^2), z = |x| / sqrt(2)
    const float t = 1.0f / (1.0f + 0.3275911f * std::fabs(x) * kInvSqrt2);
    const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                      t * 1.061405429f))));
    const float cdf = 0.5f * (1.0f + std::copysign(1.0f - poly * e, x));
    h[j] = x * cdf;
    if constexpr (kSlope) slope[j] = cdf + x * e * kInvSqrt2Pi;
  }
}

// Exact (erf) GELU and its derivative Phi(x) + x phi(x); ReLU's derivative is 0 at 0, as autograd's. Force-inlined
// into the per-row entry points below, which are compiled per target; no branch inside the j loops.
template <typename T>
inline __attribute__((always_inline)) void activate_row(Activation act, T u_k, const T* vt_k, int64_t n, T* h,
                                                        T* slope) {
  if (act == Activation::kGelu) {
    if constexpr (std::is_same_v<T, float>) {
      if (slope != nullptr) {
        gelu_row<true>(u_k, vt_k, n, h, slope);
      } else {
        gelu_row<false>(u_k, vt_k, n, h, nullptr);
      }
    } else {
      constexpr T kInvSqrt2 = T(0.70710678118654752440), kInvSqrt2Pi = T(0.39894228040143267794);
      for (int64_t j = 0; j < n; ++j) {
        const T x = u_k + vt_k[j];
        const T cdf = T(0.5) * (T(1) + std::erf(x * kInvSqrt2));
        h[j] = x * cdf;
        if (slope != nullptr) slope[j] = cdf + x * std::exp(T(-0.5) * x * x) * kInvSqrt2Pi;
      }
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) h[j] = std::max(u_k + vt_k[j], T(0));
  if (slope != nullptr) {
    for (int64_t j = 0; j < n; ++j) slope[j] = u_k + vt_k[j] > T(0) ? T(1) : T(0);
  }
}

// sum_j a[j] b[j] in 8 fixed lanes (vectorisable without reassociation; the same order on every run).
template <typename T>
inline __attribute__((always_inline)) T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t kLanes = 8;
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  T s = 0;
  for (; j < n; ++j) s += a[j] * b[j];
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

template <typename T>
struct Row {
  std::vector<T> out, h, slope, d_out, d_pre;  // out, d_out [C, N]; h, slope, d_pre [N]
  std::vector<int32_t> grid_row, grid_col;     // the grid cells of the batch element's tokens
  int64_t grid_b = -1;

  explicit Row(const Problem& p)
      : out(p.outputs * p.n), h(p.n), slope(p.n), d_out(p.outputs * p.n), d_pre(p.n), grid_row(p.n),
        grid_col(p.n) {}

  void cells(const Problem& p, int64_t b) {
    if (grid_b == b) return;
    p.pairs.grid_cells(b, p.n, p.grid, grid_row.data(), grid_col.data());
    grid_b = b;
  }

  // out[c, :] = bias_c + sum_k W[c, k] act(u[b, i, k] + vT[b, k, :])
  inline __attribute__((always_inline)) void outputs(const Problem& p, const T* u_i, const T* vt_b, const T* w,
                                                     const T* bias) {
    for (int64_t c = 0; c < p.outputs; ++c) std::fill_n(out.data() + c * p.n, p.n, bias[c]);
    for (int64_t k = 0; k < p.hidden; ++k) {
      activate_row<T>(p.activation, u_i[k], vt_b + k * p.n, p.n, h.data(), nullptr);
      for (int64_t c = 0; c < p.outputs; ++c) {
        const T w_ck = w[c * p.hidden + k];
        T* o = out.data() + c * p.n;
        for (int64_t j = 0; j < p.n; ++j) o[j] += w_ck * h[j];
      }
    }
  }

  // Per hidden unit k (pre-activations recomputed): dW[:, k] += dOut h_k, dPre_k = (W[:, k]^T dOut) act'(pre_k),
  // dU[b, i, k] = sum_j dPre_k, dVT[b, k, :] += dPre_k.
  inline __attribute__((always_inline)) void hidden_backward(const Problem& p, const T* u_i, const T* vt_b,
                                                             const T* w, T* d_w_b, T* d_vt_b, T* d_u_i) {
    for (int64_t k = 0; k < p.hidden; ++k) {
      activate_row<T>(p.activation, u_i[k], vt_b + k * p.n, p.n, h.data(), slope.data());
      std::fill(d_pre.begin(), d_pre.end(), T(0));
      for (int64_t c = 0; c < p.outputs; ++c) {
        const T* d_o = d_out.data() + c * p.n;
        const T w_ck = w[c * p.hidden + k];
        d_w_b[c * p.hidden + k] += dot<T>(d_o, h.data(), p.n);
        for (int64_t j = 0; j < p.n; ++j) d_pre[j] += w_ck * d_o[j];
      }
      T* d_vt_bk = d_vt_b + k * p.n;
      for (int64_t j = 0; j < p.n; ++j) {
        d_pre[j] *= slope[j];
        d_vt_bk[j] += d_pre[j];
      }
      T ones_sum = 0;
      for (int64_t j = 0; j < p.n; ++j) ones_sum += d_pre[j];
      d_u_i[k] = ones_sum;
    }
  }

  // Per-pair loss of row i (into the row sums) and, with grad != 0, dOut = grad * d loss / d out (0 off the mask).
  void losses(const Problem& p, int64_t b, int64_t i, T grad, T* loss_sum, T* correct_sum, T* count_sum) {
    const bool* mask = p.pairs.mask_row(b, i, p.n);
    const int64_t classes = p.outputs;
    const T keep = static_cast<T>(p.keep), spread = static_cast<T>(p.spread);
    const T offset_scale = static_cast<T>(p.offset_scale);
    T loss = 0, correct = 0, count = 0;
    for (int64_t j = 0; j < p.n; ++j) {
      if (mask != nullptr && !mask[j]) {
        for (int64_t c = 0; c < classes; ++c) d_out[c * p.n + j] = T(0);
        continue;
      }
      count += T(1);
      const int32_t d_row = grid_row[i] - grid_row[j], d_col = grid_col[i] - grid_col[j];
      if (p.task == Task::kDirection) {
        const int64_t target = cpu::direction_class(grid_row[i], grid_col[i], grid_row[j], grid_col[j]);
        T best = out[j];
        int64_t argmax = 0;
        T total = out[j];
        for (int64_t c = 1; c < classes; ++c) {
          const T o = out[c * p.n + j];
          total += o;
          if (o > best) best = o, argmax = c;  // first maximum on ties, as torch.argmax
        }
        T sum = 0;
        for (int64_t c = 0; c < classes; ++c) sum += std::exp(out[c * p.n + j] - best);
        const T lse = best + std::log(sum);
        // (1 - eps) * nll + eps * mean_c(-log_softmax_c)
        loss += keep * (lse - out[target * p.n + j]) + static_cast<T>(classes) * spread * (lse - total / classes);
        correct += argmax == target ? T(1) : T(0);
        if (grad != T(0)) {
          for (int64_t c = 0; c < classes; ++c) {
            const T y = (c == target ? keep : T(0)) + spread;
            d_out[c * p.n + j] = grad * (std::exp(out[c * p.n + j] - lse) - y);
          }
        }
      } else {
        const T e0 = out[j] - static_cast<T>(d_row) * offset_scale;
        const T e1 = out[p.n + j] - static_cast<T>(d_col) * offset_scale;
        loss += T(0.5) * (e0 * e0 + e1 * e1);  // the mean over the two coordinates
        if (grad != T(0)) d_out[j] = grad * e0, d_out[p.n + j] = grad * e1;
      }
    }
    if (loss_sum != nullptr) *loss_sum = loss, *correct_sum = correct, *count_sum = count;
  }
};

// The per-row loops, compiled per target for fp32 (the GELU approximation and the j loops vectorise there).
VITFAST_SIMD_CLONES void outputs_f32(Row<float>& row, const Problem& p, const float* u_i, const float* vt_b,
                                         const float* w, const float* bias) {
  row.outputs(p, u_i, vt_b, w, bias);
}
VITFAST_SIMD_CLONES void hidden_backward_f32(Row<float>& row, const Problem& p, const float* u_i,
                                                 const float* vt_b, const float* w, float* d_w_b, float* d_vt_b,
                                                 float* d_u_i) {
  row.hidden_backward(p, u_i, vt_b, w, d_w_b, d_vt_b, d_u_i);
}
void outputs_any(Row<float>& row, const Problem& p, const float* u_i, const float* vt_b, const float* w,
                 const float* bias) {
  outputs_f32(row, p, u_i, vt_b, w, bias);
}
void outputs_any(Row<double>& row, const Problem& p, const double* u_i, const double* vt_b, const double* w,
                 const double* bias) {
  row.outputs(p, u_i, vt_b, w, bias);
}
void hidden_backward_any(Row<float>& row, const Problem& p, const float* u_i, const float* vt_b, const float* w,
                         float* d_w_b, float* d_vt_b, float* d_u_i) {
  hidden_backward_f32(row, p, u_i, vt_b, w, d_w_b, d_vt_b, d_u_i);
}
void hidden_backward_any(Row<double>& row, const Problem& p, const double* u_i, const double* vt_b, const double* w,
                         double* d_w_b, double* d_vt_b, double* d_u_i) {
  row.hidden_backward(p, u_i, vt_b, w, d_w_b, d_vt_b, d_u_i);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& u_in, const at::Tensor& v_in,
                                                            const at::Tensor& w_in, const at::Tensor& bias_in,
                                                            const Problem& p) {
  const at::Tensor u = cpu::as_acc<T>(u_in), w = cpu::as_acc<T>(w_in), bias = cpu::as_acc<T>(bias_in);
  const at::Tensor vt = cpu::as_acc<T>(v_in).transpose(1, 2).contiguous();  // [B, H, N]
  std::vector<T> rows(3 * p.batch * p.n);  // per-row loss, correct, count
  T* row_loss = rows.data();
  T* row_correct = row_loss + p.batch * p.n;
  T* row_count = row_correct + p.batch * p.n;
  // Work item = one query row (b, i).
  cpu::parallel_items<Row<T>>(p.batch, p.n, p, [&](Row<T>& row, int64_t b, int64_t i) {
    const int64_t r = b * p.n + i;
    row.cells(p, b);
    outputs_any(row, p, u.const_data_ptr<T>() + r * p.hidden, vt.const_data_ptr<T>() + b * p.hidden * p.n,
                w.const_data_ptr<T>(), bias.const_data_ptr<T>());
    row.losses(p, b, i, T(0), row_loss + r, row_correct + r, row_count + r);
  });
  return cpu::mean_over_pairs(rows.data(), p.batch * p.n, u.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& u, const at::Tensor& v,
                                                       const at::Tensor& weight, const at::Tensor& bias,
                                                       const std::optional<at::Tensor>& positions,
                                                       const std::optional<at::Tensor>& pair_mask, int64_t grid_size,
                                                       c10::string_view task, c10::string_view activation,
                                                       double label_smoothing) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  const Problem p = problem(u, v, weight, bias, positions, pair_mask, grid_size, task, activation, label_smoothing);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "relation_mlp_loss_forward", [&] {
    out = forward_impl<at::opmath_type<scalar_t>>(u, v, weight, bias, p);
  });
  return out;
}

template <typename T>
std::array<at::Tensor, 4> backward_impl(double grad, const at::Tensor& u_in, const at::Tensor& v_in,
                                        const at::Tensor& w_in, const at::Tensor& bias_in, const Problem& p) {
  const at::Tensor u = cpu::as_acc<T>(u_in), w = cpu::as_acc<T>(w_in), bias = cpu::as_acc<T>(bias_in);
  const at::Tensor vt = cpu::as_acc<T>(v_in).transpose(1, 2).contiguous();  // [B, H, N]
  at::Tensor d_u = at::empty(u.sizes(), u.options());
  at::Tensor d_vt = at::zeros(vt.sizes(), u.options());
  at::Tensor d_w_parts = at::zeros({p.batch, p.outputs, p.hidden}, u.options());
  at::Tensor d_bias_parts = at::zeros({p.batch, p.outputs}, u.options());
  const T* up = u.const_data_ptr<T>();
  const T* vtp = vt.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const T* biasp = bias.const_data_ptr<T>();
  const T g = static_cast<T>(grad);
  // Work item = one batch element b.
  cpu::parallel_items<Row<T>>(p.batch, 1, p, [&](Row<T>& row, int64_t b, int64_t) {
    row.cells(p, b);
    const T* vt_b = vtp + b * p.hidden * p.n;
    T* d_vt_b = d_vt.data_ptr<T>() + b * p.hidden * p.n;
    T* d_w_b = d_w_parts.data_ptr<T>() + b * p.outputs * p.hidden;
    T* d_bias_b = d_bias_parts.data_ptr<T>() + b * p.outputs;
    for (int64_t i = 0; i < p.n; ++i) {
      const T* u_i = up + (b * p.n + i) * p.hidden;
      T* d_u_i = d_u.data_ptr<T>() + (b * p.n + i) * p.hidden;
      outputs_any(row, p, u_i, vt_b, wp, biasp);
      row.losses(p, b, i, g, nullptr, nullptr, nullptr);
      for (int64_t c = 0; c < p.outputs; ++c) {
        const T* d_o = row.d_out.data() + c * p.n;
        T s = 0;
        for (int64_t j = 0; j < p.n; ++j) s += d_o[j];
        d_bias_b[c] += s;
      }
      hidden_backward_any(row, p, u_i, vt_b, wp, d_w_b, d_vt_b, d_u_i);
    }
  });
  // Partials summed in batch order: deterministic whatever the thread count.
  at::Tensor d_w = at::zeros({p.outputs, p.hidden}, u.options());
  at::Tensor d_bias = at::zeros({p.outputs}, u.options());
  for (int64_t b = 0; b < p.batch; ++b) {
    const T* src_w = d_w_parts.const_data_ptr<T>() + b * p.outputs * p.hidden;
    const T* src_b = d_bias_parts.const_data_ptr<T>() + b * p.outputs;
    T* dst_w = d_w.data_ptr<T>();
    T* dst_b = d_bias.data_ptr<T>();
    for (int64_t x = 0; x < p.outputs * p.hidden; ++x) dst_w[x] += src_w[x];
    for (int64_t c = 0; c < p.outputs; ++c) dst_b[c] += src_b[c];
  }
  return {d_u, d_vt.transpose(1, 2), d_w, d_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_loss, const at::Tensor& count, const at::Tensor& u, const at::Tensor& v,
    const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& pair_mask, int64_t grid_size, c10::string_view task,
    c10::string_view activation, double label_smoothing, std::array<bool, 4> output_mask) {
  const double grad = cpu::mean_grad(grad_loss, count);
  const Problem p = problem(u, v, weight, bias, positions, pair_mask, grid_size, task, activation, label_smoothing);
  std::array<at::Tensor, 4> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "relation_mlp_loss_backward", [&] {
    grads = backward_impl<at::opmath_type<scalar_t>>(grad, u, v, weight, bias, p);
  });
  return {cpu::requested(grads[0], output_mask[0], u), cpu::requested(grads[1], output_mask[1], v),
          cpu::requested(grads[2], output_mask[2], weight), cpu::requested(grads[3], output_mask[3], bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CPU, m) {
  m.impl("relation_mlp_loss_forward", &forward);
  m.impl("relation_mlp_loss_backward", &backward);
}

}  // namespace vitfast
