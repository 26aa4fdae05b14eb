"""Host-side check of the index math of the CUDA kernels of masked_patch_embed (no GPU needed).

csrc/cuda/masked_patch_embed.h keeps everything a kernel thread computes before it touches memory
(FastDivmod, the token-row -> pixel mapping, the choice of vector width, the chunking of big launches)
in __host__ __device__ functions. This test compiles that header with g++ into a small shared library
whose functions replay each kernel of masked_patch_embed.cu on the host (same launch plan, same per-unit
index math, a plain loop instead of a grid), and checks the results against torch on CPU tensors.
Values are small integers, so every sum is exact and comparisons are exact.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

HEADER_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")

# Element size in bytes -> storage dtype of the replays (int16 stands in for fp16/bf16: same size and
# alignment; the index math does not depend on the element type).
DTYPES = {2: torch.int16, 4: torch.float32, 8: torch.float64}

REPLAY_SOURCE = r"""
#include "masked_patch_embed.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>

using namespace vitfast::cuda;

namespace {

// Each replay mirrors one launcher of masked_patch_embed.cu: vector width, chunks of at most
// `max_units` units (kMaxUnitsPerLaunch on the GPU), then the kernel body for every unit u of a chunk.
// Returns the vector width (elements per unit), -1 for an out-of-range index (a device assert on the
// GPU), -2 when one item does not fit in a launch, -4 when an access would leave its buffer (a wrong
// mapping then fails the test instead of crashing it).

// [offset, offset + count) inside [0, size)?
bool inside(int64_t offset, int64_t count, int64_t size) { return offset >= 0 && offset + count <= size; }

template <typename S>
int64_t add_bias_pos(S* tokens, int64_t rows, int64_t dim, const S* bias, const S* pos_embed,
                     const int64_t* pos_idx, int64_t num_positions, int64_t max_units) {
  const uint32_t vec = vector_width(sizeof(S), dim, tokens, bias, pos_embed);
  const int64_t row_units = dim / vec;
  const int64_t per_launch = items_per_launch(row_units, max_units);
  if (per_launch == 0) return -2;
  const FastDivmod units_per_row(static_cast<uint32_t>(row_units));
  for (int64_t m0 = 0; m0 < rows; m0 += per_launch) {
    S* chunk = tokens + m0 * dim;
    const int64_t* chunk_pos = pos_idx + m0;
    const int64_t units = std::min(per_launch, rows - m0) * row_units;
    for (uint32_t u = 0; u < units; ++u) {
      uint32_t m, d;
      units_per_row.divmod(u, m, d);
      for (uint32_t j = 0; j < vec; ++j) {
        double acc = chunk[int64_t(u) * vec + j];
        if (bias != nullptr) acc += bias[int64_t(d) * vec + j];
        if (pos_embed != nullptr) {
          const int64_t pos = chunk_pos[m];
          if (pos < 0 || pos >= num_positions) return -1;
          const int64_t offset = (pos * units_per_row.divisor + d) * vec + j;
          if (!inside(offset, 1, num_positions * dim)) return -4;
          acc += pos_embed[offset];
        }
        chunk[int64_t(u) * vec + j] = static_cast<S>(acc);
      }
    }
  }
  return vec;
}

template <typename S>
int64_t scatter_add_rows(const S* grad, int64_t rows, int64_t dim, const int64_t* pos_idx,
                         int64_t num_positions, double* accum, int64_t max_units) {
  const uint32_t vec = vector_width(sizeof(S), dim, grad);
  const int64_t row_units = dim / vec;
  const int64_t per_launch = items_per_launch(row_units, max_units);
  if (per_launch == 0) return -2;
  const FastDivmod units_per_row(static_cast<uint32_t>(row_units));
  for (int64_t m0 = 0; m0 < rows; m0 += per_launch) {
    const S* chunk = grad + m0 * dim;
    const int64_t* chunk_pos = pos_idx + m0;
    const int64_t units = std::min(per_launch, rows - m0) * row_units;
    for (uint32_t u = 0; u < units; ++u) {
      uint32_t m, d;
      units_per_row.divmod(u, m, d);
      const int64_t pos = chunk_pos[m];
      if (pos < 0 || pos >= num_positions) return -1;
      const int64_t offset = (pos * units_per_row.divisor + d) * vec;
      if (!inside(offset, vec, num_positions * dim)) return -4;
      double* dst = accum + offset;
      for (uint32_t j = 0; j < vec; ++j) dst[j] += chunk[int64_t(u) * vec + j];
    }
  }
  return vec;
}

template <typename S>
int64_t scatter_add_patches(const S* patch_grads, int64_t batch, int64_t channels, int64_t height, int64_t width,
                            int64_t patch, const int64_t* keep_idx, int64_t kept, double* accum,
                            int64_t max_units) {
  const int64_t hw = height * width;
  const uint32_t vec = patch_vector_width(sizeof(S), patch, channels * hw, hw, width, 1, patch_grads, patch_grads);
  const int64_t row_units = channels * patch * patch / vec;
  const int64_t row_elems = channels * patch * patch;
  const int64_t image_elems = channels * hw;
  const int64_t per_launch = items_per_launch(kept * row_units, max_units);
  if (per_launch == 0) return -2;
  const PatchGeometry g = make_patch_geometry(channels, height, width, patch, kept, image_elems, hw, width, 1, vec);
  for (int64_t b0 = 0; b0 < batch; b0 += per_launch) {
    const S* chunk = patch_grads + b0 * kept * row_elems;
    const int64_t* chunk_keep = keep_idx + b0 * kept;
    double* chunk_accum = accum + b0 * image_elems;
    const int64_t units = std::min(per_launch, batch - b0) * kept * row_units;
    for (uint32_t u = 0; u < units; ++u) {
      uint32_t m, r;
      g.split(u, m, r);
      const int64_t n = chunk_keep[m];
      if (n < 0 || n >= g.num_patches) return -1;
      const int64_t offset = g.image_offset(m, uint32_t(n), r);
      if (!inside(offset + b0 * image_elems, vec, batch * image_elems)) return -4;
      double* dst = chunk_accum + offset;
      for (uint32_t j = 0; j < vec; ++j) dst[j] += chunk[int64_t(u) * vec + j];
    }
  }
  return vec;
}

}  // namespace

