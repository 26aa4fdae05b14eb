"""DINOLoss across 2 CPU processes (gloo): 2 ranks x B/2 give the loss (mean over ranks), the gradients of the student
features (rows in rank order) and of the prototypes (summed over ranks of d(loss / world), as DDP averages), and the
centre after the update of 1 process x B, over two steps (the second step's loss uses the all-reduced centre), for
the torch and the C++ CPU backends (when built); a centre update without the all-reduce fails that comparison.

One spawn of 2 processes serves the module, shared with the other distributed test modules (tests/_ranks.py: ~8 s on
2 cores for all three, most of it starting the processes and importing torch); collectives time out after 120 s and
the processes are killed after 300 s per module, so a hang fails.
"""
import os
import traceback
from datetime import timedelta

import pytest
import torch
from _ranks import normwise, share, spawn_ranks  # tests/_ranks.py: the spawn harness

WORLD, BATCH, DIM, K = 2, 6, 5, 9  # BATCH images in all, BATCH / WORLD per rank
N_STUDENT, N_TEACHER = 4, 2
EPOCHS = (0, 3)  # two steps: the teacher temperature warms up between them
TOLERANCE = 1e-5  # normwise, fp32


def backends_here():
    from vitfast.ops.dino_loss import BACKENDS
    return [b for b in ("torch", "cpu") if BACKENDS.runs_on(b, torch.device("cpu"), torch.float32)]


def global_inputs(step):
    """The whole batch of one step (the same in every process): student [Vs·B, d], teacher [Vt·B, d] (unit rows),
    prototypes and teacher prototypes [K, d]."""
    gen = torch.Generator().manual_seed(step)
    unit = lambda rows: torch.nn.functional.normalize(torch.randn(rows, DIM, generator=gen), dim=1)
    return (unit(N_STUDENT * BATCH), unit(N_TEACHER * BATCH), torch.randn(K, DIM, generator=gen),
            torch.randn(K, DIM, generator=gen))


def local_part(rows, views, rank):
    """This rank's images of every view: views stay grouped (view 0's rows, then view 1's, ...)."""
    per = BATCH // WORLD
    return rows.view(views, BATCH, -1)[:, rank * per:(rank + 1) * per].reshape(-1, rows.shape[1])


def run_steps(backend, world=1, rank=0):
    """Two training steps of one DINOLoss: per step (loss, d(loss / world)/d student rows, d(loss / world)/d
    prototypes, centre after the step)."""
    from vitfast.nn import DINOLoss
    criterion = DINOLoss(K, N_STUDENT, N_TEACHER, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
                         warmup_teacher_temp_epochs=5, centre_momentum=0.9, backend=backend)
    results = []
    for step, epoch in enumerate(EPOCHS):
        student, teacher, prototypes, teacher_prototypes = global_inputs(step)
        if world > 1:
            student, teacher = local_part(student, N_STUDENT, rank), local_part(teacher, N_TEACHER, rank)
        student, prototypes = student.requires_grad_(), prototypes.requires_grad_()
        loss = criterion(student, teacher, prototypes, teacher_prototypes, epoch)
        grads = torch.autograd.grad(loss / world, (student, prototypes))
        results.append((loss.detach(), *grads, criterion.centre.centre.clone()))
    return results


def _worker(rank, port, out_dir):
    try:
        import torch.distributed as dist

        import vitfast.nn.loss_state as loss_state

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=120))
        results = {"right": {}}
        for backend in backends_here():  # one failing backend (e.g. a stale build) fails only its own test
            try:
                results["right"][backend] = run_steps(backend, WORLD, rank)
            except Exception:  # noqa: BLE001 (reported by that backend's test)
                results["right"][backend] = traceback.format_exc()
        right = loss_state.world_size
        loss_state.world_size = lambda: 1  # the wrong centre: each rank's own mean, no all-reduce
        try:
            results["wrong"] = run_steps("torch", WORLD, rank)
        finally:
            loss_state.world_size = right
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (reported by the parent)
        results = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


share(_worker, WORLD)  # one spawn runs the workers of every distributed test module


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of both ranks (one spawn, shared by the distributed test modules)."""
    return spawn_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("dino_ranks")))


def errors(per_rank, backend):
    """Per step, the normwise errors of (loss, student gradient, prototype gradient, centre) of the 2 ranks against
    one process holding the whole batch."""
    want = run_steps(backend)
    out = []
    for step, (loss, d_student, d_prototypes, centre) in enumerate(want):
        got = [r[step] for r in per_rank]
        student_rows = torch.stack([g[1].view(N_STUDENT, BATCH // WORLD, DIM) for g in got], 1).reshape(-1, DIM)
        out.append([normwise(torch.stack([g[0] for g in got]).mean(), loss), normwise(student_rows, d_student),
                    normwise(sum(g[2] for g in got), d_prototypes)]
                   + [normwise(g[3], centre) for g in got])  # every rank holds the global centre
    return out


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_two_ranks_equal_one_process(ranks, backend):
    if backend not in backends_here():
        pytest.skip(f"backend {backend} does not run on the CPU here")
    per_rank = [r["right"][backend] for r in ranks]
    for rank, result in enumerate(per_rank):
        assert not isinstance(result, str), f"rank {rank}, backend {backend} failed:\n{result}"
    for step, step_errors in enumerate(errors(per_rank, backend)):
        assert max(step_errors) <= TOLERANCE, (step, step_errors)


def test_centre_without_all_reduce_fails_the_comparison(ranks):
    """Each rank's own mean as the centre: the first loss and gradients still agree, the centre does not, and so the
    second step's loss and gradients do not either (the comparison above can fail)."""
    first, second = errors([r["wrong"] for r in ranks], "torch")
    assert max(first[:3]) <= TOLERANCE and min(first[3:]) > 100 * TOLERANCE
    assert max(second[:3]) > 100 * TOLERANCE
