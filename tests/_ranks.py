"""Run a test module's worker on several CPU processes (gloo) and collect what each rank saved: the harness of the
distributed tests (test_contrastive_distributed, test_dino_distributed, test_nnclr_distributed).

A worker is ``worker(rank, port, out_dir)`` defined at module level (spawned processes import it by name); it
saves its results with ``torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))``, or ``{"error":
traceback}`` when it failed, which fails the test with that traceback.
"""
import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(worker, world: int, out_dir: str, timeout: float = 300.0) -> list:
    """Each rank's saved results, in rank order (one spawn of ``world`` processes)."""
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, port, out_dir)) for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout)
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, f"a rank did not finish in {timeout:g} s"
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
    return results


def normwise(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
