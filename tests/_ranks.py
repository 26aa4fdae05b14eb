"""Run a test module's worker on several CPU processes (gloo) and collect what each rank saved: the harness of the
distributed tests (test_contrastive_distributed, test_dino_distributed, test_nnclr_distributed).

A worker is ``worker(rank, port, out_dir)`` defined at module level (spawned processes import it by name); it
saves its results with ``torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))``, or ``{"error":
traceback}`` when it failed, which fails the test with that traceback. Each worker starts and ends its own process
group (its own port).

Starting the processes (Python + torch in each) costs more than any worker's work, so the workers of every module
that calls ``share(worker, world)`` at import (pytest imports every collected module before the first test runs)
share one spawn: the first ``spawn_ranks`` of a session runs them one after the other in the same processes, the
later calls read what their worker saved.
"""
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp

_SHARED = {}  # world -> the workers that share its spawn, in the order they were declared
_DONE = {}  # worker -> the folder its ranks saved their results in


def share(worker, world: int) -> None:
    """Declare (at import) that ``worker`` runs on ``world`` processes: it shares one spawn with the others."""
    workers = _SHARED.setdefault(world, [])
    if worker not in workers:
        workers.append(worker)


def free_ports(count: int) -> list:
    """``count`` distinct free local ports (each socket is held until all are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _run_workers(rank, jobs):
    """One rank's process: every (worker, port, out_dir) in turn."""
    for worker, port, out_dir in jobs:
        worker(rank, port, out_dir)


def spawn_ranks(worker, world: int, out_dir: str, timeout: float = 300.0) -> list:
    """Each rank's saved results of ``worker``, in rank order. Unless an earlier call already ran it, one spawn of
    ``world`` processes runs it and every other worker shared for ``world`` that has not run yet (their results go
    to sub-folders of ``out_dir``); the processes are killed after ``timeout`` seconds per worker, so a hang fails."""
    if worker not in _DONE:
        share(worker, world)
        todo = [w for w in _SHARED[world] if w not in _DONE]
        folders = [out_dir if w is worker else tempfile.mkdtemp(prefix=f"{w.__module__}-", dir=out_dir) for w in todo]
        jobs = list(zip(todo, free_ports(len(todo)), folders))
        context = mp.get_context("spawn")
        processes = [context.Process(target=_run_workers, args=(rank, jobs)) for rank in range(world)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=timeout * len(jobs))
        hung = [p for p in processes if p.is_alive()]
        for process in hung:
            process.kill()
        assert not hung, f"a rank did not finish in {timeout * len(jobs):g} s ({len(jobs)} workers)"
        _DONE.update({w: folder for w, _, folder in jobs})
    results = [torch.load(os.path.join(_DONE[worker], f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
    return results


def normwise(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
