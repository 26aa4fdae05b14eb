"""The benchmarks of the two streaming ops of issue 11, beside what users write today (benchmarks/run.py runs them).

    python benchmarks/run.py --ops dino_loss,nn_topk --no-gemm

dino_loss, shape "bench 2+8 crops x B64 K65536 d256": student [10·64, 256] (2 global + 8 local crops), teacher
[2·64, 256], prototypes and teacher prototypes [65536, 256], centre [65536]; a step is forward + backward for the
student features and the prototypes. Rows: every fused backend (``vitfast-<backend>``), ``eager reference``
(``dino_loss_reference``: DINO's dense logits and loop over view pairs) and ``torch.compile(reference)``.

nn_topk, shape "bench B512 Q65536 d256 k20": queries [512, 256], queue [65536, 256] (unit rows), dataset ids with
every query's id in the queue, k = 20, one draw; a step is the lookup alone (it has no gradient). Rows: every fused
backend, ``eager matmul + masked_fill + topk`` (the [B, Q] similarities, own ids masked to -inf, torch.topk, the
same draw) and ``torch.compile(matmul + masked_fill + topk)`` (the draw stays outside the compiled graph: dynamo
breaks the graph at a generator).

The "smoke" shapes are tiny versions for tests/test_benchmark_streaming_ops.py (``--shapes smoke``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitfast import ops
from vitfast.gpu_check import checks, measure
from vitfast.gpu_check.cases import DTYPES, OpCase

TEMPS = dict(student_temp=0.1, teacher_temp=0.04)


# ---- dino_loss ----

def _dino_make(p, gen):
    views, globals_, batch, dim, protos = p["Vs"], p["Vt"], p["B"], p["d"], p["K"]
    prototypes = torch.randn(protos, dim, generator=gen)
    return dict(student=F.normalize(torch.randn(views * batch, dim, generator=gen), dim=1),
                teacher=F.normalize(torch.randn(globals_ * batch, dim, generator=gen), dim=1),
                prototypes=prototypes, teacher_prototypes=prototypes + 0.01 * torch.randn(protos, dim, generator=gen),
                centre=0.01 * torch.randn(protos, generator=gen), views=(views, globals_))


def _dino_call(fn, x, **kw):
    loss, _ = fn(x["student"], x["teacher"], x["prototypes"], x["centre"], n_student_views=x["views"][0],
                 n_teacher_views=x["views"][1], teacher_prototypes=x["teacher_prototypes"], **TEMPS, **kw)
    return loss


DINO_LOSS = OpCase(
    name="dino_loss",
    shapes={"bench 2+8 crops x B64 K65536 d256": dict(Vs=10, Vt=2, B=64, d=256, K=65536),
            "smoke 2+2 crops x B16 K300 d8": dict(Vs=4, Vt=2, B=16, d=8, K=300)},
    grads=("student", "prototypes"),
    bench_grads=("student", "prototypes"),
    floating=("student", "teacher", "prototypes", "teacher_prototypes"),
    make=_dino_make,
    fused=lambda x, backend: _dino_call(ops.dino_loss, x, backend=backend),
    reference=lambda x: _dino_call(ops.dino_loss_reference, x),
    loss_scale=lambda x: 1.0,
)


# ---- nn_topk ----

def _topk_make(p, gen):
    batch, size, dim = p["B"], p["Q"], p["d"]
    queue_ids = torch.randint(0, 4 * size, (size,), generator=gen)
    query_ids = queue_ids[torch.randperm(size, generator=gen)[:batch]]  # each query's id is in the queue
    return dict(queries=F.normalize(torch.randn(batch, dim, generator=gen), dim=1),
                queue=F.normalize(torch.randn(size, dim, generator=gen), dim=1),
                queue_ids=queue_ids, query_ids=query_ids, k=p["k"], generator=torch.Generator().manual_seed(0))


def matmul_masked_topk(queries, queue, queue_ids, query_ids, k):
    """What users write: the [B, Q] similarities, the query's own entries masked to -inf, torch.topk."""
    similarity = queries @ queue.T
    similarity = similarity.masked_fill(queue_ids[None, :] == query_ids[:, None], float("-inf"))
    return similarity.topk(k, dim=1)


def _draw(top, generator):
    """One of the k entries per query, uniformly: (index [B], similarity [B])."""
    values, indices = top
    rank = torch.randint(values.shape[1], (values.shape[0], 1), generator=generator).to(values.device)
    return indices.gather(1, rank)[:, 0], values.gather(1, rank)[:, 0]


def _topk_args(x):
    return x["queries"], x["queue"], x["queue_ids"], x["query_ids"], x["k"]


NN_TOPK = OpCase(
    name="nn_topk",
    shapes={"bench B512 Q65536 d256 k20": dict(B=512, Q=65536, d=256, k=20),
            "smoke B5 Q200 d24 k20": dict(B=5, Q=200, d=24, k=20)},
    grads=(),
    bench_grads=(),
    floating=("queries", "queue"),
    make=_topk_make,
    fused=lambda x, backend: ops.nn_topk(x["queries"], x["queue"], k=x["k"], queue_ids=x["queue_ids"],
                                         query_ids=x["query_ids"], generator=x["generator"], backend=backend),
    reference=lambda x: _draw(matmul_masked_topk(*_topk_args(x)), x["generator"]),
)

BENCH_CASES = {case.name: case for case in (DINO_LOSS, NN_TOPK)}


def time_lookup(case: OpCase, shape: str, dtype_name: str, device, rounds: int, compile_backend=None) -> list:
    """Rows of a forward-only op (nn_topk): each fused backend, the eager composition and its compiled graph. The
    floor is the inputs (no gradients); peak above it is what the lookup allocates."""
    x = case.inputs(shape, DTYPES[dtype_name], device)
    floor_bytes = measure.tensor_bytes([v for v in x.values() if isinstance(v, torch.Tensor)])
    impls = {name: fn for name, fn in checks.implementations(case, device, DTYPES[dtype_name]).items()
             if name.startswith("vitfast-")}
    impls["eager matmul + masked_fill + topk"] = case.reference
    impls["torch.compile(matmul + masked_fill + topk)"] = "compile"
    rows = []
    for name, fn in impls.items():
        row = dict(op=case.name, shape=shape, dtype=dtype_name, implementation=name, device=str(device))
        try:
            with checks.matmul_precision(dtype_name), torch.no_grad():
                if fn == "compile":
                    torch._dynamo.reset()
                    compiled = torch.compile(matmul_masked_topk,
                                             **({"backend": compile_backend} if compile_backend else {}))
                    fn = lambda x, compiled=compiled: _draw(compiled(*_topk_args(x)), x["generator"])  # noqa: E731
                fn(x)  # warm-up (and compilation)
                step = lambda fn=fn: fn(x)  # noqa: E731
                samples = measure.time_ms(step, device, rounds, warmup=2)
                peak = measure.peak_bytes(step, device)
            rows.append({**row, **measure.summary(samples), "peak_above_floor_bytes": peak,
                         "floor_bytes": floor_bytes})
        except Exception as error:
            rows.append({**row, "error": f"{type(error).__name__}: {error}"})
    return rows


def time_rows(op: str, shape: str, dtype_name: str, device, rounds: int, compile_backend=None) -> list:
    """Rows for one (op, shape, dtype) of BENCH_CASES, in benchmarks/run.py's format."""
    case = BENCH_CASES[op]
    if case.bench_grads:
        return checks.time_case(case, shape, dtype_name, device, rounds, compile_backend)
    return time_lookup(case, shape, dtype_name, device, rounds, compile_backend)
