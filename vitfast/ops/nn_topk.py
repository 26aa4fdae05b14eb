"""nn_topk: nearest-neighbour lookup in a feature queue (NNCLR, MAE-CT) without the B x Q similarity matrix.

    index, similarity = nn_topk(z, queue_features, k=20, queue_ids=queue_ids, query_ids=batch_ids, generator=g)
    neighbours = queue_features[index]                      # [B, d]: one of each query's 20 nearest entries

Math (docs/methods.md §6.2). The similarity of query b and queue entry q is <queries[b], queue[q]> (pass unit rows
for the cosine). Entries carrying the query's own dataset id are excluded (``queue_ids[q] == query_ids[b]``; without
ids nothing is excluded). Each query's k most similar remaining entries are ranked by similarity, descending, ties by
the lower queue index first; one rank r_b is drawn uniformly from 0 .. k-1 per query (``generator``), and the entry at
that rank is returned: its queue index [B] int64 and its similarity [B] (float32; float64 for float64 inputs). k = 1 is
the plain nearest neighbour (no draw). The lookup has no gradient. MAE-CT's code sets the similarity of the excluded
entries to -1 instead of removing them; the two agree unless fewer than k entries have a similarity above -1.

Kernel-level form (what every backend computes): queries [B, d], queue [Q, d] (one dtype), query_ids [B], queue_ids
[Q] int64, k -> (values [B, k] accumulation dtype, indices [B, k] int64): the k best eligible entries of each query in
rank order (similarities accumulated in fp32; fp64 for fp64). Without ids the public function passes query ids that
match no queue id. Every query has at least k eligible entries (the public function checks it).

Memory: O(B·k) plus tiles; no backend stores the [B, Q] similarities (the reference does: it is the spec).

Backends: ``triton`` (vitfast.kernels.nn_topk), ``cpu`` (vitfast._C: nn_topk) and ``torch`` (the reference below).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._backend import NO_FLOAT64, declare_backends
from ._checks import FLOATING, Checker, accumulation_dtype

__all__ = ["nn_topk", "nn_topk_reference"]

_NO_ID = torch.iinfo(torch.int64).min  # the query id used without ids: no queue id may take it


def _reference_topk(queries: Tensor, queue: Tensor, query_ids: Tensor, queue_ids: Tensor, k: int
                    ) -> Tuple[Tensor, Tensor]:
    """The spec: dense similarities, excluded entries removed, a stable sort (ties: lower index first)."""
    dtype = accumulation_dtype(queries.dtype)
    similarity = queries.to(dtype) @ queue.to(dtype).T
    similarity = similarity.masked_fill(queue_ids[None, :] == query_ids[:, None], float("-inf"))
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :k].contiguous()  # as the fake
    return similarity.gather(1, order), order


def nn_topk_reference(queries: Tensor, queue: Tensor, *, k: int, queue_ids: Optional[Tensor] = None,
                      query_ids: Optional[Tensor] = None, generator: Optional[torch.Generator] = None
                      ) -> Tuple[Tensor, Tensor]:
    """The spec of :func:`nn_topk` in plain PyTorch (the same draw for the same generator state)."""
    return nn_topk(queries, queue, k=k, queue_ids=queue_ids, query_ids=query_ids, generator=generator,
                   backend="torch")


BACKENDS = declare_backends(
    "nn_topk",
    reference=(_reference_topk, None),
    native=("nn_topk", None),
    triton=("vitfast.kernels.nn_topk", "nn_topk", None),
    dtypes={"triton": NO_FLOAT64, "cpu": FLOATING, "torch": FLOATING},
)


@torch.library.custom_op("vitfast::nn_topk", mutates_args=())
def _nn_topk_op(queries: Tensor, queue: Tensor, query_ids: Tensor, queue_ids: Tensor, k: int, backend: str
                ) -> Tuple[Tensor, Tensor]:
    with torch.autocast(queries.device.type, enabled=False):
        values, indices = BACKENDS(backend).forward(queries, queue, query_ids, queue_ids, k)
    return values, indices


@_nn_topk_op.register_fake
def _(queries, queue, query_ids, queue_ids, k, backend):
    shape = (queries.shape[0], k)
    return (queries.new_empty(shape, dtype=accumulation_dtype(queries.dtype)),
            queries.new_empty(shape, dtype=torch.int64))


def _eligible_counts(query_ids: Tensor, queue_ids: Tensor) -> Tensor:
    """Per query, the number of queue entries not carrying its id: [B], O((B + Q) log Q)."""
    sorted_ids = torch.sort(queue_ids).values
    same = (torch.searchsorted(sorted_ids, query_ids, right=True)
            - torch.searchsorted(sorted_ids, query_ids, right=False))
    return queue_ids.shape[0] - same


def nn_topk(queries: Tensor, queue: Tensor, *, k: int, queue_ids: Optional[Tensor] = None,
            query_ids: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
            backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One of the k nearest queue entries per query (see the module doc): (index [B] int64, similarity [B]).

    queries [B, d], queue [Q, d] (one floating dtype; autocast casts them to its dtype); queue_ids [Q] and query_ids
    [B] int64, both or neither; generator: where the uniform rank is drawn (k > 1)."""
    check = Checker("nn_topk")
    queries = check.tensor("queries", queries, ("B", "d"))
    device = queries.device
    check.tensor("queue", queue, ("Q", "d"), device=device)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        check.fail(f"k must be a positive int, got {k!r}")
    if queries.shape[1] == 0:
        check.fail(f"queries must have at least one feature, got {list(queries.shape)}")
    if (queue_ids is None) != (query_ids is None):
        check.fail("pass both queue_ids [Q] and query_ids [B] (to exclude each query's own entries) or neither")
    if queue_ids is not None:
        check.tensor("queue_ids", queue_ids, ("Q",), dtypes=(torch.int64,), device=device)
        check.tensor("query_ids", query_ids, ("B",), dtypes=(torch.int64,), device=device)
        eligible = _eligible_counts(query_ids, queue_ids)
    else:
        query_ids = torch.full((queries.shape[0],), _NO_ID, dtype=torch.int64, device=device)
        queue_ids = torch.zeros(queue.shape[0], dtype=torch.int64, device=device)
        eligible = None  # every entry is eligible: the check needs no tensor
    if queries.shape[0] > 0 and not torch.compiler.is_compiling():
        if eligible is not None and device.type != "cpu":
            # No host sync on accelerators: an asynchronous device assert (the error surfaces at the next sync).
            torch._assert_async((eligible >= k).all(), f"vitfast.ops.nn_topk: a query has fewer than k = {k} queue "
                                                       f"entries not carrying its own id (queue of {queue.shape[0]})")
        else:
            fewest = queue.shape[0] if eligible is None else int(eligible.min())
            if fewest < k:
                row = 0 if eligible is None else int(eligible.argmin())
                check.fail(f"query {row} has {fewest} queue entries not carrying its own id, fewer than k = {k} "
                           f"(queue of {queue.shape[0]})")

    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        queries, queue = queries.to(dtype), queue.to(dtype)
    check.same_dtype("queries", queries, queue=queue)
    chosen = BACKENDS.select(device, queries.dtype, backend)
    with torch.no_grad():
        values, indices = _nn_topk_op(queries.detach().contiguous(), queue.detach().contiguous(),
                                      query_ids.contiguous(), queue_ids.contiguous(), k, chosen)
        if k == 1:
            return indices[:, 0], values[:, 0]
        draw_device = generator.device if generator is not None else device
        rank = torch.randint(k, (queries.shape[0], 1), generator=generator, device=draw_device).to(device)
        return indices.gather(1, rank)[:, 0], values.gather(1, rank)[:, 0]
