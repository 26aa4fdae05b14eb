// self_attention on the CPU: multi-head softmax(Q K^T scale) V straight from the qkv projection's packed output, in
// the kernel-level form of vitfast/ops/self_attention.py.
//
// Work item = one (batch element, head): its whole [N, N] score block is one per-thread buffer (ViT lengths: N = 17 to
// a few hundred tokens, 1.2 KB to ~0.3 MB in fp32, in L1/L2), so the softmax needs no online rescaling and each row is
// normalised exactly once. Per item, single-threaded BLAS GEMMs on row-major tiles (common.h: gemm):
//   forward   S = scale Q K^T, P = softmax_rows(S), lse = logsumexp_rows(S), O = P V
//   backward  P = exp(scale Q K^T - lse), dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)), dQ = scale dS K,
//             dK = scale dS^T Q
// rowsum(P dP) equals rowsum(dO O), so O is not needed by the backward. Only lse ([B, H, N]) is saved; no [B, H, N, N]
// tensor exists at any time. Q, K, V are read in place from qkv [B, N, 3, H, d] (row stride 3 H d) and O is written in
// place into out [B, N, H, d]: the head split and merge (two copies per layer in timm's Attention) are fused away.
// fp16 / bf16 rows are widened to fp32 per item (O(N d)) and every GEMM and the softmax run in fp32 (fp64 for fp64):
// the speed of fp32 whatever the storage dtype. Each item is computed by one thread in a fixed order: the same bits
// for any thread count.
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace vitfast {
namespace {

using cpu::gemm;

struct Shape {
  int64_t batch, tokens, heads, head_dim;
  int64_t dim() const { return heads * head_dim; }  // D = H d
};

Shape shape_of(const at::Tensor& qkv, int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous(), "qkv must be contiguous [B, N, 3 D], got ", qkv.sizes());
  TORCH_CHECK(num_heads > 0 && qkv.size(2) % (3 * num_heads) == 0, "qkv's last size ", qkv.size(2),
              " is not 3 x num_heads (", num_heads, ") x head_dim");
  return {qkv.size(0), qkv.size(1), num_heads, qkv.size(2) / (3 * num_heads)};
}

// A [rows, d] matrix with row stride ld: in place when the storage type is the accumulation type, else widened into
// `buffer` (row stride d).
template <typename T>
struct Rows {
  const T* data;
  int64_t ld;
};

template <typename T, typename S>
Rows<T> rows_in(const S* src, int64_t rows, int64_t d, int64_t ld, T* buffer) {
  if constexpr (std::is_same_v<S, T>) {
    return {src, ld};
  } else {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < d; ++c) buffer[i * d + c] = static_cast<T>(src[i * ld + c]);
    return {buffer, d};
  }
}

// An output [rows, d] with row stride ld: written in place when the storage type is the accumulation type, else
// computed into `buffer` (row stride d) and narrowed by store().
template <typename T, typename S>
struct RowsOut {
  S* dst;
  int64_t rows, d, ld;
  T* buffer;

  T* data() const {
    if constexpr (std::is_same_v<S, T>) return dst;
    else return buffer;
  }
  int64_t stride() const { return std::is_same_v<S, T> ? ld : d; }
  void store() const {
    if constexpr (!std::is_same_v<S, T>) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < d; ++c) dst[i * ld + c] = static_cast<S>(buffer[i * d + c]);
    }
  }
};

// Row-wise softmax of s [n, n] in place, lse[i] = logsumexp of row i. A NaN anywhere in a row makes its max NaN, so
// that the whole row (and the output) is NaN as in the reference, instead of exp() silently dropping the NaN entry.
template <typename T>
inline __attribute__((always_inline)) void softmax_rows(T* s, int64_t n, T* lse) {
  for (int64_t i = 0; i < n; ++i) {
    T* __restrict row = s + i * n;
    T max = -std::numeric_limits<T>::infinity();
    int32_t nan = 0;
#pragma omp simd reduction(max : max) reduction(| : nan)
    for (int64_t j = 0; j < n; ++j) {
      max = std::max(max, row[j]);
      nan |= static_cast<int32_t>(row[j] != row[j]);
    }
    if (nan) max = std::numeric_limits<T>::quiet_NaN();
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const T p = cpu::exp_shifted<T>(row[j] - max);
      row[j] = p;
      sum += p;
    }
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
    lse[i] = max + std::log(sum);
  }
}

