"""contrastive_loss across 2 CPU processes (gloo): 2 ranks x B/2 with gather_distributed=True give the loss (mean over
ranks) and the gradients (each rank backward loss / world, as DDP averages) of 1 process x B, for every positive mode
and every backend that runs on the CPU here; a gather without the all-reduce in its backward fails that comparison;
gather_rows_with_grad on its own and its unequal-rows error; gradient caching over micro-batches on 2 ranks.

One spawn of 2 processes serves the whole module and the other distributed test modules (tests/_ranks.py: ~8 s on 2
cores for all three, most of it starting and importing torch in the two processes); collectives time out after 120 s
and the processes are killed after 300 s per module, so a hang fails instead of blocking CI.
"""
import importlib
import os
import traceback
from datetime import timedelta

import pytest
import torch
from _ranks import normwise, share, spawn_ranks  # tests/_ranks.py: the spawn harness

WORLD, BATCH, DIM = 2, 6, 5  # BATCH rows in all, BATCH / WORLD per rank
MODES = ("diagonal", "ntxent", "labels", "labels1")
TOLERANCE = 1e-5  # normwise, fp32: the sums run in other orders on 2 ranks than on 1


def backends_here():
    from vitfast.ops.contrastive_loss import BACKENDS
    return [b for b in ("torch", "cpu") if BACKENDS.runs_on(b, torch.device("cpu"), torch.float32)]


def global_inputs(mode):
    """The whole batch, the same in every process: q, k (None for one-view labels), kwargs. Labels repeat across
    the two ranks' halves, so positives span ranks; label 9 is alone (an anchor without a positive in one view)."""
    gen = torch.Generator().manual_seed(MODES.index(mode))
    q = torch.randn(BATCH, DIM, generator=gen)
    k = None if mode == "labels1" else q + 0.5 * torch.randn(BATCH, DIM, generator=gen)
    kwargs = dict(positives="labels" if mode.startswith("labels") else mode, temperature=0.3, scale=1.7)
    if mode.startswith("labels"):
        kwargs["labels"] = torch.tensor([0, 1, 9, 1, 0, 2])
    return q, k, kwargs


def local_part(t, rank):
    rows = t.shape[0] // WORLD
    return t[rank * rows:(rank + 1) * rows]


def loss_and_grads(q, k, kwargs, backend, world=1, **extra):
    """The loss and d(loss / world)/d(q, k) of this process's rows (world = 1: the whole batch, no gather)."""
    from vitfast.ops import contrastive_loss
    leaves = [t.clone().requires_grad_() for t in (q, k) if t is not None]
    loss = contrastive_loss(*leaves, backend=backend, **kwargs, **extra)
    grads = torch.autograd.grad(loss / world, leaves)
    return [loss.detach(), *grads]


class _GatherWithoutAllReduce(torch.autograd.Function):
    """The classic wrong gather: the backward keeps only this rank's own slice of its own loss's gradient."""

    @staticmethod
    def forward(ctx, x):
        from vitfast.distributed import gather_rows
        ctx.rows = x.shape[0]
        return gather_rows(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def cached_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 8), torch.nn.ReLU(), torch.nn.Linear(8, DIM))


def cached_inputs():
    gen = torch.Generator().manual_seed(42)
    return torch.randn(2, 8, 7, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])  # 2 views of 8 images


def supcon_fn(labels, gather):
    from vitfast.nn import SupConLoss
    loss = SupConLoss(temperature=0.1, base_temperature=0.07, gather_distributed=gather)
    return lambda z0, z1: loss(torch.stack([z0, z1], dim=1), labels)


def unlabelled_features():
    return torch.randn(BATCH, 3, DIM, generator=torch.Generator().manual_seed(7))  # 3 views


def unlabelled_loss(gather):
    from vitfast.nn import SupConLoss
    return lambda features: SupConLoss(temperature=0.1, gather_distributed=gather)(features)


