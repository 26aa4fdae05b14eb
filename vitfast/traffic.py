"""Bytes moved and FLOPs on paper, per op at its benchmark shape: the fused kernels vs the unfused PyTorch composition.

    python -m vitfast.traffic                 # fp32 and bf16 tables (markdown)

ESTIMATES, not measurements. Both columns count *compulsory* HBM traffic per launch: every tensor a launch reads
is read once and every tensor it writes is written once; re-reads that a tile loop makes of an operand (k by every
i-tile in relation_loss, the weight by every row tile) are assumed to hit L2 and are noted, not counted. FLOPs are
matmul FLOPs only (2 per multiply-add, what tensor cores execute, padding included); elementwise work (exp, GELU,
normalisation) is not counted on either side.

- fused: launch by launch from the Triton kernels' loads and stores and the torch glue around them in
  ``kernels/<op>.py`` (backend ``triton``), as the code stood at 2026-12-01 ~16:55 UTC (see ``SOURCE``). When the
  kernels change, these formulas must be updated with them. The op wrapper's argument checks (index range and
  mask.sum() != 0 asserts) are not counted, nor is the reference's own input validation.
- unfused: every aten op that forward + backward of the op's plain-PyTorch reference runs (logged with a
  TorchDispatchMode on meta tensors, so nothing is computed): each op reads its inputs (broadcast dimensions
  counted once) and writes its outputs; views are free. FLOPs from ``torch.utils.flop_counter``.
"""
from __future__ import annotations

import math
import sys
from typing import List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SOURCE = "kernels/*.py as of 2026-12-01 ~16:55 UTC: 6af5d04, 98695fe, f9b8ca8, relation_mlp_loss split partials"


def _touched_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel must read of ``t``: broadcast (stride 0) dimensions count once."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


class _Log(TorchDispatchMode):
    """Counts the launches and the compulsory bytes of every non-view aten op."""

    def __init__(self):
        super().__init__()
        self.launches, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket in (torch.ops.aten.detach, torch.ops.aten.alias):
            return out
        tensors_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.launches += 1
        self.bytes += sum(_touched_bytes(t) for t in tensors_in) + sum(t.numel() * t.element_size() for t in tensors_out)
        return out


