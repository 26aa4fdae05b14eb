"""The op cases that ``python -m vitfast.gpu_check`` checks and ``benchmarks/run.py`` times.

An :class:`OpCase` knows, for one op, how to build its inputs at a named shape, how to call the fused op
(``backend=``), the plain-PyTorch reference, and the upstream gradient. Shapes per op:

    "bench*"   the benchmark shapes of the README (benchmarks/run.py times these)
    "ragged*"  small non-power-of-two shapes with the options switched on (positions, pair masks,
               label smoothing, duplicate indices, other tasks/activations); tiny enough for the interpreter

Losses get a power-of-two upstream gradient of about the number of averaged terms, at most 2^14 (a loss scale,
exact in every dtype and finite in an fp16 loss), so gradients are O(1e-2..1) and fp16 ones do not sink into
subnormals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from vitfast import ops
from vitfast.ops.nn_topk import _reference_topk as _nn_topk_reference

# Band on the normwise error max|actual - expected| / max|expected| (as docs/testing.md measures it) per computation
# dtype, for a result against the float64 reference computed from the same (already rounded) inputs. From the unit
# roundoff u of what the kernels round to, with room for the GPU's summation orders: fp32 accumulation (u = 6e-8,
# ~1e4 terms), tf32/fp16 operands and outputs (u = 4.9e-4), bf16 (u = 3.9e-3). Under the interpreter and on the
# CPU the errors measured are 10 to 60 times below these bands; not yet measured on a GPU.
TOLERANCES = {"fp32": 2e-5, "tf32": 4e-3, "fp16": 4e-3, "bf16": 2e-2}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _scale_pow2(terms: float) -> float:
    """A power of two near ``terms``, at most 2^14: the loss scale (exact in fp16/bf16/fp32, finite in fp16)."""
    return float(2.0 ** min(14, round(math.log2(max(terms, 1.0)))))


@dataclass(frozen=True)
class OpCase:
    """One op: inputs per shape, the fused call, the reference, the upstream gradient."""
    name: str
    shapes: Dict[str, dict]
    grads: Tuple[str, ...]          # every differentiable input (the accuracy check)
    bench_grads: Tuple[str, ...]    # the inputs a training step differentiates (the benchmarks)
    floating: Tuple[str, ...]       # inputs cast to the case's dtype
    make: Callable                  # make(params, generator) -> dict of fp32/int CPU tensors and options
    fused: Callable                 # fused(x, backend) -> Tensor
    reference: Callable             # reference(x) -> Tensor
    loss_scale: Callable = None     # loss_scale(x) -> float, for scalar losses; None: a random upstream

    def inputs(self, shape: str, dtype: torch.dtype, device, seed: int = 0) -> dict:
        """Inputs at ``shape``: floating ones in ``dtype`` on ``device``, the rest (indices, masks) moved."""
        gen = torch.Generator().manual_seed(seed)
        x = self.make(self.shapes[shape], gen)
        out = {}
        for key, value in x.items():
            if isinstance(value, Tensor):
                value = value.to(device=device, dtype=dtype if key in self.floating else value.dtype)
            out[key] = value
        return out

    def upstream(self, out: Tensor, x: dict, seed: int = 1) -> Tensor:
        """The gradient fed to ``out.backward``, in out's dtype (the same values in every dtype up to rounding)."""
        if self.loss_scale is not None:
            return torch.full_like(out, self.loss_scale(x))
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)


def as_float64(x: dict, floating: Tuple[str, ...]) -> dict:
    """The same inputs with the floating ones in float64 (the reference's precision)."""
    return {k: (v.detach().double() if k in floating else v) if isinstance(v, Tensor) else v for k, v in x.items()}


# ---- masked_patch_embed ----