// s [n, n] := exp(s - lse_i) row by row: the forward's probabilities from the raw scores and the saved lse.
template <typename T>
inline __attribute__((always_inline)) void probabilities(T* s, int64_t n, const T* lse) {
  for (int64_t i = 0; i < n; ++i) {
    T* __restrict row = s + i * n;
    const T shift = lse[i];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = cpu::exp_shifted<T>(row[j] - shift);
  }
}

// dp [n, n] := p (dp - rowsum(p dp)): the scores' gradient from the probabilities' (softmax backward).
template <typename T>
inline __attribute__((always_inline)) void softmax_backward_rows(const T* p, T* dp, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T* __restrict pr = p + i * n;
    T* __restrict g = dp + i * n;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < n; ++j) dot += pr[j] * g[j];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = pr[j] * (g[j] - dot);
  }
}

// The float passes are compiled per target (common.h: VITFAST_SIMD_CLONES).
VITFAST_SIMD_CLONES void softmax_rows_f32(float* s, int64_t n, float* lse) { softmax_rows<float>(s, n, lse); }
VITFAST_SIMD_CLONES void probabilities_f32(float* s, int64_t n, const float* lse) { probabilities<float>(s, n, lse); }
VITFAST_SIMD_CLONES void softmax_backward_rows_f32(const float* p, float* dp, int64_t n) {
  softmax_backward_rows<float>(p, dp, n);
}

template <typename T>
void softmax_rows_any(T* s, int64_t n, T* lse) {
  if constexpr (std::is_same_v<T, float>) softmax_rows_f32(s, n, lse);
  else softmax_rows<T>(s, n, lse);
}
template <typename T>
void probabilities_any(T* s, int64_t n, const T* lse) {
  if constexpr (std::is_same_v<T, float>) probabilities_f32(s, n, lse);
  else probabilities<T>(s, n, lse);
}
template <typename T>
void softmax_backward_rows_any(const T* p, T* dp, int64_t n) {
  if constexpr (std::is_same_v<T, float>) softmax_backward_rows_f32(p, dp, n);
  else softmax_backward_rows<T>(p, dp, n);
}

// A thread's fp32 copies of fp16 / bf16 [N, d] blocks: `slots` blocks of `size` values, none for fp32 / fp64 storage
// (slot() is then null and unused: those rows are read and written in place).
template <typename T, typename S>
struct Widened {
  std::vector<T> values;
  int64_t size;
  Widened(int64_t slots, int64_t size_) : values(std::is_same_v<S, T> ? 0 : slots * size_), size(size_) {}
  T* slot(int64_t i) { return std::is_same_v<S, T> ? nullptr : values.data() + i * size; }
};

// The three [N, d] inputs of head h of batch element b inside qkv [B, N, 3, H, d] (widened into slots 0-2).
template <typename T, typename S>
struct HeadInputs {
  Rows<T> q, k, v;
  HeadInputs(const S* qkv, const Shape& p, int64_t b, int64_t h, Widened<T, S>& wide) {
    const int64_t n = p.tokens, d = p.head_dim, ld = 3 * p.dim();
    const S* base = qkv + b * n * ld + h * d;
    q = rows_in<T>(base, n, d, ld, wide.slot(0));
    k = rows_in<T>(base + p.dim(), n, d, ld, wide.slot(1));
    v = rows_in<T>(base + 2 * p.dim(), n, d, ld, wide.slot(2));
  }
};

