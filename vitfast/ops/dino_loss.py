"""dino_loss: DINO's cross-entropy between teacher and student prototype distributions, without the [V·B, K] logits.

    loss, teacher_mean = dino_loss(student, teacher, prototypes, centre, n_student_views=10, n_teacher_views=2,
                                   student_temp=0.1, teacher_temp=0.04, teacher_prototypes=teacher_v)
    centre.update(teacher_mean, count=teacher.shape[0])      # vitfast.nn.MomentumCentre (DINOLoss does both)

Math (docs/methods.md §5.1). Rows are grouped by view: ``student`` [Vs·B, d] holds view 0's B rows, then view 1's, ...
(the Vt global crops first, then the local crops); ``teacher`` [Vt·B, d] holds the teacher's rows of the global crops
in the same order, so teacher view j is the same crop as student view j. The features are the DINO head's bottleneck
output as it gives them (its MLP ends with an L2 normalisation; this op does not normalise them). The last layer is
weight-normalised with its norm fixed to 1 (DINO's ``norm_last_layer``): W = v / ||v|| row by row, v = ``prototypes``
[K, d] (the student's; gradients flow to it through the normalisation) and ``teacher_prototypes`` [K, d] (the EMA copy;
default: ``prototypes``, detached). With s_r = W_s x_r (student row r) and t_r = W_t y_r (teacher row r):

    q_j,b = softmax((t_j,b - centre) / teacher_temp)          (no gradient)
    log p_v,b = log_softmax(s_v,b / student_temp)
    loss = 1 / (Vt·(Vs - 1)·B) · sum_b sum_{j < Vt} sum_{v != j} -<q_j,b, log p_v,b>
    teacher_mean = mean over the Vt·B teacher rows of t_r    [K] (this rank's; the centre update averages over ranks)

Kernel-level form: two streaming primitives over the K prototypes, each a softmax over K without storing it
(the same structure as one head of attention: rows = queries, prototypes = keys / values). The weight norm is fused:
the kernels read the raw prototypes v and a per-prototype scale (1 / ||v_k||), so no [K, d] W is ever built:

    softmax_rows(x [R, d], keys [K, d], key_scale [K], values [K, e], value_scale [K], bias [K], scale)
        -> (lse [R], out [R, e])
        z_rk = scale · key_scale_k · <x_r, keys_k> + bias_k
        lse_r = log sum_k exp(z_rk),  out_r = sum_k exp(z_rk - lse_r) · value_scale_k · values_k
    softmax_columns(x [R, d], keys [K, d], key_scale [K], bias [K], scale, lse [R], y [R, e], out [K, e])
        out_k += sum_r exp(z_rk - lse_r) · y_r        (in place; the transpose product: attention's dV)

x, keys, values share the input dtype; key_scale, value_scale, bias, lse, y, out and every output are in the
accumulation dtype (fp32; fp64 for fp64 inputs) and every product is accumulated in it. With s = 1 / ||v_s|| and
t = 1 / ||v_t|| (row norms, [K]), the loss needs only O((Vs + Vt)·B·d) work outside the primitives:

    teacher:  (lse_t, u) = softmax_rows(y, v_t, t, v_s, s, -centre / teacher_temp, 1 / teacher_temp)  u_r = sum_k q_rk W_s,k
    student:  (lse_s, P) = softmax_rows(x, v_s, s, v_s, s, 0, 1 / student_temp)                         P_r = sum_k p_rk W_s,k
    U_v = sum_{j < Vt, j != v} u_j   (per image),   m_v = #{j < Vt : j != v}
    loss = c · sum_r (m_v(r) · lse_s,r - <x_r, U_v(r)> / student_temp),   c = 1 / (Vt·(Vs - 1)·B)
    teacher_mean = t ⊙ (v_t · mean of the teacher rows)

    backward (g = the incoming gradient, f = g·c / student_temp):
    d x_r = f · (m_v(r) · P_r - U_v(r))
    G = 0;  softmax_columns(x, v_s, s, 0, 1 / student_temp, lse_s, f · m ⊙ x, G)
            softmax_columns(y, v_t, t, -centre / teacher_temp, 1 / teacher_temp, lse_t, -f · R, G)
            R_j,b = sum_{v != j} x_v,b  (the student rows each teacher row is paired with);  G = dL/dW_s
    d v_s,k = s_k · (G_k - s_k² <G_k, v_s,k> v_s,k)   (the weight norm's backward, in place on G: G is the gradient)

Memory: O((Vs + Vt)·B·d + K) besides the [K, d] gradient itself; no backend stores an [R, K] block beyond one tile
(the reference does: it is the spec).

Backends: ``triton`` (vitfast.kernels.dino_loss; CUDA, or CPU under TRITON_INTERPRET=1), ``cpu`` (vitfast._C:
dino_softmax_rows / dino_softmax_columns) and ``torch`` (the reference primitives below).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import NO_FLOAT64, declare_backends
from ._checks import FLOATING, Checker, accumulation_dtype

__all__ = ["dino_loss", "dino_loss_reference", "softmax_rows", "softmax_columns"]


def dino_loss_reference(student: Tensor, teacher: Tensor, prototypes: Tensor, centre: Tensor, *, n_student_views: int,
                        n_teacher_views: int, student_temp: float, teacher_temp: float,
                        teacher_prototypes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The spec, as DINO's released ``DINOLoss.forward`` computes it (dense logits, a loop over the view pairs)."""
    dtype = accumulation_dtype(student.dtype)
    teacher_prototypes = prototypes.detach() if teacher_prototypes is None else teacher_prototypes
    student_out = student.to(dtype) @ F.normalize(prototypes.to(dtype), dim=1).T
    teacher_out = (teacher.to(dtype) @ F.normalize(teacher_prototypes.to(dtype), dim=1).T).detach()
    student_chunks = (student_out / student_temp).chunk(n_student_views)
    teacher_chunks = F.softmax((teacher_out - centre.to(dtype).reshape(1, -1)) / teacher_temp, dim=-1
                               ).chunk(n_teacher_views)
    total, terms = 0.0, 0
    for j, q in enumerate(teacher_chunks):
        for v, s in enumerate(student_chunks):
            if v == j:
                continue  # the same crop seen by both
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            terms += 1
    return total / terms, teacher_out.mean(0)