extern "C" {

int64_t replay_gather(int64_t elem, const char* images, int64_t batch, int64_t channels, int64_t height,
                      int64_t width, int64_t stride_b, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                      int64_t patch, const int64_t* keep_idx, int64_t kept, char* patches, int64_t max_units,
                      int64_t image_span) {
  const uint32_t vec = patch_vector_width(int(elem), patch, stride_b, stride_c, stride_h, stride_w, images, patches);
  const int64_t unit_bytes = int64_t(vec) * elem;
  const int64_t row_units = channels * patch * patch / vec;
  const int64_t per_launch = items_per_launch(kept * row_units, max_units);
  if (per_launch == 0) return -2;
  const PatchGeometry g =
      make_patch_geometry(channels, height, width, patch, kept, stride_b, stride_c, stride_h, stride_w, vec);
  for (int64_t b0 = 0; b0 < batch; b0 += per_launch) {
    const char* chunk_images = images + b0 * stride_b * elem;
    const int64_t* chunk_keep = keep_idx + b0 * kept;
    char* chunk_patches = patches + b0 * kept * row_units * unit_bytes;
    const int64_t units = std::min(per_launch, batch - b0) * kept * row_units;
    for (uint32_t u = 0; u < units; ++u) {
      uint32_t m, r;
      g.split(u, m, r);
      const int64_t n = chunk_keep[m];
      if (n < 0 || n >= g.num_patches) return -1;
      const int64_t offset = g.image_offset(m, uint32_t(n), r);
      if (!inside(offset + b0 * stride_b, vec, image_span)) return -4;
      std::memcpy(chunk_patches + int64_t(u) * unit_bytes, chunk_images + offset * elem, size_t(unit_bytes));
    }
  }
  return vec;
}

int64_t replay_add_bias_pos(int64_t elem, void* tokens, int64_t rows, int64_t dim, const void* bias,
                            const void* pos_embed, const int64_t* pos_idx, int64_t num_positions,
                            int64_t max_units) {
  switch (elem) {
    case 2: return add_bias_pos(static_cast<int16_t*>(tokens), rows, dim, static_cast<const int16_t*>(bias),
                                static_cast<const int16_t*>(pos_embed), pos_idx, num_positions, max_units);
    case 4: return add_bias_pos(static_cast<float*>(tokens), rows, dim, static_cast<const float*>(bias),
                                static_cast<const float*>(pos_embed), pos_idx, num_positions, max_units);
    case 8: return add_bias_pos(static_cast<double*>(tokens), rows, dim, static_cast<const double*>(bias),
                                static_cast<const double*>(pos_embed), pos_idx, num_positions, max_units);
  }
  return -3;
}

int64_t replay_scatter_add_rows(int64_t elem, const void* grad, int64_t rows, int64_t dim, const int64_t* pos_idx,
                                int64_t num_positions, double* accum, int64_t max_units) {
  switch (elem) {
    case 2: return scatter_add_rows(static_cast<const int16_t*>(grad), rows, dim, pos_idx, num_positions, accum, max_units);
    case 4: return scatter_add_rows(static_cast<const float*>(grad), rows, dim, pos_idx, num_positions, accum, max_units);
    case 8: return scatter_add_rows(static_cast<const double*>(grad), rows, dim, pos_idx, num_positions, accum, max_units);
  }
  return -3;
}

int64_t replay_scatter_add_patches(int64_t elem, const void* patch_grads, int64_t batch, int64_t channels,
                                   int64_t height, int64_t width, int64_t patch, const int64_t* keep_idx,
                                   int64_t kept, double* accum, int64_t max_units) {
  switch (elem) {
    case 2: return scatter_add_patches(static_cast<const int16_t*>(patch_grads), batch, channels, height, width,
                                       patch, keep_idx, kept, accum, max_units);
    case 4: return scatter_add_patches(static_cast<const float*>(patch_grads), batch, channels, height, width,
                                       patch, keep_idx, kept, accum, max_units);
    case 8: return scatter_add_patches(static_cast<const double*>(patch_grads), batch, channels, height, width,
                                       patch, keep_idx, kept, accum, max_units);
  }
  return -3;
}

// Number of (divisor, dividend) pairs where FastDivmod disagrees with / and %: all dividends below 4096
// for divisors up to 1024, the top of the dividend range for every divisor, plus random pairs.
int64_t check_fastdivmod(uint64_t seed, int64_t samples) {
  int64_t failures = 0;
  const auto check = [&](const FastDivmod& f, uint32_t n) {
    uint32_t q, r;
    f.divmod(n, q, r);
    failures += (q != n / f.divisor || r != n % f.divisor);
  };
  const uint32_t top = 0x7fffffffu;  // largest dividend the kernels use
  for (uint32_t d = 1; d <= 1024; ++d) {
    const FastDivmod f(d);
    for (uint32_t n = 0; n < 4096; ++n) check(f, n);
    for (uint32_t n = top; n > top - 4096; --n) check(f, n);
  }
  std::mt19937_64 rng(seed);
  for (int64_t s = 0; s < samples; ++s) {
    const uint32_t shift = uint32_t(rng() % 31);
    uint32_t d = uint32_t((rng() >> 33) >> shift);  // 31 random bits, shifted: divisors of every magnitude
    if (s % 4 == 1) d = uint32_t(1) << shift;
    if (s % 4 == 2) d = (uint32_t(1) << shift) + 1;
    if (s % 4 == 3) d = top - uint32_t(rng() % 1024);
    if (d == 0) d = 1;
    const FastDivmod f(d);
    const uint32_t n = uint32_t(rng()) & top;
    check(f, n);
    check(f, top);
    check(f, top - top % d);
    if (top - top % d > 0) check(f, top - top % d - 1);
  }
  return failures;
}

}  // extern "C"
"""

I64, PTR = ctypes.c_int64, ctypes.c_void_p


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    build = tmp_path_factory.mktemp("masked_patch_embed_indexing")
    source, library = build / "replay.cpp", build / "libreplay.so"
    source.write_text(REPLAY_SOURCE)
    command = ["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
               "-I", str(HEADER_DIR), str(source), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"g++ failed on the header:\n{result.stderr}"
    lib = ctypes.CDLL(str(library))
    lib.replay_gather.argtypes = [I64, PTR] + [I64] * 9 + [PTR, I64, PTR, I64, I64]
    lib.replay_add_bias_pos.argtypes = [I64, PTR, I64, I64, PTR, PTR, PTR, I64, I64]
    lib.replay_scatter_add_rows.argtypes = [I64, PTR, I64, I64, PTR, I64, PTR, I64]
    lib.replay_scatter_add_patches.argtypes = [I64, PTR] + [I64] * 5 + [PTR, I64, PTR, I64]
    lib.check_fastdivmod.argtypes = [ctypes.c_uint64, I64]
    for name in ("replay_gather", "replay_add_bias_pos", "replay_scatter_add_rows", "replay_scatter_add_patches",
                 "check_fastdivmod"):
        getattr(lib, name).restype = I64
    return lib


def seed(*key):
    return zlib.crc32(repr(key).encode())


def ptr(tensor):
    return None if tensor is None else tensor.data_ptr()


def span(tensor):
    """Elements reachable from tensor.data_ptr() through its strides."""
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def small_ints(shape, dtype, generator):
    return torch.randint(-8, 9, shape, generator=generator).to(dtype)


def all_patches(images, patch):
    """[B, N, C*p*p] in Conv2d order: the spec of the mapping."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def fold_patches(rows, shape, patch):
    """Inverse of all_patches: [B, N, C*p*p] -> [B, C, H, W]."""
    b, c, h, w = shape
    x = rows.reshape(b, h // patch, w // patch, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# (B, C, H, W, p, K): square and non-square grids, odd and even patch sizes, K > N (forced duplicates).
SHAPES = [
    (2, 3, 32, 32, 16, 3),
    (3, 3, 28, 42, 14, 5),
    (2, 1, 8, 12, 4, 7),
    (1, 5, 6, 10, 2, 9),
    (4, 2, 21, 14, 7, 4),
    (2, 3, 8, 8, 8, 1),
]

# Image layouts: the gather kernel takes any element strides.
LAYOUTS = ["contiguous", "channels_last", "strided_width", "padded_rows", "misaligned"]


def make_images(shape, dtype, layout, generator):
    b, c, h, w = shape
    if layout == "contiguous":
        return small_ints(shape, dtype, generator)
    if layout == "channels_last":
        return small_ints(shape, dtype, generator).contiguous(memory_format=torch.channels_last)
    if layout == "strided_width":
        return small_ints((b, c, h, 2 * w), dtype, generator)[..., ::2]
    if layout == "padded_rows":  # row stride W + 8: still vectorisable when p allows it
        return small_ints((b, c, h, w + 8), dtype, generator)[..., :w]
    if layout == "misaligned":  # base pointer one element past an aligned address
        flat = small_ints((b * c * h * w + 1,), dtype, generator)
        return flat[1:].view(shape)
    raise ValueError(layout)


@pytest.mark.parametrize("elem", sorted(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gather_matches_patchify(replay, shape, layout, elem):
    b, c, h, w, p, k = shape
    gen = torch.Generator().manual_seed(seed(shape, layout, elem))
    images = make_images((b, c, h, w), DTYPES[elem], layout, gen)
    n = (h // p) * (w // p)
    keep_idx = torch.randint(0, n, (b, k), generator=gen)
    expected = torch.gather(all_patches(images, p), 1, keep_idx[..., None].expand(-1, -1, c * p * p))
    expected = expected.reshape(b * k, c * p * p)
    # The default launch plan, one image per launch, and a ragged number of images per launch.
    for max_units in (1 << 30, k * c * p * p, 2 * k * c * p * p + 1):
        patches = torch.full((b * k, c * p * p), 99, dtype=images.dtype)
        vec = replay.replay_gather(elem, ptr(images), b, c, h, w, *images.stride(), p, ptr(keep_idx), k,
                                   ptr(patches), max_units, span(images))
        assert vec >= 1, vec
        assert p % vec == 0 and vec * elem <= 16
        if layout in ("strided_width", "misaligned") or (layout == "channels_last" and c > 1):
            assert vec == 1, f"{layout} images must take the scalar path, got vec={vec}"
        torch.testing.assert_close(patches, expected, rtol=0, atol=0)


@pytest.mark.parametrize("elem, patch, expected_vec", [
    (4, 16, 4), (4, 14, 2), (4, 8, 4), (4, 7, 1), (4, 2, 2),   # fp32
    (2, 16, 8), (2, 14, 2), (2, 8, 8), (2, 4, 4), (2, 2, 2),   # fp16 / bf16
    (8, 16, 2), (8, 7, 1),                                     # fp64
])
def test_gather_vector_width(replay, elem, patch, expected_vec):
    """16-byte units wherever p allows, narrower ones otherwise (contiguous, aligned images)."""
    b, c, k = 2, 3, 2
    images = torch.zeros((b, c, 2 * patch, 3 * patch), dtype=DTYPES[elem])
    keep_idx = torch.zeros((b, k), dtype=torch.int64)
    patches = torch.empty((b * k, c * patch * patch), dtype=images.dtype)
    vec = replay.replay_gather(elem, ptr(images), *images.shape, *images.stride(), patch, ptr(keep_idx), k,
                               ptr(patches), 1 << 30, span(images))
    assert vec == expected_vec


def test_gather_rejects_out_of_range_patches(replay):
    b, c, h, w, p, k = 2, 3, 8, 12, 4, 3
    images = torch.zeros((b, c, h, w), dtype=torch.float32)
    patches = torch.empty((b * k, c * p * p), dtype=images.dtype)
    n = (h // p) * (w // p)
    for bad in (n, -1):
        keep_idx = torch.tensor([[0, 1, 2], [n - 1, bad, 0]])
        assert replay.replay_gather(4, ptr(images), b, c, h, w, *images.stride(), p, ptr(keep_idx), k,
                                    ptr(patches), 1 << 30, span(images)) == -1
    keep_idx = torch.tensor([[0, 1, 2], [n - 1, 0, 0]])
    assert replay.replay_gather(4, ptr(images), b, c, h, w, *images.stride(), p, ptr(keep_idx), k,
                                ptr(patches), 1 << 30, span(images)) >= 1


@pytest.mark.parametrize("elem", sorted(DTYPES))
@pytest.mark.parametrize("dim", [1, 3, 8, 24, 100, 192])
@pytest.mark.parametrize("terms", ["bias+pos", "pos", "bias"])
def test_add_bias_pos(replay, elem, dim, terms):
    rows, positions = 37, 11
    gen = torch.Generator().manual_seed(dim * 10 + elem)
    dtype = DTYPES[elem]
    tokens = small_ints((rows, dim), dtype, gen)
    bias = small_ints((dim,), dtype, gen) if "bias" in terms else None
    pos_embed = small_ints((positions, dim), dtype, gen) if "pos" in terms else None
    pos_idx = torch.randint(0, positions, (rows,), generator=gen)
    expected = tokens.double()
    if bias is not None:
        expected = expected + bias.double()
    if pos_embed is not None:
        expected = expected + pos_embed.double()[pos_idx]
    for max_units in (1 << 30, dim, 3 * dim + 1):
        out = tokens.clone()
        vec = replay.replay_add_bias_pos(elem, ptr(out), rows, dim, ptr(bias), ptr(pos_embed), ptr(pos_idx),
                                         positions, max_units)
        assert vec >= 1 and dim % vec == 0 and vec * elem <= 16
        if dim % (16 // elem) == 0:
            assert vec == 16 // elem, "aligned rows whose width allows 16-byte units must use them"
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("elem", sorted(DTYPES))
@pytest.mark.parametrize("dim", [1, 6, 16, 40, 192])
def test_scatter_add_rows_accumulates_duplicates(replay, elem, dim):
    rows, positions = 53, 7  # rows >> positions: every position repeats
    gen = torch.Generator().manual_seed(dim * 10 + elem)
    grad = small_ints((rows, dim), DTYPES[elem], gen)
    pos_idx = torch.randint(0, positions, (rows,), generator=gen)
    expected = torch.zeros((positions, dim), dtype=torch.float64).index_add_(0, pos_idx, grad.double())
    for max_units in (1 << 30, dim, 5 * dim + 3):
        accum = torch.zeros((positions, dim), dtype=torch.float64)
        vec = replay.replay_scatter_add_rows(elem, ptr(grad), rows, dim, ptr(pos_idx), positions, ptr(accum),
                                             max_units)
        assert vec >= 1 and dim % vec == 0
        torch.testing.assert_close(accum, expected, rtol=0, atol=0)
    bad = pos_idx.clone()
    bad[-1] = positions
    accum = torch.zeros((positions, dim), dtype=torch.float64)
    assert replay.replay_scatter_add_rows(elem, ptr(grad), rows, dim, ptr(bad), positions, ptr(accum), 1 << 30) == -1


@pytest.mark.parametrize("elem", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scatter_add_patches_is_the_adjoint_of_gather(replay, shape, elem):
    b, c, h, w, p, k = shape
    gen = torch.Generator().manual_seed(seed(shape, elem))
    n = (h // p) * (w // p)
    keep_idx = torch.randint(0, n, (b, k), generator=gen)  # duplicates included
    keep_idx[0, 0] = keep_idx[0, -1]  # at least one duplicate when K > 1
    patch_grads = small_ints((b * k, c * p * p), DTYPES[elem], gen)
    per_patch = torch.zeros((b, n, c * p * p), dtype=torch.float64)
    per_patch.scatter_add_(1, keep_idx[..., None].expand(-1, -1, c * p * p), patch_grads.double().view(b, k, -1))
    expected = fold_patches(per_patch, (b, c, h, w), p)
    for max_units in (1 << 30, k * c * p * p, 2 * k * c * p * p + 1):
        accum = torch.zeros((b, c, h, w), dtype=torch.float64)
        vec = replay.replay_scatter_add_patches(elem, ptr(patch_grads), b, c, h, w, p, ptr(keep_idx), k, ptr(accum),
                                                max_units)
        assert vec >= 1 and p % vec == 0 and vec * elem <= 16
        torch.testing.assert_close(accum, expected, rtol=0, atol=0)


def test_fastdivmod(replay):
    assert replay.check_fastdivmod(1234, 200_000) == 0


def test_kernel_sources_do_not_include_torch():
    """The .cu and its header must compile with nvcc alone (see vitfast/compile_check.py)."""
    for name in ("masked_patch_embed.cu", "masked_patch_embed.h", "common.cuh"):
        includes = [line for line in (HEADER_DIR / name).read_text().splitlines() if line.startswith("#include")]
        assert not any(word in line for line in includes for word in ("torch", "ATen", "c10")), includes
