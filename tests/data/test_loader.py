"""vitfast.data.BatchLoader: determinism, exact mid-epoch resume, rank shards, drop_last, len."""
import pytest
import torch

from vitfast.data import BatchLoader, ImageDataset, epoch_permutation


def make_dataset(n=103):
    # Image i is filled with i % 256 and has label i % 10, so every batch can be checked against its ids.
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ImageDataset("toy", images, torch.arange(n) % 10, 10, [str(i) for i in range(10)], (0.5,), (0.25,))


def ids_of(loader):
    return [ids.tolist() for _, _, ids in loader]


def test_batches_match_their_ids_and_types():
    data = make_dataset()
    for images, labels, ids in BatchLoader(data, 16, seed=3):
        assert images.dtype == torch.uint8 and images.shape == (16, 1, 4, 4)
        assert labels.dtype == torch.int64 and ids.dtype == torch.int64
        assert torch.equal(images, data.images[ids]) and torch.equal(labels, data.labels[ids])


def test_determinism_and_epochs_differ():
    data = make_dataset()
    a, b = BatchLoader(data, 16, seed=3), BatchLoader(data, 16, seed=3)
    first = ids_of(a)
    assert first == ids_of(b)
    assert a.state_dict() == {"epoch": 1, "batch": 0}  # an exhausted epoch moves to the next one
    assert ids_of(a) != first                           # epoch 1 has its own order
    assert ids_of(BatchLoader(data, 16, seed=4)) != first
    assert torch.equal(epoch_permutation(103, 3, 0), epoch_permutation(103, 3, 0))
    assert sorted(sum(first, [])) == sorted(set(sum(first, [])))  # no repeats within an epoch


def test_set_epoch_is_reproducible():
    data = make_dataset()
    loader = BatchLoader(data, 16, seed=1)
    loader.set_epoch(5)
    fifth = ids_of(loader)
    other = BatchLoader(data, 16, seed=1)
    for epoch in range(6):
        other.set_epoch(epoch)
        got = ids_of(other)
    assert got == fifth


def test_resume_mid_epoch_gives_the_uninterrupted_batches():
    data = make_dataset()
    uninterrupted = []
    reference = BatchLoader(data, 8, seed=7)
    for epoch in range(3):
        reference.set_epoch(epoch)
        uninterrupted += ids_of(reference)

    seen, loader = [], BatchLoader(data, 8, seed=7)
    loader.set_epoch(0)
    seen += ids_of(loader)
    loader.set_epoch(1)
    for step, (_, _, ids) in enumerate(loader):
        seen.append(ids.tolist())
        if step == 4:
            state = loader.state_dict()
            break
    assert state == {"epoch": 1, "batch": 5}

    resumed = BatchLoader(data, 8, seed=7)  # a fresh process restoring the checkpoint
    resumed.load_state_dict(state)
    for epoch in range(resumed.epoch, 3):
        resumed.set_epoch(epoch)  # keeps the restored mid-epoch position
        seen += ids_of(resumed)
    assert seen == uninterrupted


def test_two_ranks_partition_the_global_batch():
    data = make_dataset(100)
    single = ids_of(BatchLoader(data, 20, seed=2))
    ranks = [ids_of(BatchLoader(data, 10, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 5
    for k in range(5):
        assert ranks[0][k] + ranks[1][k] == single[k]
        assert not set(ranks[0][k]) & set(ranks[1][k])


def test_drop_last_and_len():
    data = make_dataset(103)
    full = BatchLoader(data, 16, drop_last=True)
    assert len(full) == 6 and [len(i) for i in ids_of(full)] == [16] * 6
    partial = BatchLoader(data, 16, drop_last=False, shuffle=False)
    sizes = [len(i) for i in ids_of(partial)]
    assert len(partial) == 7 and sizes == [16] * 6 + [7]
    partial.set_epoch(0)
    assert sum(ids_of(partial), []) == list(range(103))  # shuffle=False: dataset order, every image once
    sharded = [BatchLoader(data, 8, drop_last=False, shuffle=False, rank=r, world_size=2) for r in range(2)]
    last = [ids_of(s)[-1] for s in sharded]
    assert len(sharded[0]) == len(sharded[1]) == 7 and last[0] + last[1] == list(range(96, 103))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchLoader(make_dataset(10), 8, world_size=2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(make_dataset(), 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="outside"):
        BatchLoader(make_dataset(), 8).load_state_dict({"epoch": 0, "batch": 99})


def test_host_side_gathering_gives_the_same_batches():
    data = make_dataset()
    assert ids_of(BatchLoader(data, 16, seed=5, preload=False)) == ids_of(BatchLoader(data, 16, seed=5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_same_order_as_cpu():
    data = make_dataset()
    gpu = BatchLoader(data, 16, seed=5, device="cuda")
    for (images, labels, ids), (_, _, cpu_ids) in zip(gpu, BatchLoader(data, 16, seed=5)):
        assert images.is_cuda and ids.is_cuda and torch.equal(ids.cpu(), cpu_ids)
        assert torch.equal(images.cpu(), data.images[cpu_ids])
