"""NNCLRLoss (MAE-CT's loss, vitfast/nn/nnclr.py) across 2 CPU processes (gloo) against 1 process holding the whole
batch: the same loss (mean over ranks), the same gradients of the predictions and of the projector / predictor
parameters (each rank backward loss / world, then the mean over ranks as DDP does) and the same queue contents
afterwards, over four steps: an empty queue (the lookup searches the gathered batch), partly filled ones, then a full
one (queue only) after the pushes wrapped around. k = 1 (the head stage) is compared exactly; k = 3 with each rank
drawing from its own generator is compared with the one-process loss given the same per-row draws (replayed in rank
order).

The heads here have no BatchNorm: MAE-CT's BatchNorms are per process under DDP (no SyncBatchNorm), which no
gathered loss can make equal to one process (docs/methods.md §6.3). One spawn of 2 processes serves the module
and the other distributed test modules (tests/_ranks.py: ~8 s on 2 cores for all three, mostly starting torch);
collectives time out after 120 s, the processes are killed after 300 s per module.
"""
import os
import traceback
from datetime import timedelta

import pytest
import torch
from _ranks import normwise, share, spawn_ranks  # tests/_ranks.py: the spawn harness

WORLD, BATCH, FEATURES, DIM, QUEUE, STEPS = 2, 8, 6, 4, 20, 4  # BATCH images per step in all, BATCH / WORLD per rank
TOLERANCE = 1e-5  # normwise, fp32: the sums run in other orders on 2 ranks than on 1


def heads():
    torch.manual_seed(0)
    projector = torch.nn.Sequential(torch.nn.Linear(FEATURES, 7), torch.nn.ReLU(), torch.nn.Linear(7, DIM))
    predictor = torch.nn.Sequential(torch.nn.Linear(DIM, 5), torch.nn.ReLU(), torch.nn.Linear(5, DIM))
    key_projector = torch.nn.Linear(FEATURES, DIM)  # stands for the EMA projector: no gradient
    return projector, predictor, key_projector


def step_inputs(step):
    """Two views of pooled features [BATCH, FEATURES] and the dataset ids of the global batch of one step."""
    g = torch.Generator().manual_seed(100 + step)
    h0 = torch.randn(BATCH, FEATURES, generator=g)
    ids = torch.randperm(12, generator=g)[:BATCH]  # 12 images: ids recur across steps, own entries get queued
    return h0, h0 + 0.3 * torch.randn(BATCH, FEATURES, generator=g), ids


def rows(t, rank, world):
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def run_steps(rank, world, k, draws=None):
    """STEPS steps of NNCLRLoss on this process's rows: per step (loss, gradients / world, the drawn ranks), and the
    queue at the end. ``draws``: replay these per-row ranks (one process) instead of drawing from a generator."""
    from vitfast.nn import NNCLRLoss

    projector, predictor, key_projector = heads()
    criterion = NNCLRLoss(dim=DIM, queue_size=QUEUE, temperature=0.2, topk=k)
    generator = torch.Generator().manual_seed(7 + rank)
    seen, results = [], []
    original = torch.randint

    def recording_randint(high, size, *, generator=None, device=None):
        drawn = original(high, size, generator=generator, device=device) if draws is None else draws.pop(0)
        seen.append(drawn)
        return drawn

    torch.randint = recording_randint  # the only draw of the run: nn_topk's (k > 1); restored below
    try:
        for step in range(STEPS):
            h0, h1, ids = (rows(t, rank, world) for t in step_inputs(step))
            params = [*projector.parameters(), *predictor.parameters()]
            predictions = [predictor(projector(h)) for h in (h0, h1)]
            with torch.no_grad():
                keys = [key_projector(h) for h in (h0, h1)]
            loss = criterion(predictions, keys, ids, generator)
            grads = torch.autograd.grad(loss / world, params + predictions)
            results.append([loss.detach(), *grads])
    finally:
        torch.randint = original
    return results, [t.clone() for t in criterion.queue.contents()], seen


def _worker(rank, port, out_dir):
    try:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=120))
        out = {}
        for k in (1, 3):
            results, queue, seen = run_steps(rank, WORLD, k)
            for step in results:  # DDP: parameter gradients averaged over ranks (here: summed of loss / world)
                for grad in step[1:9]:
                    dist.all_reduce(grad)
            out[k] = (results, queue, seen)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (reported by the parent)
        out = {"error": traceback.format_exc()}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


share(_worker, WORLD)  # one spawn runs the workers of every distributed test module


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of both ranks (one spawn, shared by the distributed test modules)."""
    return spawn_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("nnclr_ranks")))


@pytest.mark.parametrize("k", [1, 3])
def test_two_ranks_equal_one_process(ranks, k):
    draws = None
    if k > 1:  # each rank drew per lookup for its own rows: the one process draws the same rows in rank order
        per_rank = [r[k][2] for r in ranks]
        draws = [torch.cat([seen[i] for seen in per_rank]) for i in range(len(per_rank[0]))]
        assert len(draws) == 2 * STEPS
    want, want_queue, _ = run_steps(0, 1, k, draws)
    for step in range(STEPS):
        loss = torch.stack([r[k][0][step][0] for r in ranks]).mean()
        assert normwise(loss, want[step][0]) <= TOLERANCE, step
        for i in range(1, 9):  # parameter gradients: identical on every rank after the all-reduce
            for r in ranks:
                assert normwise(r[k][0][step][i], want[step][i]) <= TOLERANCE, (step, i)
        for i in (9, 10):  # prediction gradients: this rank's rows
            got = torch.cat([r[k][0][step][i] for r in ranks])
            assert normwise(got, want[step][i]) <= TOLERANCE, (step, i)
    for r in ranks:  # the queue holds every rank's view-0 keys, in rank order, the same everywhere
        torch.testing.assert_close(r[k][1][0], want_queue[0], rtol=1e-6, atol=1e-7)
        assert torch.equal(r[k][1][1], want_queue[1])
    assert want_queue[0].shape[0] == QUEUE  # 4 steps of 8 wrapped around a queue of 20


def test_a_per_rank_queue_would_fail_the_comparison(ranks):
    """Sanity: one process holding only rank 0's rows (its own queue, its own batch as pool) is another loss."""
    want, _, _ = run_steps(0, 1, 1)
    alone, _, _ = run_steps(0, WORLD, 1)  # no process group here: rank 0's half on its own
    assert normwise(alone[1][0], want[1][0]) > 100 * TOLERANCE
