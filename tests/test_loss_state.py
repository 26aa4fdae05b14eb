"""vitfast.nn.loss_state: DINO's momentum centre and the FIFO feature queue, on one process and on two (gloo)."""
import collections

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitfast.nn import FeatureQueue, MomentumCentre


def test_centre_is_the_momentum_average_of_batch_means():
    centre = MomentumCentre(3, momentum=0.9)
    assert torch.equal(centre.centre, torch.zeros(1, 3))
    expected = torch.zeros(1, 3)
    for step in range(3):
        batch = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        centre.update(batch.mean(0), count=5)
        expected = 0.9 * expected + 0.1 * batch.mean(0, keepdim=True)
        torch.testing.assert_close(centre.centre, expected)
    assert "centre" in centre.state_dict()
    with pytest.raises(ValueError, match="batch_mean must have 3 values, got shape \\(4,\\)"):
        centre.update(torch.zeros(4))


def test_queue_is_fifo_with_ids_and_wraps_around():
    """Against a deque: any push sizes (smaller, equal to and larger than the queue) keep the newest rows."""
    queue = FeatureQueue(size=7, dim=2)
    reference = collections.deque(maxlen=7)
    assert len(queue) == 0 and queue.contents()[0].shape == (0, 2)
    next_id = 0
    for batch in (3, 2, 4, 7, 1, 9, 2):
        ids = torch.arange(next_id, next_id + batch)
        next_id += batch
        features = torch.stack([ids.float(), -ids.float()], 1)
        queue.push(features, ids)
        reference.extend(ids.tolist())
        features, held = queue.contents()
        assert len(queue) == len(reference)
        assert sorted(held.tolist()) == sorted(reference)
        torch.testing.assert_close(features[:, 0], held.float())  # each row kept its id
    restored = FeatureQueue(size=7, dim=2)
    restored.load_state_dict(queue.state_dict())
    restored.push(torch.zeros(1, 2), torch.tensor([99]))
    queue.push(torch.zeros(1, 2), torch.tensor([99]))
    assert torch.equal(restored.ids, queue.ids)  # the pointer travels with the state


def test_queue_rejects_bad_rows():
    queue = FeatureQueue(size=4, dim=3)
    with pytest.raises(ValueError, match="features must be \\[B, 3\\], got \\(2, 4\\)"):
        queue.push(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids must be int64 \\[2\\], got torch.int32"):
        queue.push(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32))


def _two_ranks(rank, path, result):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    torch.manual_seed(0)
    teacher = torch.randn(6, 4)
    rows, ids = torch.randn(6, 3), torch.arange(6)
    mine = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal per-rank batches for the centre
    centre = MomentumCentre(4, momentum=0.5)
    centre.update(teacher[mine].mean(0), count=len(teacher[mine]))
    queue = FeatureQueue(size=5, dim=3)
    half = slice(0, 3) if rank == 0 else slice(3, 6)  # equal per-rank batches for the queue (all_gather)
    queue.push(rows[half], ids[half])
    result[rank] = (centre.centre.clone(), queue.features.clone(), queue.ids.clone())
    dist.destroy_process_group()


def test_two_ranks_hold_the_state_of_one_process_with_the_whole_batch(tmp_path):
    """Two forked CPU processes (fork: the children reuse the imported modules; spawn costs ~1 min here)."""
    context = mp.get_context("fork")
    result = context.Manager().dict()
    workers = [context.Process(target=_two_ranks, args=(rank, str(tmp_path / "store"), result)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    torch.manual_seed(0)
    teacher = torch.randn(6, 4)
    rows, ids = torch.randn(6, 3), torch.arange(6)
    centre = MomentumCentre(4, momentum=0.5)
    centre.update(teacher.mean(0), count=6)
    queue = FeatureQueue(size=5, dim=3)
    queue.push(rows, ids)
    for rank in (0, 1):
        got_centre, got_features, got_ids = result[rank]
        torch.testing.assert_close(got_centre, centre.centre)
        assert torch.equal(got_ids, queue.ids) and torch.equal(got_features, queue.features)
