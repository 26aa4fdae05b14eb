"""Launch and indexing limits, on the GPU at sizes past them (up to ~60 GB at a time); scaled down elsewhere.

- grid: more than 65535 programs on one launch axis (CUDA caps axes 1 and 2 at 65535): masked_patch_embed with
  8.4 M token rows, relation_loss / relation_mlp_loss with a batch of 65543.
- offsets past 2^31 elements: images, pred, u/v and q/k tensors of more than 2^31 elements, so any int32 offset
  arithmetic wraps.
- contrastive_loss has no case here: every anchor's softmax runs over the whole pool, so no slice of the batch can
  carry all the signal while the rest must get exactly zero gradient (the pattern below). Its kernels form every
  offset that scales with A, M or D in int64 and put the long dimension on grid axis 0 (kernels/contrastive_loss.py).

To keep the float64 reference small, only the last ``TAIL`` batch elements carry signal (the other masks and
pair selections are empty, the other upstream gradients zero): the fused op on the whole batch must then equal
the reference on the tail slice, and the gradients of every other batch element must be exactly zero. The
check looks for indexing errors (O(1) wrong values), so it uses the fp16 tolerance row whatever the dtype.
Scaled down (``full=False``, the CPU smoke run), the same code runs at tiny sizes and proves no limit.
"""
from __future__ import annotations

from typing import List

import torch

from . import measure
from .cases import CASES, as_float64
from .checks import backend_takes, backends_for, call_backend, compare

TAIL = 2
_BATCHED = {"masked_patch_embed": ("images", "keep_idx", "pos_idx"),
            "masked_pixel_loss": ("pred", "images", "mask"),
            "relation_loss": ("q", "k", "positions", "pair_mask"),
            "relation_mlp_loss": ("u", "v", "positions", "pair_mask")}


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, dtype=torch.float32, device=device, generator=gen).to(dtype)


def _patch_embed(batch, keep, dim, dtype, device, gen):
    """3x32x32 images, patch 4 (N = 64); upstream zero outside the tail."""
    n = 64
    x = dict(images=_randn((batch, 3, 32, 32), dtype, device, gen), weight=_randn((dim, 3, 4, 4), dtype, device, gen),
             bias=_randn((dim,), dtype, device, gen), pos_embed=_randn((n, dim), dtype, device, gen),
             keep_idx=torch.randint(0, n, (batch, keep), device=device, generator=gen), pos_idx=None)
    return x


def _pixel_loss(batch, dtype, device, gen):
    mask = torch.zeros(batch, 64, device=device)
    mask[-TAIL:] = (torch.rand(TAIL, 64, device=device, generator=gen) < 0.75).float()
    return dict(pred=_randn((batch, 64, 48), dtype, device, gen), images=_randn((batch, 3, 32, 32), dtype, device, gen),
                mask=mask, patch_size=4, norm_pix=True)


def _tail_pairs(batch, n, device):
    pair_mask = torch.zeros(batch, n, n, dtype=torch.bool, device=device)
    pair_mask[-TAIL:] = True
    return dict(positions=None, grid_size=None, pair_mask=pair_mask, label_smoothing=0.0)


def _relation(batch, n, head, dtype, device, gen):
    return dict(q=_randn((batch, n, 9, head), dtype, device, gen), k=_randn((batch, n, 9, head), dtype, device, gen),
                **_tail_pairs(batch, n, device))


def _relation_mlp(batch, n, hidden, dtype, device, gen):
    x = dict(u=_randn((batch, n, hidden), dtype, device, gen), v=_randn((batch, n, hidden), dtype, device, gen),
             weight=_randn((9, hidden), dtype, device, gen) / hidden ** 0.5, bias=_randn((9,), dtype, device, gen),
             task="direction", activation="gelu", **_tail_pairs(batch, n, device))
    x["grid_size"] = int(n ** 0.5)
    return x


