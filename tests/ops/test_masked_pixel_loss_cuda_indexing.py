"""Host-side check of the CUDA kernels of masked_pixel_loss (no GPU needed).

csrc/cuda/masked_pixel_loss.h keeps what a kernel thread computes before it touches memory (the patch-row ->
image-origin mapping, the unit -> (pixel offset, pred index) mapping, the vector width, the lane-group size,
the Welford/Chan moments) in __host__ __device__ code. This test compiles that header with g++ into a small
library whose functions replay forward_kernel and backward_kernel of masked_pixel_loss.cu on the host: the
same grid of blocks and lane groups, the same per-lane unit loops, the same butterfly reductions with the
leader's result broadcast. Values are float64; the results are compared with the reference, and every pred
element and every pixel of a masked patch must be visited exactly once.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from vitfast.ops import masked_pixel_loss_reference
from vitfast.ops.masked_pixel_loss import _patchify

HEADER_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")

REPLAY_SOURCE = r"""
#include "masked_pixel_loss.h"

#include <cmath>
#include <cstdint>
#include <vector>

using namespace vitfast::cuda::pixel_loss;

namespace {

// Status codes: >= 1 the vector width used; -1 a row visited by no group or by two; -2 an element of a
// masked row visited twice or never; -4 an access outside its buffer; -5 a unit whose pixels are not
// `vec` contiguous elements of one row of one channel inside the patch.

struct Plan {
  uint32_t vec;
  bool pred_vec;
  Geometry g;
  uint32_t group, group_log2, blocks;
};

Plan plan(int64_t image_elem, int64_t pred_elem, uint64_t image_address, uint64_t pred_address,
          uint64_t out_address, int64_t pred_stride_b, int64_t batch, int64_t channels, int64_t height,
          int64_t width, int64_t patch) {
  Plan p;
  p.vec = vitfast::cuda::vector_width(int(image_elem), patch, reinterpret_cast<const void*>(image_address));
  p.pred_vec = pred_vectorised(p.vec, int(pred_elem), channels, pred_stride_b,
                               reinterpret_cast<const void*>(pred_address), reinterpret_cast<const void*>(out_address));
  p.g = make_geometry(batch, channels, height, width, patch, pred_stride_b, p.vec);
  p.group = group_size(p.g.units);
  p.group_log2 = log2_exact(p.group);
  const uint32_t per_block = uint32_t(kThreadsPerBlock) >> p.group_log2;
  p.blocks = (p.g.rows + per_block - 1) / per_block;
  return p;
}

// For every group of every block: fn(m, lanes of the group).
template <typename Fn>
int64_t for_each_group(const Plan& p, Fn&& fn) {
  std::vector<int> visits(p.g.rows, 0);
  for (uint32_t block = 0; block < p.blocks; ++block)
    for (uint32_t thread = 0; thread < uint32_t(kThreadsPerBlock); thread += p.group) {
      const uint32_t m = block * (uint32_t(kThreadsPerBlock) >> p.group_log2) + (thread >> p.group_log2);
      if (m >= p.g.rows) continue;
      ++visits[m];
      const int64_t status = fn(m);
      if (status < 0) return status;
    }
  for (int v : visits)
    if (v != 1) return -1;
  return 0;
}

// The unit's pixels must be vec consecutive pixels of one image row of one channel, inside the patch, and its
// pred elements must be those pixels in MAE's (i, j, c) order.
int64_t check_unit(const Geometry& g, uint32_t r, int64_t offset, uint32_t e) {
  const int64_t c = offset / g.plane, i = (offset % g.plane) / g.width, j = offset % g.width;
  if (c >= g.channels || i >= g.patch || j + g.vec > g.patch || j % g.vec != 0) return -5;
  if (e != uint32_t((i * g.patch + j) * g.channels + c)) return -5;
  if (r >= g.units) return -5;
  return 0;
}

}  // namespace

