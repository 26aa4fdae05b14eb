"""nn_topk's benchmark rows beside what users write today (benchmarks/run.py runs them with the other ops).

    python benchmarks/run.py --ops nn_topk --no-gemm

The inputs and shapes are gpu_check's nn_topk case ("bench B512 Q65536 d256 k20": queries [512, 256], queue
[65536, 256] unit rows, dataset ids with each query's id on several queue entries, k = 20); only the two calls
differ. gpu_check compares every rank of the kernel-level op; here a step is what a training step runs, the lookup
with its draw (no gradient):

    vitfast-<backend>                           vitfast.ops.nn_topk(queries, queue, k=20, queue_ids=, query_ids=)
    eager matmul + masked_fill + topk           the [B, Q] similarities, own ids masked to -inf, torch.topk, the draw
    torch.compile(matmul + masked_fill + topk)  the same function compiled
"""
from __future__ import annotations

import dataclasses

import torch

from vitfast import ops
from vitfast.gpu_check.cases import CASES

# time_case's names of the two unfused rows -> what they are here
LABELS = {"eager reference": "eager matmul + masked_fill + topk",
          "torch.compile(reference)": "torch.compile(matmul + masked_fill + topk)"}


def matmul_masked_topk(queries, queue, queue_ids, query_ids, k):
    """What users write: the [B, Q] similarities, the query's own entries masked to -inf, torch.topk, and one of
    the k drawn uniformly per query. Returns the drawn similarity [B]."""
    similarity = queries @ queue.T
    similarity = similarity.masked_fill(queue_ids[None, :] == query_ids[:, None], float("-inf"))
    values, _ = similarity.topk(k, dim=1)
    rank = torch.randint(k, (queries.shape[0], 1), device=queries.device)
    return values.gather(1, rank)[:, 0]


def _args(x):
    return x["queries"], x["queue"], x["queue_ids"], x["query_ids"], x["k"]


NN_TOPK_BENCH = dataclasses.replace(
    CASES["nn_topk"],
    fused=lambda x, backend: ops.nn_topk(x["queries"], x["queue"], k=x["k"], queue_ids=x["queue_ids"],
                                         query_ids=x["query_ids"], backend=backend)[1],
    reference=lambda x: matmul_masked_topk(*_args(x)),
)