def _mpe_make(p, gen):
    batch, channels, height, width, patch, dim, keep = (p[k] for k in ("B", "C", "H", "W", "p", "D", "K"))
    n = (height // patch) * (width // patch)
    positions = n + p.get("extra_pos", 0)
    x = dict(images=torch.randn(batch, channels, height, width, generator=gen),
             weight=torch.randn(dim, channels, patch, patch, generator=gen) / math.sqrt(channels * patch * patch),
             bias=torch.randn(dim, generator=gen), pos_embed=torch.randn(positions, dim, generator=gen))
    if p.get("duplicates"):  # indices with repeats, positions from a longer table
        x["keep_idx"] = torch.randint(0, n, (batch, keep), generator=gen)
        x["pos_idx"] = torch.randint(0, positions, (batch, keep), generator=gen)
    else:
        x["keep_idx"] = ops.random_masking(batch, n, 1 - keep / n, generator=gen)[0]
        x["pos_idx"] = None
    return x


def _mpe_args(x):
    return x["images"], x["weight"], x["bias"], x["pos_embed"], x["keep_idx"], x["pos_idx"]


MASKED_PATCH_EMBED = OpCase(
    name="masked_patch_embed",
    shapes={"bench B256 32px p4 D192 r0.75": dict(B=256, C=3, H=32, W=32, p=4, D=192, K=16),
            "ragged B5 12x20 p4 D70 K7 dup": dict(B=5, C=3, H=12, W=20, p=4, D=70, K=7, duplicates=True,
                                                  extra_pos=3),
            "ragged B3 1x16x24 p8 D33 K4": dict(B=3, C=1, H=16, W=24, p=8, D=33, K=4)},
    grads=("images", "weight", "bias", "pos_embed"),
    bench_grads=("weight", "bias", "pos_embed"),
    floating=("images", "weight", "bias", "pos_embed"),
    make=_mpe_make,
    fused=lambda x, backend: ops.masked_patch_embed(*_mpe_args(x), backend=backend),
    reference=lambda x: ops.masked_patch_embed_reference(*_mpe_args(x)),
)


# ---- masked_pixel_loss ----

def _mpl_make(p, gen):
    batch, channels, height, width, patch = (p[k] for k in ("B", "C", "H", "W", "p"))
    n = (height // patch) * (width // patch)
    _, _, mask = ops.random_masking(batch, n, p["ratio"], generator=gen)
    return dict(pred=torch.randn(batch, n, channels * patch * patch, generator=gen),
                images=torch.randn(batch, channels, height, width, generator=gen),
                mask=mask, patch_size=patch, norm_pix=p.get("norm_pix", True))


def _mpl_args(x):
    return x["pred"], x["images"], x["mask"], x["patch_size"], x["norm_pix"]


MASKED_PIXEL_LOSS = OpCase(
    name="masked_pixel_loss",
    shapes={"bench B256 32px p4 r0.75 norm_pix": dict(B=256, C=3, H=32, W=32, p=4, ratio=0.75),
            "ragged B5 12x20 p4 r0.6 norm_pix": dict(B=5, C=3, H=12, W=20, p=4, ratio=0.6),
            "ragged B3 1x16x24 p8 r0.5 raw": dict(B=3, C=1, H=16, W=24, p=8, ratio=0.5, norm_pix=False)},
    grads=("pred",),
    bench_grads=("pred",),
    floating=("pred", "images"),
    make=_mpl_make,
    fused=lambda x, backend: ops.masked_pixel_loss(*_mpl_args(x), backend=backend),
    reference=lambda x: ops.masked_pixel_loss_reference(*_mpl_args(x)),
    loss_scale=lambda x: _scale_pow2(x["pred"].shape[-1] * float(x["mask"].sum()) / 2),
)


# ---- relation_loss and relation_mlp_loss: shared pair options ----

def _pair_options(p, gen, batch, n):
    """positions (a random subset of an S x S grid, or None = identity), grid_size, pair_mask [B, N, N] or None."""
    side = p.get("S", math.isqrt(n))
    x = dict(positions=None, grid_size=None, pair_mask=None, label_smoothing=p.get("smoothing", 0.0))
    if p.get("subset"):
        x["positions"] = torch.stack([torch.randperm(side * side, generator=gen)[:n] for _ in range(batch)])
        x["grid_size"] = side
    if p.get("pair_mask"):
        x["pair_mask"] = torch.rand(batch, n, n, generator=gen) < 0.7
    return x


def _pair_count(x, batch, n):
    return float(x["pair_mask"].sum()) if x["pair_mask"] is not None else float(batch * n * n)


def _rl_make(p, gen):
    batch, n, classes, head = p["B"], p["N"], 9, p["d_h"]
    x = dict(q=torch.randn(batch, n, classes, head, generator=gen), k=torch.randn(batch, n, classes, head, generator=gen))
    x.update(_pair_options(p, gen, batch, n))
    return x


def _rl_call(fn, x, **kw):
    return fn(x["q"], x["k"], x["positions"], grid_size=x["grid_size"], pair_mask=x["pair_mask"],
              label_smoothing=x["label_smoothing"], **kw)


RELATION_LOSS = OpCase(
    name="relation_loss",
    shapes={"bench B64 N64 C9 d_h42": dict(B=64, N=64, d_h=42),
            "bench B64 N196 C9 d_h42": dict(B=64, N=196, d_h=42),
            "ragged B3 N13 S5 d_h10 mask ls0.1": dict(B=3, N=13, d_h=10, S=5, subset=True, pair_mask=True,
                                                      smoothing=0.1)},
    grads=("q", "k"),
    bench_grads=("q", "k"),
    floating=("q", "k"),
    make=_rl_make,
    fused=lambda x, backend: _rl_call(ops.relation_loss, x, backend=backend),
    reference=lambda x: _rl_call(ops.relation_loss_reference, x),
    loss_scale=lambda x: _scale_pow2(_pair_count(x, x["q"].shape[0], x["q"].shape[1])),
)


def _rml_make(p, gen):
    batch, n, hidden = p["B"], p["N"], p["H"]
    outputs = 9 if p.get("task", "direction") == "direction" else 2
    x = dict(u=torch.randn(batch, n, hidden, generator=gen), v=torch.randn(batch, n, hidden, generator=gen),
             weight=torch.randn(outputs, hidden, generator=gen) / math.sqrt(hidden),
             bias=torch.randn(outputs, generator=gen) * 0.1,
             task=p.get("task", "direction"), activation=p.get("activation", "gelu"))
    x.update(_pair_options(p, gen, batch, n))
    if x["grid_size"] is None:
        x["grid_size"] = p.get("S", math.isqrt(n))
    return x


def _rml_call(fn, x, **kw):
    return fn(x["u"], x["v"], x["weight"], x["bias"], x["positions"], grid_size=x["grid_size"], task=x["task"],
              activation=x["activation"], pair_mask=x["pair_mask"], label_smoothing=x["label_smoothing"], **kw)


RELATION_MLP_LOSS = OpCase(
    name="relation_mlp_loss",
    shapes={"bench B64 N64 H384 gelu direction": dict(B=64, N=64, H=384),
            "ragged B3 N11 S4 H37 relu offset": dict(B=3, N=11, H=37, S=4, subset=True, task="offset",
                                                     activation="relu"),
            "ragged B2 N10 S4 H24 gelu mask ls0.1": dict(B=2, N=10, H=24, S=4, subset=True, pair_mask=True,
                                                         smoothing=0.1)},
    grads=("u", "v", "weight", "bias"),
    bench_grads=("u", "v", "weight", "bias"),
    floating=("u", "v", "weight", "bias"),
    make=_rml_make,
    fused=lambda x, backend: _rml_call(ops.relation_mlp_loss, x, backend=backend),
    reference=lambda x: _rml_call(ops.relation_mlp_loss_reference, x),
    loss_scale=lambda x: _scale_pow2(_pair_count(x, x["u"].shape[0], x["u"].shape[1])),
)



# ---- contrastive_loss ----

def _cl_make(p, gen):
    """q, k [B, D]; labels for positives="labels": classes of about 3 rows with one row alone in its class. With
    one_view the call passes cat([q, k]) [2B, D] as one view (labels [2B]): the lone row is an anchor without
    positives."""
    batch, dim = p["B"], p["D"]
    x = dict(q=torch.randn(batch, dim, generator=gen), k=torch.randn(batch, dim, generator=gen), labels=None,
             positives=p["positives"], temperature=p["temperature"], scale=p.get("scale", 1.0),
             one_view=p.get("one_view", False))
    if p["positives"] == "labels":
        rows = 2 * batch if x["one_view"] else batch
        x["labels"] = torch.randint(1, max(2, rows // 3), (rows,), generator=gen)
        x["labels"][0] = 0
    return x


def _cl_call(fn, x, **kw):
    q, k = (torch.cat([x["q"], x["k"]]), None) if x["one_view"] else (x["q"], x["k"])
    return fn(q, k, temperature=x["temperature"], positives=x["positives"], labels=x["labels"], scale=x["scale"], **kw)


CONTRASTIVE_LOSS = OpCase(
    name="contrastive_loss",
    shapes={"bench 2x2048 D128 ntxent": dict(B=2048, D=128, positives="ntxent", temperature=0.5),
            "bench 2x8192 D256 ntxent": dict(B=8192, D=256, positives="ntxent", temperature=0.5),
            "ragged B13 D40 diagonal": dict(B=13, D=40, positives="diagonal", temperature=0.2, scale=0.4),
            "ragged B11 D24 ntxent": dict(B=11, D=24, positives="ntxent", temperature=0.1),
            "ragged B14 D33 labels one view": dict(B=14, D=33, positives="labels", temperature=0.1, scale=0.7,
                                                   one_view=True)},
    grads=("q", "k"),
    bench_grads=("q", "k"),
    floating=("q", "k"),
    make=_cl_make,
    fused=lambda x, backend: _cl_call(ops.contrastive_loss, x, backend=backend),
    reference=lambda x: _cl_call(ops.contrastive_loss_reference, x),
    loss_scale=lambda x: _scale_pow2(x["q"].shape[0]),
)


# ---- dino_loss ----

def _dino_make(p, gen):
    """student [(G + L) B, d] and teacher [G B, d] unit rows (G global and L local crops; the head's bottleneck
    output), prototypes [K, d] (the weight-norm's v), centre [K]; with ema a teacher_prototypes near the student's."""
    views, batch, dim, k = p["G"] + p["L"], p["B"], p["d"], p["K"]
    prototypes = torch.randn(k, dim, generator=gen)
    return dict(student=torch.nn.functional.normalize(torch.randn(views * batch, dim, generator=gen), dim=1),
                teacher=torch.nn.functional.normalize(torch.randn(p["G"] * batch, dim, generator=gen), dim=1),
                prototypes=prototypes, centre=0.1 * torch.randn(k, generator=gen),
                teacher_prototypes=prototypes + 0.1 * torch.randn(k, dim, generator=gen) if p.get("ema") else None,
                views=views, teacher_views=p["G"])


def _dino_call(fn, x, **kw):
    """The loss only (the teacher mean has no gradient and is checked by the op tests)."""
    return fn(x["student"], x["teacher"], x["prototypes"], x["centre"], n_student_views=x["views"],
              n_teacher_views=x["teacher_views"], student_temp=0.1, teacher_temp=0.04,
              teacher_prototypes=x["teacher_prototypes"], **kw)[0]


DINO_LOSS = OpCase(
    name="dino_loss",
    shapes={"bench 2+8 crops x B64 K65536 d256": dict(B=64, d=256, K=65536, G=2, L=8),
            "ragged 2+3 crops x B5 K70 d33": dict(B=5, d=33, K=70, G=2, L=3),
            "ragged 2+1 crops x B3 K45 d20 ema": dict(B=3, d=20, K=45, G=2, L=1, ema=True)},
    grads=("student", "prototypes"),
    bench_grads=("student", "prototypes"),
    floating=("student", "teacher", "prototypes", "centre", "teacher_prototypes"),
    make=_dino_make,
    fused=lambda x, backend: _dino_call(ops.dino_loss, x, backend=backend),
    reference=lambda x: _dino_call(ops.dino_loss_reference, x),
    loss_scale=lambda x: _scale_pow2(x["teacher_views"] * (x["views"] - 1) * x["student"].shape[0] / x["views"]),
)

# ---- nn_topk ----

def _nt_make(p, gen):
    """Unit rows (the cosine) queries [B, d], queue [Q, d]; ids drawn from Q / 8 values: every query's id sits on
    about 8 queue entries (excluded), and several queries share ids."""
    batch, size, dim = p["B"], p["Q"], p["D"]
    return dict(queries=torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1),
                queue=torch.nn.functional.normalize(torch.randn(size, dim, generator=gen), dim=1),
                query_ids=torch.randint(0, max(2, size // 8), (batch,), generator=gen),
                queue_ids=torch.randint(0, max(2, size // 8), (size,), generator=gen), k=p["k"])


def _nt_similarity(x, indices):
    """The float64 similarity of each returned entry [B, k]: the rank's similarity whatever entry a near-tie picked,
    far from it when an index is wrong (the kernel-level op, no draw: every rank is checked)."""
    return torch.einsum("bd,bkd->bk", x["queries"].double(), x["queue"].double()[indices])


def _nt_args(x):
    return x["queries"], x["queue"], x["query_ids"], x["queue_ids"], x["k"]


NN_TOPK = OpCase(
    name="nn_topk",
    shapes={"bench B512 Q65536 d256 k20": dict(B=512, Q=65536, D=256, k=20),
            "ragged B9 Q150 d40 k20": dict(B=9, Q=150, D=40, k=20),
            "ragged B5 Q70 d33 k1": dict(B=5, Q=70, D=33, k=1)},
    grads=(),  # a lookup: no gradient
    bench_grads=(),
    floating=("queries", "queue"),
    make=_nt_make,
    fused=lambda x, backend: _nt_similarity(x, torch.ops.vitfast.nn_topk(*_nt_args(x), backend)[1]),
    reference=lambda x: _nt_similarity(x, _nn_topk_reference(*_nt_args(x))[1]),  # plain aten ops
)

CASES = {case.name: case for case in (MASKED_PATCH_EMBED, MASKED_PIXEL_LOSS, RELATION_LOSS, RELATION_MLP_LOSS,
                                      CONTRASTIVE_LOSS, DINO_LOSS, NN_TOPK)}