extern "C" {

int64_t replay_forward(int64_t image_elem, int64_t pred_elem, uint64_t image_address, uint64_t pred_address,
                       const double* pred, int64_t pred_stride_b, const double* images, const double* mask,
                       int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t patch,
                       int64_t norm_pix, double* patch_loss, double* stats, int64_t* group_out,
                       int64_t* pred_vec_out) {
  const Plan p = plan(image_elem, pred_elem, image_address, pred_address, 0, pred_stride_b, batch, channels, height,
                      width, patch);
  const Geometry& g = p.g;
  *group_out = p.group;
  *pred_vec_out = p.pred_vec;
  const int64_t image_size = batch * channels * height * width;
  std::vector<int> seen(g.patch_len);
  const int64_t status = for_each_group(p, [&](uint32_t m) -> int64_t {
    const double w = mask[m];
    if (w == 0.0) {
      patch_loss[m] = 0;
      if (norm_pix) stats[2 * m] = stats[2 * m + 1] = 0;
      return 0;
    }
    const int64_t origin = g.patch_origin(m);
    double mean = 0, rstd = 1;
    if (norm_pix) {
      std::vector<Moments<double>> lane(p.group, Moments<double>{0, 0, 0});
      for (uint32_t l = 0; l < p.group; ++l)
        for (uint32_t r = l; r < g.units; r += p.group) {
          int64_t offset;
          uint32_t e;
          g.unit(r, offset, e);
          if (check_unit(g, r, offset, e) < 0) return -5;
          if (origin + offset < 0 || origin + offset + g.vec > image_size) return -4;
          double sum = 0, m2 = 0;
          for (uint32_t k = 0; k < g.vec; ++k) sum += images[origin + offset + k];
          const double unit_mean = sum / g.vec;
          for (uint32_t k = 0; k < g.vec; ++k)
            m2 += (images[origin + offset + k] - unit_mean) * (images[origin + offset + k] - unit_mean);
          lane[l].merge(g.vec, unit_mean, m2);
        }
      for (uint32_t offset = p.group / 2; offset > 0; offset /= 2) {  // __shfl_xor_sync rounds
        const std::vector<Moments<double>> before = lane;
        for (uint32_t l = 0; l < p.group; ++l)
          lane[l].merge(before[l ^ offset].n, before[l ^ offset].mean, before[l ^ offset].m2);
      }
      mean = lane[0].mean;  // __shfl_sync from the leader
      rstd = 1.0 / std::sqrt(lane[0].m2 / double(g.patch_len - 1) + kNormPixEps);
    }
    std::vector<double> squared(p.group, 0.0);
    std::fill(seen.begin(), seen.end(), 0);
    for (uint32_t l = 0; l < p.group; ++l)
      for (uint32_t r = l; r < g.units; r += p.group) {
        int64_t offset;
        uint32_t e;
        g.unit(r, offset, e);
        if (check_unit(g, r, offset, e) < 0) return -5;
        for (uint32_t k = 0; k < g.vec; ++k) {
          const uint32_t element = p.pred_vec ? e + k : e + k * g.channels;
          if (element >= g.patch_len) return -4;
          ++seen[element];
          const double d = pred[g.pred_row(m) + element] - (images[origin + offset + k] - mean) * rstd;
          squared[l] += d * d;
        }
      }
    for (int s : seen)
      if (s != 1) return -2;
    for (uint32_t offset = p.group / 2; offset > 0; offset /= 2) {
      const std::vector<double> before = squared;
      for (uint32_t l = 0; l < p.group; ++l) squared[l] = before[l] + before[l ^ offset];
    }
    patch_loss[m] = w * (squared[0] / g.patch_len);
    if (norm_pix) stats[2 * m] = mean, stats[2 * m + 1] = rstd;
    return 0;
  });
  return status < 0 ? status : p.vec;
}

int64_t replay_backward(int64_t image_elem, int64_t pred_elem, uint64_t image_address, uint64_t pred_address,
                        uint64_t out_address, const double* pred, int64_t pred_stride_b, const double* images,
                        const double* mask,
                        const double* stats, double scale, int64_t batch, int64_t channels, int64_t height,
                        int64_t width, int64_t patch, int64_t norm_pix, double* d_pred) {
  const Plan p = plan(image_elem, pred_elem, image_address, pred_address, out_address, pred_stride_b, batch, channels,
                      height, width, patch);
  const Geometry& g = p.g;
  std::vector<int> seen(g.patch_len);
  const int64_t status = for_each_group(p, [&](uint32_t m) -> int64_t {
    const double w = mask[m];
    const double mean = norm_pix ? stats[2 * m] : 0.0, rstd = norm_pix ? stats[2 * m + 1] : 1.0;
    const int64_t origin = g.patch_origin(m);
    std::fill(seen.begin(), seen.end(), 0);
    for (uint32_t l = 0; l < p.group; ++l)
      for (uint32_t r = l; r < g.units; r += p.group) {
        int64_t offset;
        uint32_t e;
        g.unit(r, offset, e);
        if (check_unit(g, r, offset, e) < 0) return -5;
        for (uint32_t k = 0; k < g.vec; ++k) {
          const uint32_t element = p.pred_vec ? e + k : e + k * g.channels;
          ++seen[element];
          double& out = d_pred[int64_t(m) * g.patch_len + element];
          out = w == 0.0 ? 0.0
                         : scale * w * (pred[g.pred_row(m) + element] -
                                        (images[origin + offset + k] - mean) * rstd);
        }
      }
    for (int s : seen)
      if (s != 1) return -2;
    return 0;
  });
  return status < 0 ? status : p.vec;
}

int64_t vector_width(int64_t image_elem, int64_t patch, uint64_t image_address) {
  return vitfast::cuda::vector_width(int(image_elem), patch, reinterpret_cast<const void*>(image_address));
}

int64_t lanes_per_patch(int64_t units) { return group_size(uint32_t(units)); }

}  // extern "C"
"""

I64, U64, PTR, F64 = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_double


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    build = tmp_path_factory.mktemp("masked_pixel_loss_indexing")
    source, library = build / "replay.cpp", build / "libreplay.so"
    source.write_text(REPLAY_SOURCE)
    command = ["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
               "-I", str(HEADER_DIR), str(source), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"g++ failed on the header:\n{result.stderr}"
    lib = ctypes.CDLL(str(library))
    lib.replay_forward.argtypes = [I64, I64, U64, U64, PTR, I64, PTR, PTR] + [I64] * 6 + [PTR, PTR, PTR, PTR]
    lib.replay_backward.argtypes = [I64, I64, U64, U64, U64, PTR, I64, PTR, PTR, PTR, F64] + [I64] * 6 + [PTR]
    lib.vector_width.argtypes = [I64, I64, U64]
    lib.lanes_per_patch.argtypes = [I64]
    for name in ("replay_forward", "replay_backward", "vector_width", "lanes_per_patch"):
        getattr(lib, name).restype = I64
    return lib


# (B, C, H, W, p): U = C * p * (p / vec) from 1 to 768 units, so groups of 1..32 lanes and up to 24 units
# per lane; odd p (vec 1), p = 14 (vec 2), non-square grids, N not a power of two.
SHAPES = [(2, 3, 8, 12, 4), (3, 1, 12, 8, 4), (2, 3, 8, 8, 2), (1, 3, 28, 42, 14), (2, 3, 32, 16, 16),
          (2, 1, 9, 15, 3), (3, 2, 10, 5, 5), (2, 1, 4, 4, 1), (1, 3, 64, 32, 32)]
# (image element bytes, pred element bytes): fp32, fp16/bf16, fp64, fp16 pred against fp32 images.
ELEMS = [(4, 4), (2, 2), (8, 8), (4, 2)]
ALIGNED = 1 << 20  # a 16-byte aligned fake address: alignment is all the launchers look at


def make(shape, seed):
    b, c, h, w, p = shape
    gen = torch.Generator().manual_seed(seed)
    n = (h // p) * (w // p)
    images = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64) * 2 + 1
    pred = torch.randn(b, n, c * p * p, generator=gen, dtype=torch.float64)
    mask = (torch.rand(b, n, generator=gen) < 0.7).double() * torch.rand(b, n, generator=gen).add(0.5)
    mask[0, 0] = 1.0
    return pred, images, mask


def ptr(tensor):
    return tensor.data_ptr()


# How pred lies in memory: contiguous and 16-byte aligned; misaligned (every access scalar); a batch slice like
# MAE's decoder_pred(x)[:, 1:] (rows contiguous, batch stride (N + 1) * P, first row one row past the buffer start).
LAYOUTS = ["aligned", "misaligned", "cls_slice"]


@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("elems", ELEMS, ids=lambda e: f"img{e[0]}B-pred{e[1]}B")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_replay_match_reference(replay, shape, elems, layout, norm_pix):
    b, c, h, w, p = shape
    if norm_pix and c * p * p < 2:
        pytest.skip("norm_pix needs p*p*C >= 2")
    pred, images, mask = make(shape, seed=zlib.crc32(repr((shape, elems, layout)).encode()))
    n, e = pred.shape[1:]
    image_address = pred_address = ALIGNED if layout != "misaligned" else ALIGNED + 2
    if layout == "cls_slice":
        pred = torch.cat([torch.full((b, 1, e), float("nan"), dtype=pred.dtype), pred], dim=1)[:, 1:]
        pred_address += e * elems[1]
    assert pred.stride() == ((n + (layout == "cls_slice")) * e, e, 1)

    patch_loss = torch.full((b, n), 99.0, dtype=torch.float64)
    stats = torch.full((b, n, 2), 99.0, dtype=torch.float64)
    group, pred_vec = ctypes.c_int64(), ctypes.c_int64()
    vec = replay.replay_forward(*elems, image_address, pred_address, ptr(pred), pred.stride(0), ptr(images),
                                ptr(mask), b, c, h, w, p, int(norm_pix), ptr(patch_loss), ptr(stats),
                                ctypes.byref(group), ctypes.byref(pred_vec))
    assert vec >= 1, f"replay failed with status {vec}"
    assert p % vec == 0 and vec * elems[0] <= 16
    assert bool(pred_vec.value) == (c == 1 and vec > 1 and pred_address % (vec * elems[1]) == 0)
    units = c * p * (p // vec)
    assert group.value == min(32, 1 << (units - 1).bit_length())
    loss = patch_loss.sum() / mask.sum()
    torch.testing.assert_close(loss, masked_pixel_loss_reference(pred, images, mask, p, norm_pix),
                               rtol=1e-12, atol=1e-12)
    masked = mask != 0
    assert (patch_loss[~masked] == 0).all()
    if norm_pix:
        target = _patchify(images, p)
        want = torch.stack([target.mean(-1), (target.var(-1) + 1e-6).rsqrt()], -1)
        torch.testing.assert_close(stats[masked], want[masked], rtol=1e-12, atol=1e-12)
        assert (stats[~masked] == 0).all()

    d_pred = torch.full((b, n, e), 99.0, dtype=torch.float64)  # contiguous, whatever pred's layout
    scale = 1.7
    status = replay.replay_backward(*elems, image_address, pred_address, ALIGNED, ptr(pred), pred.stride(0),
                                    ptr(images), ptr(mask), ptr(stats), scale, b, c, h, w, p, int(norm_pix),
                                    ptr(d_pred))
    assert status == vec
    target = _patchify(images, p)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    want = scale * mask[..., None] * (pred - target)
    torch.testing.assert_close(d_pred, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("image_elem, patch, address, expected", [
    (4, 16, ALIGNED, 4), (4, 14, ALIGNED, 2), (4, 4, ALIGNED, 4), (4, 7, ALIGNED, 1), (4, 2, ALIGNED, 2),
    (2, 16, ALIGNED, 8), (2, 4, ALIGNED, 4), (2, 6, ALIGNED, 2), (8, 16, ALIGNED, 2), (8, 3, ALIGNED, 1),
    (4, 16, ALIGNED + 8, 2), (4, 16, ALIGNED + 4, 1), (2, 16, ALIGNED + 4, 2),  # misaligned base pointers
])
def test_vector_width(replay, image_elem, patch, address, expected):
    """16-byte image loads wherever p and the base pointer allow, narrower ones otherwise."""
    assert replay.vector_width(image_elem, patch, address) == expected


@pytest.mark.parametrize("units, lanes", [(1, 1), (2, 2), (3, 4), (4, 4), (12, 16), (32, 32), (33, 32), (768, 32)])
def test_lanes_per_patch(replay, units, lanes):
    assert replay.lanes_per_patch(units) == lanes


def test_kernel_sources_do_not_include_torch():
    """The .cu and its header must compile with nvcc alone (see vitfast/compile_check.py)."""
    for name in ("masked_pixel_loss.cu", "masked_pixel_loss.h", "common.cuh"):
        includes = [line for line in (HEADER_DIR / name).read_text().splitlines() if line.startswith("#include")]
        assert not any(word in line for line in includes for word in ("torch", "ATen", "c10")), includes


def test_op_headers_include_only_the_common_header():
    """Shared CUDA pieces live in common.cuh; no op header or kernel file includes another op's header."""
    ops = {path.stem for path in HEADER_DIR.glob("*.cu")}
    for path in sorted(HEADER_DIR.glob("*.cu")) + sorted(HEADER_DIR.glob("*.h")):
        local = [line.split('"')[1] for line in path.read_text().splitlines() if line.startswith('#include "')]
        others = [name for name in local if name.split(".")[0] in ops and name.split(".")[0] != path.stem]
        if path.name == "glue.h":
            others = [name for name in local if name != "common.cuh"]
        assert not others, f"{path.name} includes {others}"
        if path.suffix in (".cu", ".h") and path.name != "glue.h":
            assert "common.cuh" in local or f"{path.stem}.h" in local, f"{path.name} does not use common.cuh"