# ---- the kernel-level primitives: the torch backend ----

def _logits(x, keys, key_scale, bias, scale):
    dtype = bias.dtype
    return (x.to(dtype) @ keys.to(dtype).T) * (scale * key_scale[None, :]) + bias[None, :]


def _reference_softmax_rows(x: Tensor, keys: Tensor, key_scale: Tensor, values: Tensor, value_scale: Tensor,
                            bias: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    z = _logits(x, keys, key_scale, bias, scale)
    lse = torch.logsumexp(z, dim=1)
    return lse, (torch.exp(z - lse[:, None]) * value_scale[None, :]) @ values.to(z.dtype)


def _reference_softmax_columns(x: Tensor, keys: Tensor, key_scale: Tensor, bias: Tensor, scale: float, lse: Tensor,
                               y: Tensor, out: Tensor) -> None:
    z = _logits(x, keys, key_scale, bias, scale)
    out.add_(torch.exp(z - lse[:, None]).T @ y)


BACKENDS = declare_backends(
    "dino_loss",
    reference=(_reference_softmax_rows, _reference_softmax_columns),
    native=("dino_softmax_rows", "dino_softmax_columns"),
    triton=("vitfast.kernels.dino_loss", "softmax_rows", "softmax_columns"),
    dtypes={"triton": NO_FLOAT64, "cpu": FLOATING, "torch": FLOATING},
)


# ---- torch.library registration of the primitives: torch.compile and opcheck see through them ----

@torch.library.custom_op("vitfast::dino_softmax_rows", mutates_args=())
def softmax_rows(x: Tensor, keys: Tensor, key_scale: Tensor, values: Tensor, value_scale: Tensor, bias: Tensor,
                 scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    """(lse [R], out [R, e]) in the accumulation dtype: see the module doc."""
    with torch.autocast(x.device.type, enabled=False):
        return tuple(BACKENDS(backend).forward(x, keys, key_scale, values, value_scale, bias, scale))


@softmax_rows.register_fake
def _(x, keys, key_scale, values, value_scale, bias, scale, backend):
    return x.new_empty(x.shape[:1], dtype=bias.dtype), x.new_empty((x.shape[0], values.shape[1]), dtype=bias.dtype)


@torch.library.custom_op("vitfast::dino_softmax_columns", mutates_args=("out",))
def softmax_columns(x: Tensor, keys: Tensor, key_scale: Tensor, bias: Tensor, scale: float, lse: Tensor, y: Tensor,
                    out: Tensor, backend: str) -> None:
    """out [K, e] += the transpose product, in the accumulation dtype: see the module doc."""
    with torch.autocast(x.device.type, enabled=False):
        BACKENDS(backend).backward(x, keys, key_scale, bias, scale, lse, y, out)


# ---- the loss from the primitives, with its own backward ----

def _per_view(rows: Tensor, views: int) -> Tensor:
    return rows.view(views, rows.shape[0] // views, *rows.shape[1:])


CHUNK = 8192  # prototype rows per step of the O(K·d) glue below: 16-bit rows are widened a chunk at a time


def _row_dots(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """<a_k, b_k> for every row [K] in ``dtype``, without a full-size product or copy (16-bit rows are widened one
    chunk at a time, once when a is b)."""
    dots = []
    for ac, bc in zip(a.split(CHUNK), b.split(CHUNK)):
        ac = ac.to(dtype)
        bc = ac if b is a else bc.to(dtype)
        dots.append(torch.bmm(ac.unsqueeze(1), bc.unsqueeze(2)).view(-1))
    return torch.cat(dots)


def _inverse_norms(v: Tensor, dtype: torch.dtype) -> Tensor:
    """1 / max(||v_k||, 1e-12) per row [K] (F.normalize's eps): the fused weight norm's scale."""
    return _row_dots(v, v, dtype).sqrt().clamp_min(1e-12).reciprocal()


class _DINOLoss(torch.autograd.Function):
    """Inputs: x [Vs·B, d], y [Vt·B, d], v_s [K, d] and v_t [K, d] (raw prototypes), centre [K] (accumulation dtype).
    Gradients: x and v_s (through the fused weight norm)."""

    @staticmethod
    def forward(ctx, x, y, v_s, v_t, centre, n_student, n_teacher, student_temp, teacher_temp, backend):
        dtype = centre.dtype
        s_scale = _inverse_norms(v_s, dtype)
        t_scale = _inverse_norms(v_t, dtype)
        teacher_bias = -centre / teacher_temp
        student_bias = torch.zeros_like(centre)
        lse_t, u = softmax_rows(y, v_t, t_scale, v_s, s_scale, teacher_bias, 1.0 / teacher_temp, backend)
        lse_s, p = softmax_rows(x, v_s, s_scale, v_s, s_scale, student_bias, 1.0 / student_temp, backend)
        u_views = _per_view(u, n_teacher)                                   # [Vt, B, d]
        others = u_views.sum(0, keepdim=True).expand(n_student, -1, -1).clone()
        others[:n_teacher] -= u_views                                      # U_v: the teachers paired with view v
        pairs = torch.full((n_student,), float(n_teacher), dtype=dtype, device=x.device)
        pairs[:n_teacher] -= 1                                              # m_v
        batch = x.shape[0] // n_student
        c = 1.0 / (n_teacher * (n_student - 1) * batch)
        xs = _per_view(x.to(dtype), n_student)
        loss = c * ((pairs[:, None] * _per_view(lse_s, n_student)).sum()
                    - (xs * others).sum() / student_temp)
        mean_row = y.to(dtype).mean(0)
        teacher_mean = torch.cat([chunk.to(dtype) @ mean_row for chunk in v_t.split(CHUNK)]) * t_scale  # linear in t_r
        ctx.save_for_backward(x, y, v_s, v_t, s_scale, t_scale, teacher_bias, student_bias, lse_t, lse_s, p, others,
                              pairs)
        ctx.constants = (n_student, n_teacher, student_temp, teacher_temp, c, backend)
        ctx.mark_non_differentiable(teacher_mean)
        return loss, teacher_mean

    @staticmethod
    def backward(ctx, grad, unused_grad_mean):
        x, y, v_s, v_t, s_scale, t_scale, teacher_bias, student_bias, lse_t, lse_s, p, others, pairs = \
            ctx.saved_tensors
        n_student, n_teacher, student_temp, teacher_temp, c, backend = ctx.constants
        factor = grad.to(p.dtype) * (c / student_temp)
        d_x = d_v = None
        if ctx.needs_input_grad[0]:
            d_x = (factor * (pairs[:, None, None] * _per_view(p, n_student) - others)).reshape(p.shape).to(x.dtype)
        if ctx.needs_input_grad[2]:
            xs = _per_view(x.to(p.dtype), n_student)
            weighted = (factor * pairs[:, None, None] * xs).reshape(p.shape)                          # f · m ⊙ x
            paired = (-factor * (xs.sum(0, keepdim=True) - xs[:n_teacher])).reshape(y.shape[0], -1)  # -f · R
            g = torch.zeros(v_s.shape, dtype=p.dtype, device=v_s.device)  # dL/dW_s, then dL/dv_s in place
            softmax_columns(x, v_s, s_scale, student_bias, 1.0 / student_temp, lse_s, weighted, g, backend)
            softmax_columns(y, v_t, t_scale, teacher_bias, 1.0 / teacher_temp, lse_t, paired, g, backend)
            # The weight norm's backward, row by row and in place: g_k <- s_k (g_k - s_k^2 <g_k, v_k> v_k).
            along = _row_dots(g, v_s, g.dtype)
            g.addcmul_(v_s, (along * s_scale * s_scale)[:, None], value=-1.0)
            g.mul_(s_scale[:, None])
            d_v = g.to(v_s.dtype)
        return d_x, None, d_v, None, None, None, None, None, None, None


# ---- public function ----

def _positive_number(check: Checker, name: str, value) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        check.fail(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def dino_loss(student: Tensor, teacher: Tensor, prototypes: Tensor, centre: Tensor, *, n_student_views: int,
              n_teacher_views: int, student_temp: float, teacher_temp: float,
              teacher_prototypes: Optional[Tensor] = None, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """DINO loss (see the module doc): (loss [], teacher_mean [K], detached), both float32 (float64 for float64).

    student [Vs·B, d], teacher [Vt·B, d], prototypes / teacher_prototypes [K, d] in one floating dtype (autocast casts
    them to its dtype); centre [K] or [1, K] (any floating dtype; used in the accumulation dtype). The teacher and
    teacher_prototypes get no gradient."""
    check = Checker("dino_loss")
    for name, value in (("n_student_views", n_student_views), ("n_teacher_views", n_teacher_views)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            check.fail(f"{name} must be a positive int, got {value!r}")
    if n_student_views < 2 or n_teacher_views > n_student_views:
        check.fail(f"needs n_student_views >= 2 and n_teacher_views <= n_student_views (teacher view j is student "
                   f"view j), got {n_student_views} and {n_teacher_views}")
    student_temp = _positive_number(check, "student_temp", student_temp)
    teacher_temp = _positive_number(check, "teacher_temp", teacher_temp)
    student = check.tensor("student", student, ("Vs*B", "d"))
    device = student.device
    check.tensor("teacher", teacher, ("Vt*B", "d"), device=device)
    check.tensor("prototypes", prototypes, ("K", "d"), device=device)
    if teacher_prototypes is not None:
        check.tensor("teacher_prototypes", teacher_prototypes, ("K", "d"), device=device)
    if student.shape[0] % n_student_views or teacher.shape[0] % n_teacher_views:
        check.fail(f"student rows ({student.shape[0]}) and teacher rows ({teacher.shape[0]}) must be "
                   f"n_student_views ({n_student_views}) and n_teacher_views ({n_teacher_views}) times B")
    batch = student.shape[0] // n_student_views
    if batch == 0 or teacher.shape[0] // n_teacher_views != batch:
        check.fail(f"student has B = {batch} images per view and teacher "
                   f"{teacher.shape[0] // n_teacher_views}; they must be equal and at least 1")
    if student.shape[1] == 0 or prototypes.shape[0] == 0:
        check.fail(f"needs d >= 1 and K >= 1, got d = {student.shape[1]}, K = {prototypes.shape[0]}")
    if isinstance(centre, Tensor) and centre.dim() == 2 and centre.shape[0] == 1:
        centre = centre[0]
    check.tensor("centre", centre, ("K",), device=device)

    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        student, teacher, prototypes = student.to(dtype), teacher.to(dtype), prototypes.to(dtype)
        teacher_prototypes = teacher_prototypes.to(dtype) if teacher_prototypes is not None else None
    check.same_dtype("student", student, teacher=teacher, prototypes=prototypes, teacher_prototypes=teacher_prototypes)

    dtype = accumulation_dtype(student.dtype)
    prototypes = prototypes.contiguous()
    teacher_prototypes = prototypes.detach() if teacher_prototypes is None else teacher_prototypes.detach().contiguous()
    chosen = BACKENDS.select(device, student.dtype, backend)
    with torch.autocast(device.type, enabled=False):  # the glue in the accumulation dtype (inputs cast above)
        loss, teacher_mean = _DINOLoss.apply(student.contiguous(), teacher.detach().contiguous(), prototypes,
                                             teacher_prototypes, centre.detach().to(dtype).contiguous(),
                                             n_student_views, n_teacher_views, student_temp, teacher_temp, chosen)
    return loss, teacher_mean