def _worker(rank, port, out_dir):
    try:
        import torch.distributed as dist

        op_module = importlib.import_module("vitfast.ops.contrastive_loss")  # the attribute is the function
        from vitfast.distributed import gather_rows_with_grad
        from vitfast.nn import cached_contrastive_backward

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=120))
        results = {"gathered": {}, "wrong": {}}
        for backend in backends_here():
            for mode in MODES:
                q, k, kwargs = global_inputs(mode)
                q, k = local_part(q, rank), (local_part(k, rank) if k is not None else None)
                if "labels" in kwargs:
                    kwargs["labels"] = local_part(kwargs["labels"], rank)
                results["gathered"][backend, mode] = loss_and_grads(q, k, kwargs, backend, WORLD,
                                                                    gather_distributed=True)
                right = op_module.gather_rows_with_grad
                op_module.gather_rows_with_grad = _GatherWithoutAllReduce.apply
                try:
                    results["wrong"][backend, mode] = loss_and_grads(q, k, kwargs, backend, WORLD,
                                                                     gather_distributed=True)
                finally:
                    op_module.gather_rows_with_grad = right

        # SupConLoss without labels: each image its own class, unique over the gathered batch.
        features = local_part(unlabelled_features(), rank).clone().requires_grad_()
        loss = unlabelled_loss(True)(features)
        results["unlabelled"] = (loss.detach(), torch.autograd.grad(loss / WORLD, features)[0])

        # gather_rows_with_grad on its own: rank order forward, summed-then-sliced backward.
        x = ((rank + 1) * torch.arange(6.0).view(3, 2)).requires_grad_()
        gathered = gather_rows_with_grad(x)
        weight = torch.randn(6, 2, generator=torch.Generator().manual_seed(100 + rank))
        (gathered * weight).sum().backward()
        results["gather"] = (gathered.detach(), x.grad)
        try:
            gather_rows_with_grad(torch.zeros(3 - rank, 2))
            results["unequal"] = "no error"
        except ValueError as error:
            results["unequal"] = str(error)

        # Gradient caching: this rank's 4 images in 2 micro-batches of 2, pool = the 8 images of both ranks.
        model = cached_model()
        views, labels = cached_inputs()
        views, labels = local_part(views.transpose(0, 1), rank).transpose(0, 1), local_part(labels, rank)
        chunks = [views[:, :2], views[:, 2:]]
        loss = cached_contrastive_backward(lambda c: (model(c[0]), model(c[1])), chunks, supcon_fn(labels, True))
        grads = [p.grad.clone() for p in model.parameters()]
        for grad in grads:  # what DDP does: the mean over ranks
            dist.all_reduce(grad)
            grad /= WORLD
        results["cached"] = (loss, grads)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (reported by the parent)
        results = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


share(_worker, WORLD)  # one spawn runs the workers of every distributed test module


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of both ranks (one spawn, shared by the distributed test modules)."""
    return spawn_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("contrastive_ranks")))


def distributed_error(ranks, key, backend, mode):
    """The largest normwise error of the 2-rank loss (mean over ranks) and gradients (rows in rank order) against
    the one-process whole batch."""
    q, k, kwargs = global_inputs(mode)
    want = loss_and_grads(q, k, kwargs, backend)
    per_rank = [r[key][backend, mode] for r in ranks]
    loss = torch.stack([p[0] for p in per_rank]).mean()
    grads = [torch.cat([p[i] for p in per_rank]) for i in range(1, len(want))]
    return max(normwise(a, b) for a, b in zip([loss, *grads], want))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_two_ranks_equal_one_process(ranks, backend, mode):
    if backend not in backends_here():
        pytest.skip(f"backend {backend} is not built here")
    assert distributed_error(ranks, "gathered", backend, mode) <= TOLERANCE


@pytest.mark.parametrize("mode", MODES)
def test_gather_without_all_reduce_fails_the_comparison(ranks, mode):
    """The same comparison catches the wrong gather (so the test above can fail), by far more than its tolerance."""
    assert distributed_error(ranks, "wrong", "torch", mode) > 100 * TOLERANCE
    # ...and only in the gradients: the forward of the wrong gather is right.
    q, k, kwargs = global_inputs(mode)
    want = loss_and_grads(q, k, kwargs, "torch")[0]
    assert normwise(torch.stack([r["wrong"]["torch", mode][0] for r in ranks]).mean(), want) <= TOLERANCE


def test_gather_rows_with_grad(ranks):
    xs = [(rank + 1) * torch.arange(6.0).view(3, 2) for rank in range(WORLD)]
    weights = [torch.randn(6, 2, generator=torch.Generator().manual_seed(100 + rank)) for rank in range(WORLD)]
    for rank, result in enumerate(ranks):
        gathered, grad = result["gather"]
        torch.testing.assert_close(gathered, torch.cat(xs), rtol=0, atol=0)
        # Every rank's loss uses every rank's rows: the gradient is the sum over ranks, sliced to this rank.
        torch.testing.assert_close(grad, sum(weights)[3 * rank:3 * rank + 3])


def test_unequal_rows_are_refused(ranks):
    for result in ranks:
        assert "gather_rows_with_grad: every rank must hold the same number of rows, got [3, 2]" in result["unequal"]


def test_cached_backward_on_two_ranks_equals_one_process(ranks):
    model = cached_model()
    views, labels = cached_inputs()
    loss = supcon_fn(labels, False)(model(views[0]), model(views[1]))
    loss.backward()
    want = [p.grad for p in model.parameters()]
    torch.testing.assert_close(torch.stack([r["cached"][0] for r in ranks]).mean(), loss.detach())
    for rank, result in enumerate(ranks):
        for got, expected in zip(result["cached"][1], want):
            assert normwise(got, expected) <= TOLERANCE, rank


def test_supcon_without_labels_on_two_ranks(ranks):
    """labels=None: rank r's images get classes r*B/2 ... (no two ranks share one), as one process numbers them."""
    features = unlabelled_features().requires_grad_()
    loss = unlabelled_loss(False)(features)
    (want,) = torch.autograd.grad(loss, features)
    assert normwise(torch.stack([r["unlabelled"][0] for r in ranks]).mean(), loss.detach()) <= TOLERANCE
    assert normwise(torch.cat([r["unlabelled"][1] for r in ranks]), want) <= TOLERANCE