def unfused(op: str, shape: str, dtype: torch.dtype) -> dict:
    """Launches, bytes and matmul FLOPs of forward + backward of the reference (aten ops on meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitfast.gpu_check.cases import CASES
    case = CASES[op]
    x = case.inputs(shape, dtype, "meta")
    leaves = {n: x[n].detach().requires_grad_() for n in case.bench_grads}
    inputs = {**x, **leaves}
    log, flops = _Log(), FlopCounterMode(display=False)
    with flops, log:
        out = case.reference(inputs)
        if out.requires_grad:  # nn_topk is a lookup: forward only
            out.backward(torch.ones_like(out))
    return dict(launches=log.launches, bytes=log.bytes, flops=flops.get_total_flops())


# ---- fused: one formula per launch, from the kernels' loads and stores ----

def _launch(name: str, read: float, written: float, flops: float = 0.0, count: int = 1) -> dict:
    """``count`` launches (small torch glue is grouped) reading and writing these bytes."""
    return dict(name=name, read=int(read), written=int(written), flops=int(flops), count=count)


def _masked_patch_embed(p: dict, s: int) -> List[dict]:
    """B256 32px p4 D192 K16; grads of weight, bias, pos_embed (the benchmark's step)."""
    m, e, d = p["B"] * p["K"], p["C"] * p["p"] ** 2, p["D"]
    positions = (p["H"] // p["p"]) * (p["W"] // p["p"])
    split = _mpe_split(m, d, e, positions, s)
    grads = d * e + d + positions * d
    launches = [
        # pixels of the kept patches, weight (re-read per row tile: L2), bias, pos_embed rows, the two index rows
        _launch("fwd: gather + dot + bias + pos", m * e * s + d * e * s + d * s + positions * d * s + 2 * m * 8,
                m * d * s, 2 * m * d * e),
        # grad rows, kept pixels, indices; d_weight by a dot with the pixels, d_pos by a dot with the one-hot rows
        _launch(f"bwd: d_weight, d_pos, d_bias ({split} row splits)", m * d * s + m * e * s + 2 * m * 8,
                grads * (4 if split > 1 else s), 2 * m * d * e + 2 * m * d * positions),
    ]
    if split > 1:
        launches.append(_launch("bwd: fixed-order sum of the split partials", split * grads * 4, grads * s))
    return launches


def _mpe_split(m, d, e, positions, s) -> int:
    """The row split of the d_weight kernel, from the launcher's own plan (shape-only)."""
    try:
        from vitfast.kernels.masked_patch_embed import bwd_params_plan
        dtype = torch.float32 if s == 4 else torch.bfloat16
        return bwd_params_plan(m, d, e, positions, dtype, True, True)["split"]
    except Exception:  # noqa: BLE001  (triton not installed, or the plan changed)
        return 1


def _masked_pixel_loss(p: dict, s: int) -> List[dict]:
    """B256 32px p4 r0.75 norm_pix: the kernels read only masked patch rows of pred and images."""
    rows = p["B"] * (p["H"] // p["p"]) * (p["W"] // p["p"])
    masked, e = int(rows * p["ratio"]), p["C"] * p["p"] ** 2
    return [
        _launch("fwd: stats + loss partials", rows * 4 + 2 * masked * e * s, rows * 2 * 4),
        _launch("fwd: finalize", 0, s),
        _launch("bwd: mask.sum()", rows * 4, 4),
        _launch("bwd: d_pred (zeros in unmasked rows)", rows * 4 + rows * 2 * 4 + 2 * masked * e * s, rows * e * s),
    ]


def _row_sums(b: int, n: int) -> dict:
    """The fixed-order sums of the per-row statistics (kernels/_common.py finish_row_stats)."""
    return _launch("fwd: sums of the row statistics", b * n * 12, 3 * 8, count=8)


def _positions(b: int, n: int, where: str) -> dict:
    """arange(N).expand(B, N).contiguous(): the identity positions the launcher makes when none are given."""
    return _launch(f"{where}: identity positions", 0, n * 8 + b * n * 8, count=2)


def _relation_loss(p: dict, s: int) -> List[dict]:
    """q, k [B, N, 9, d_h]: packed once to [B, 9, N, DP] (DP = 64 for d_h <= 64) by the forward, which also saves
    each pair's lse (fp32) and target (int16); the backward's d q and d k kernels read those, no repacking."""
    b, n, c, dh = p["B"], p["N"], 9, p["d_h"]
    dp = 64 if dh <= 64 else 128 * math.ceil(dh / 128)
    chunks = dp // (64 if dh <= 64 else 128)
    packed, plain, pairs = b * c * n * dp, b * n * c * dh, b * n * n
    pair_dot = 2 * b * c * n * n * dp  # one class-score matmul over all pairs, padding included
    pack = lambda x: _launch(f"fwd: pack {x} (copy + zero the padding)", plain * s, packed * s, count=2)  # noqa: E731
    own = lambda x, other: _launch(  # noqa: E731
        f"bwd d{x}: scores again + ds @ {other} (saved lse and target; {other} re-read per tile: L2)",
        2 * packed * s + pairs * 6, plain * s, chunks * pair_dot + pair_dot)
    return [
        _positions(b, n, "fwd"), pack("q"), pack("k"),
        _launch("fwd: scores + online lse; saves lse, target (k re-read per i-tile: L2)",
                2 * packed * s + b * n * 8, pairs * 6 + b * n * 12, pair_dot),
        _row_sums(b, n),
        _launch("bwd: grad / count / sqrt(d_h) (device scalar)", 0, 0, count=3),
        own("q", "k"), own("k", "q"),
    ]


def _relation_mlp_loss(p: dict, s: int) -> List[dict]:
    """u, v [B, N, H]; 8 x 8 pair tiles, hidden chunks of 32; classes padded to 16 in the dots; the backward's
    d v / d W partials per split of i-tiles (kernels' backward_scratch)."""
    b, n, h, c, c_pad = p["B"], p["N"], p["H"], 9, 16
    splits = _mlp_splits(b, n, s)
    logits = 2 * b * n * n * h * c_pad  # [pairs, H] x [H, 16]
    uv, fp32 = 2 * b * n * h * s, b * n * h * 4
    dv_part, dw_part = b * splits * n * h * 4, b * splits * c_pad * h * 4
    launches = [
        _positions(b, n, "fwd"),
        _launch("fwd: hidden + logits + CE per pair tile", uv + c * h * s + b * n * 8, b * n * 12, logits),
        _row_sums(b, n),
        _positions(b, n, "bwd"),
        _launch(f"bwd: logits again, d out, d h, d pre, d W ({splits} d v partials; own partials re-read: L2)",
                uv + c * h * s + b * n * 8, fp32 + dv_part + dw_part + b * splits * c_pad * 4, 3 * logits),
        _launch("bwd: grad / count (device scalar)", 0, 0, count=2),
        _launch("bwd: d_u * scale", fp32, fp32),
        _launch("bwd: sum of the d_v partials, * scale", dv_part + fp32, 2 * fp32, count=2),
        _launch("bwd: sums of the d_W / d_b partials, * scale", dw_part, c * h * 4, count=4),
    ]
    if s != 4:
        launches.append(_launch("bwd: cast the gradients to the input dtype", 2 * fp32, 2 * b * n * h * s, count=4))
    return launches


def _mlp_splits(b, n, s) -> int:
    """The backward's number of d v partials, from the launcher's own plan (shape-only)."""
    try:
        from vitfast.kernels.relation_mlp_loss import backward_split
        return backward_split(b, n, torch.float32 if s == 4 else torch.bfloat16)[0]
    except Exception:  # noqa: BLE001  (triton not installed, or the plan changed): one partial per i-tile
        return math.ceil(n / 8)


def _contrastive_loss(p: dict, s: int) -> List[dict]:
    """NT-Xent on q, k [B, D]: anchors = pool = the 2B unit rows (A = M = 2B). The kernels read the pool once per
    anchor tile (L2) and keep no [A, M] logits; the backward recomputes the scores from the saved lse and count."""
    b, d = p["B"], p["D"]
    rows = 2 * b
    features, stats = rows * d * s, rows * 8 * 2 + rows * 8  # one [2B, D] matrix; labels (anchor, pool), self rows
    scores = 2 * rows * rows * d
    chunks = _contrastive_out_chunks(d, s)  # the backward recomputes the scores once per output chunk
    return [
        # the op wrapper's glue (vitfast/ops/contrastive_loss.py): F.normalize of q and k (norm, clamp, div), the
        # concatenations into anchors and pool, the labels; in the backward the two gradients of each row summed
        # and normalize's backward
        _launch("op: normalize q, k and cat into anchors, pool; labels", 3 * features, 3 * features + rows * 32,
                count=12),
        _launch("fwd: scores + online lse, positive sums and counts (pool re-read per anchor tile: L2)",
                2 * features + stats, rows * 12, scores),
        _launch("fwd: fixed-order fp64 sum of the per-anchor terms, cast", rows * 4 + 8, 8 + 4, count=2),
        _launch(f"bwd d anchors: scores again ({chunks}x) from lse and count, ds @ pool",
                2 * features + stats + rows * 8 + 4, features, (chunks + 1) * scores),
        _launch(f"bwd d pool: scores again ({chunks}x, transposed), ds^T @ anchors",
                2 * features + stats + rows * 8 + 4, features, (chunks + 1) * scores),
        _launch("op: sum of the two gradients of each row, normalize backward", 5 * features, 2 * features, count=6),
    ]


def _contrastive_out_chunks(d, s) -> int:
    """Output chunks per row of the contrastive backward, from the launcher's own table (shape-only)."""
    try:
        from vitfast.kernels.contrastive_loss import BACKWARD_CONFIG, d_class
        return math.ceil(d / BACKWARD_CONFIG[d_class(d)][torch.float32 if s == 4 else torch.bfloat16]["BLOCK_OUT"])
    except Exception:  # noqa: BLE001  (triton not installed, or the table changed): one chunk
        return 1


def _dino_loss(p: dict, s: int) -> List[dict]:
    """G + L crops x B rows, K prototypes of width d (e = d): the two softmax_rows launches (teacher, student; each
    with its merge of the K splits) and the two softmax_columns launches of the backward (adding in place to one
    [K, d] fp32 gradient), and the op wrapper's glue (vitfast/ops/dino_loss.py contract v2, 53288e9): the fused
    weight norm's O(K) scales (row norms of v_s and v_t, in K chunks), the teacher mean, the O(V B d) loss and d x,
    the weight norm's backward in place on the gradient. No [V B, K] tensor and no [K, d] W anywhere."""
    b, d, k = p["B"], p["d"], p["K"]
    vs, vt = p["G"] + p["L"], p["G"]
    rs, rt = vs * b, vt * b
    w, w4 = k * d * s, k * d * 4
    cast = int(s != 4)  # 16-bit inputs: the glue casts to fp32 (chunk by chunk for the [K, d] ones) and back
    chunks = _dino_glue_chunks(k)
    launches = [
        _launch("op: centre to fp32 (16 bits)", k * s, k * 4, count=cast),
        _launch("op: 1 / ||v|| of v_s and v_t (per K chunk: row dots by bmm; 16 bits: both operands cast; then cat, "
                "sqrt, clamp, reciprocal)", 2 * (w * (1 + cast) + 2 * w4 * cast + 4 * k * 4),
                2 * (2 * w4 * cast + 5 * k * 4), 2 * 2 * k * d, count=2 * (chunks * (1 + 2 * cast) + 4)),
        _launch("fwd: biases -centre / T_t and 0", 2 * k * 4, 3 * k * 4, count=3),
    ]
    for who, rows in (("teacher", rt), ("student", rs)):
        launches += _dino_rows(who, rows, k, d, s)
    launches += [
        _launch("fwd: U_v, m_v and the loss from lse and P (16 bits: x cast)",
                (5 * rt + 3 * rs) * d * 4 + b * d * 4 + 3 * rs * 4 + rs * d * s * cast,
                (2 * rs + 2 * rt) * d * 4 + b * d * 4 + rs * 4 + rs * d * 4 * cast, count=14 + cast),
        _launch("fwd: teacher mean = t ⊙ (v_t @ mean of the teacher rows), per K chunk (16 bits: rows, v_t cast)",
                rt * d * s + w + d * 4 + 3 * k * 4 + (rt * d * 4 + w4) * cast,
                d * 4 + 3 * k * 4 + (rt * d * 4 + w4) * cast, 2 * k * d, count=chunks * (1 + cast) + 3 + cast),
        _launch("bwd: d x = g c / T_s (m P - U) (16 bits: cast)", 4 * rs * d * 4 + 8 + rs * d * 4 * cast,
                3 * rs * d * 4 + 4 + rs * d * s * cast, count=4 + cast),
        _launch("bwd: f m x and -f R_j, R_j = sum of the other views' x (16 bits: x cast)",
                (2 * rs + b + 2 * rt) * d * 4 + 12 + 2 * vs * 4 + rs * d * s * cast,
                (rs + b + 2 * rt) * d * 4 + 4 + vs * 4 + rs * d * 4 * cast, count=6 + cast),
        _launch("bwd: the gradient G = 0 [K, d] fp32; autograd's zero [K] gradient of the teacher mean", 0,
                w4 + k * 4, count=2),
    ]
    for who, rows in (("student", rs), ("teacher", rt)):
        launches.append(_dino_columns(who, rows, k, d, s))
    launches += [
        _launch("bwd: weight norm backward in place: <G_k, v_k> per K chunk (16 bits: v cast), s^2 <G, v>, "
                "G -= (..) v, G *= s (16 bits: the gradient cast out)",
                w4 + w + w4 * cast + k * 4 + 4 * k * 4 + (w4 + w + k * 4) + (w4 + k * 4) + w4 * cast,
                w4 * cast + 2 * k * 4 + 2 * k * 4 + w4 + w4 + w * cast, 2 * k * d,
                count=chunks * (1 + cast) + 1 + 2 + 2 + cast),
    ]
    return launches


def _dino_glue_chunks(k: int) -> int:
    """K chunks of the op wrapper's O(K d) glue (vitfast.ops.dino_loss.CHUNK prototype rows each)."""
    from vitfast.ops.dino_loss import CHUNK
    return math.ceil(k / CHUNK)


def _dino_plan(kind: str, rows: int, k: int, d: int, s: int) -> tuple:
    """(K splits, e chunks) of a dino_loss kernel from the launcher's own tables (shape-only)."""
    try:
        from vitfast.kernels import dino_loss as kd
        dtype = torch.float32 if s == 4 else torch.bfloat16
        table = kd.ROWS_CONFIG if kind == "rows" else kd.COLUMNS_CONFIG
        cfg = table[kd.width_class(d, d)][dtype]
        return (kd.split_plan(rows, k, d, cfg)[0] if kind == "rows" else 1), math.ceil(d / cfg["BLOCK_E"])
    except Exception:  # noqa: BLE001  (triton not installed, or the tables changed): one split, one chunk
        return 1, 1


def _dino_rows(who: str, r: int, k: int, d: int, s: int) -> List[dict]:
    """softmax_rows: x [r, d] re-read per K split (L2); keys and values (K x d each, also when they are one
    tensor) once per e chunk (the chunks of one split run side by side: L2), key_scale, value_scale and bias [K];
    S splits write (m, l) and acc."""
    splits, chunks = _dino_plan("rows", r, k, d, s)
    out = 2 * r * 4 + r * d * 4 if splits > 1 else r * 4 + r * d * 4
    launches = [_launch(f"fwd {who}: z, online softmax, p @ W ({splits} K splits, z {chunks}x)",
                        r * d * s + 2 * k * d * s + 3 * k * 4, splits * out, (chunks + 1) * 2 * r * k * d)]
    if splits > 1:
        launches.append(_launch(f"fwd {who}: merge of the K splits", splits * out, r * 4 + r * d * 4))
    return launches


def _dino_columns(who: str, r: int, k: int, d: int, s: int) -> dict:
    """softmax_columns: one program per K tile (and e chunk) loops over the r rows (x, lse, y re-read: L2), then
    adds its tile to the [K, d] fp32 gradient in place (read and written once)."""
    _, chunks = _dino_plan("columns", r, k, d, s)
    return _launch(f"bwd {who}: z again ({chunks}x) from lse, p^T @ y, added to G",
                   r * d * s + k * d * s + 2 * k * 4 + r * 4 + r * d * 4 + k * d * 4, k * d * 4,
                   (chunks + 1) * 2 * r * k * d)


def _nn_topk(p: dict, s: int) -> List[dict]:
    """B queries, Q queue rows of width d, k kept (kernels/nn_topk.py as of 2026-12-01 ~22:40 UTC), at the kernel
    level as the gpu_check case calls it (the public function adds its eligibility count: a sort of the queue ids):
    one kernel launch writing the chunks' int64 candidates, their torch.topk merge and decode. The queue is re-read
    per query block (L2, not counted). No [B, Q] tensor. The case adds the float64 similarity of the k returned
    entries (a [B, k, d] gather) on both sides."""
    b, q, d, k = p["B"], p["Q"], p["D"], p["k"]
    chunks = _nn_topk_chunks(b, q, d, k, s)
    check = b * k * d * 8 * 2 + b * d * 8 + b * k * 8
    return [
        _launch("ceiling [B] (INT64_MAX)", 0, b * 8),
        _launch(f"kernel: similarities by tl.dot, rank keys, thresholded top-k per chunk ({chunks} chunks)",
                b * d * s * chunks + q * d * s + q * 8 + b * 16, b * chunks * k * 8, 2 * b * q * d),
        _launch("merge: torch.topk over the chunks' candidates", b * chunks * k * 8, b * k * 16, count=int(chunks > 1)),
        _launch("decode keys into fp32 values and int64 indices", b * k * 8 * 6, b * k * 8 * 5, count=6),
        _launch("gpu_check case: float64 similarity of the returned entries (gather, casts, einsum)", check, check,
                2 * b * k * d, count=5),
    ]


def _nn_topk_chunks(b, q, d, k, s) -> int:
    """Queue chunks of the nn_topk kernel, from the launcher's own plan (shape-only)."""
    try:
        from vitfast.kernels.nn_topk import plan
        return plan(b, q, d, k, torch.float32 if s == 4 else torch.bfloat16)[1]
    except Exception:  # noqa: BLE001  (triton not installed, or the plan changed): one chunk
        return 1


FUSED = {"masked_patch_embed": _masked_patch_embed, "masked_pixel_loss": _masked_pixel_loss,
         "relation_loss": _relation_loss, "relation_mlp_loss": _relation_mlp_loss,
         "contrastive_loss": _contrastive_loss, "dino_loss": _dino_loss,
         "nn_topk": _nn_topk}


def fused(op: str, shape: str, dtype: torch.dtype) -> dict:
    from vitfast.gpu_check.cases import CASES
    launches = FUSED[op](CASES[op].shapes[shape], torch.tensor([], dtype=dtype).element_size())
    return dict(launches=sum(x["count"] for x in launches), bytes=sum(x["read"] + x["written"] for x in launches),
                flops=sum(x["flops"] for x in launches), detail=launches)


def table(dtype: torch.dtype = torch.float32) -> List[dict]:
    """One row per (op, benchmark shape): fused and unfused launches, MB and GFLOP, and their ratios."""
    from vitfast.gpu_check.cases import CASES
    rows = []
    for op, case in CASES.items():
        for shape in (s for s in case.shapes if s.startswith("bench")):
            if op not in FUSED:  # a new op: its fused formula is still to be written
                continue
            a, b = fused(op, shape, dtype), unfused(op, shape, dtype)
            rows.append(dict(op=op, shape=shape.replace("bench ", ""), dtype=str(dtype).replace("torch.", ""),
                             fused=a, unfused=b))
    return rows


def markdown(rows: List[dict]) -> str:
    lines = ["| op, shape | dtype | launches fused / unfused | HBM MB fused | HBM MB unfused | unfused / fused "
             "| GFLOP fused | GFLOP unfused |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["fused"], r["unfused"]
        lines.append(f"| {r['op']} {r['shape']} | {r['dtype']} | {a['launches']} / {b['launches']} "
                     f"| {a['bytes'] / 1e6:.1f} | {b['bytes'] / 1e6:.1f} | {b['bytes'] / max(a['bytes'], 1):.1f}x "
                     f"| {a['flops'] / 1e9:.2f} | {b['flops'] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for dtype in (torch.float32, torch.bfloat16):
        rows = table(dtype)
        print(f"\nEstimates, forward + backward, {str(dtype).replace('torch.', '')} ({SOURCE}):\n")
        print(markdown(rows))
        if "--detail" in argv:
            for r in rows:
                print(f"\n{r['op']} {r['shape']}:")
                for x in r["fused"]["detail"]:
                    print(f"  {x['count']} x {x['name']}: read {x['read'] / 1e6:.2f} MB, wrote {x['written'] / 1e6:.2f} MB, "
                          f"{x['flops'] / 1e9:.3f} GFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