template <typename T, typename S>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& qkv, const Shape& p, T scale) {
  const int64_t n = p.tokens, d = p.head_dim, dim = p.dim();
  at::Tensor out = at::empty({p.batch, n, dim}, qkv.options());
  at::Tensor lse = at::empty({p.batch, p.heads, n}, qkv.options().dtype(c10::CppTypeToScalarType<T>::value));
  if (out.numel() == 0) return {out, lse.zero_()};
  const bool blas = cpu::blas_available(lse.scalar_type());
  const S* x = qkv.const_data_ptr<S>();
  S* o = out.data_ptr<S>();
  T* lse_p = lse.data_ptr<T>();
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t w0, int64_t w1) {
    std::vector<T> scores(n * n);
    Widened<T, S> wide(4, n * d);  // q, k, v, O
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / p.heads, h = w % p.heads;
      const HeadInputs<T, S> in(x, p, b, h, wide);
      const RowsOut<T, S> result{o + b * n * dim + h * d, n, d, dim, wide.slot(3)};
      gemm<T>(blas, false, true, n, n, d, scale, in.q.data, in.q.ld, in.k.data, in.k.ld, T(0), scores.data(), n);
      softmax_rows_any<T>(scores.data(), n, lse_p + w * n);
      gemm<T>(blas, false, false, n, d, n, T(1), scores.data(), n, in.v.data, in.v.ld, T(0), result.data(),
              result.stride());
      result.store();
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& qkv, int64_t num_heads, double scale) {
  const Shape p = shape_of(qkv, num_heads);
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "self_attention_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    result = forward_impl<T, scalar_t>(qkv, p, static_cast<T>(scale));
  });
  return result;
}

template <typename T, typename S>
at::Tensor backward_impl(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse, const Shape& p,
                         T scale) {
  const int64_t n = p.tokens, d = p.head_dim, dim = p.dim(), ld = 3 * dim;
  at::Tensor d_qkv = at::empty(qkv.sizes(), qkv.options());
  if (d_qkv.numel() == 0) return d_qkv;
  const bool blas = cpu::blas_available(lse.scalar_type());
  const S* x = qkv.const_data_ptr<S>();
  const S* g = grad_out.const_data_ptr<S>();
  const T* lse_p = lse.const_data_ptr<T>();
  S* dx = d_qkv.data_ptr<S>();
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t w0, int64_t w1) {
    std::vector<T> probs(n * n), grads(n * n);
    Widened<T, S> wide(7, n * d);  // q, k, v, dO, d_q, d_k, d_v
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / p.heads, h = w % p.heads;
      const HeadInputs<T, S> in(x, p, b, h, wide);
      const Rows<T> d_out = rows_in<T>(g + b * n * dim + h * d, n, d, dim, wide.slot(3));
      S* base = dx + b * n * ld + h * d;
      const RowsOut<T, S> dq{base, n, d, ld, wide.slot(4)}, dk{base + dim, n, d, ld, wide.slot(5)},
          dv{base + 2 * dim, n, d, ld, wide.slot(6)};
      T* s = probs.data();
      gemm<T>(blas, false, true, n, n, d, scale, in.q.data, in.q.ld, in.k.data, in.k.ld, T(0), s, n);
      probabilities_any<T>(s, n, lse_p + w * n);
      gemm<T>(blas, true, false, n, d, n, T(1), s, n, d_out.data, d_out.ld, T(0), dv.data(), dv.stride());
      gemm<T>(blas, false, true, n, n, d, T(1), d_out.data, d_out.ld, in.v.data, in.v.ld, T(0), grads.data(), n);
      softmax_backward_rows_any<T>(s, grads.data(), n);
      gemm<T>(blas, false, false, n, d, n, scale, grads.data(), n, in.k.data, in.k.ld, T(0), dq.data(), dq.stride());
      gemm<T>(blas, true, false, n, d, n, scale, grads.data(), n, in.q.data, in.q.ld, T(0), dk.data(), dk.stride());
      dq.store();
      dk.store();
      dv.store();
    }
  });
  return d_qkv;
}

at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse, int64_t num_heads,
                    double scale) {
  const Shape p = shape_of(qkv, num_heads);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.sizes() == at::IntArrayRef({p.batch, p.tokens, p.dim()}) &&
                  grad_out.scalar_type() == qkv.scalar_type(),
              "grad_out must be contiguous [B, N, D] in qkv's dtype, got ", grad_out.sizes());
  TORCH_CHECK(lse.is_contiguous() && lse.sizes() == at::IntArrayRef({p.batch, p.heads, p.tokens}),
              "lse must be contiguous [B, H, N], got ", lse.sizes());
  at::Tensor d_qkv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "self_attention_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    TORCH_CHECK(lse.scalar_type() == c10::CppTypeToScalarType<T>::value, "lse must be in the accumulation dtype");
    d_qkv = backward_impl<T, scalar_t>(grad_out, qkv, lse, p, static_cast<T>(scale));
  });
  return d_qkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast_C, CPU, m) {
  m.impl("self_attention_forward", &forward);
  m.impl("self_attention_backward", &backward);
}

}  // namespace vitfast