def limit_cases(full: bool):
    """(label, op, dtype, builder(device, gen) -> inputs): the past-the-limit sizes when ``full``, else tiny ones."""
    f16, f32 = torch.float16, torch.float32
    if full:
        return [
            ("grid: 8.4M token rows (B131073 x K64), > 65535 x 128", "masked_patch_embed", f32,
             lambda d, g: _patch_embed(131073, 64, 16, f32, d, g)),
            ("grid: batch 65543 (axis-1 limit 65535)", "relation_loss", f32, lambda d, g: _relation(65543, 4, 8, f32, d, g)),
            ("grid: batch 65543 (axis-1 limit 65535)", "relation_mlp_loss", f32,
             lambda d, g: _relation_mlp(65543, 4, 16, f32, d, g)),
            ("offsets: images 2.15G elements (B700000 3x32x32)", "masked_patch_embed", f16,
             lambda d, g: _patch_embed(700000, 1, 16, f16, d, g)),
            ("offsets: images and pred 2.15G elements (B700000)", "masked_pixel_loss", f16,
             lambda d, g: _pixel_loss(700000, f16, d, g)),
            ("offsets: q, k 2.21G elements (B240000 N16 d_h64)", "relation_loss", f16,
             lambda d, g: _relation(240000, 16, 64, f16, d, g)),
            ("offsets: u, v 2.15G elements (B2050 N16 H65536)", "relation_mlp_loss", f16,
             lambda d, g: _relation_mlp(2050, 16, 65536, f16, d, g)),
        ]
    return [
        ("scaled down: grid rows", "masked_patch_embed", f32, lambda d, g: _patch_embed(3, 3, 8, f32, d, g)),
        ("scaled down: batch", "relation_loss", f32, lambda d, g: _relation(3, 4, 8, f32, d, g)),
        ("scaled down: batch", "relation_mlp_loss", f32, lambda d, g: _relation_mlp(3, 4, 16, f32, d, g)),
        ("scaled down: offsets", "masked_pixel_loss", f16, lambda d, g: _pixel_loss(3, f16, d, g)),
    ]


def _slice(x: dict, names, part) -> dict:
    return {k: (v[part] if k in names and v is not None else v) for k, v in x.items()}


def check_tail(op: str, backend: str, x: dict) -> dict:
    """Fused on the whole batch vs the float64 reference on the tail; zero gradients outside the tail."""
    case = CASES[op]
    tail, head = slice(-TAIL, None), slice(None, -TAIL)
    if case.loss_scale is None:  # tokens: upstream gradient only on the tail
        def upstream(out):
            grad = torch.zeros_like(out)
            grad[tail] = case.upstream(out[tail], x)
            return grad
    else:
        upstream = lambda out: case.upstream(out, x)  # noqa: E731  (the selections are empty outside the tail)
    out, grads, grad_out = measure.run_step(call_backend(case, backend), x, case.grads, upstream)
    small = as_float64(_slice(x, _BATCHED[op], tail), case.floating)
    ref_out, ref_grads, _ = measure.run_step(case.reference, small, case.grads,
                                             lambda o: grad_out[tail].double() if o.dim() else grad_out.double())
    tensors = {"output": compare(out[tail] if out.dim() else out, ref_out, "fp16")}
    for name in case.grads:
        grad = grads[name]
        if name in _BATCHED[op]:
            tensors[f"d_{name}"] = compare(grad[tail], ref_grads[name], "fp16")
            outside = grad[head].abs().max().item() if grad[head].numel() else 0.0
            tensors[f"d_{name} outside the tail"] = {"ok": outside == 0, "max_abs": outside}
        else:
            tensors[f"d_{name}"] = compare(grad, ref_grads[name], "fp16")
    return tensors


def limits(device: torch.device, full: bool) -> List[dict]:
    rows = []
    for label, op, dtype, build in limit_cases(full):
        if op not in CASES:  # narrowed by --ops
            continue
        for backend in backends_for(op, device):
            row = dict(label=label, op=op, backend=backend, dtype=str(dtype).replace("torch.", ""),
                       proves_limit=full)
            if not backend_takes(op, backend, device, dtype):
                rows.append({**row, "ok": None, "skipped": f"{backend} does not take {row['dtype']} inputs"})
                continue
            try:
                gen = torch.Generator(device=device).manual_seed(0)
                x = build(device, gen)
                tensors = check_tail(op, backend, x)
                rows.append({**row, "ok": all(t["ok"] for t in tensors.values()), "tensors": tensors})
            except Exception as error:
                rows.append({**row, "ok": False, "error": f"{type(error).__name__}: {error}"})
            finally:
                x = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows
