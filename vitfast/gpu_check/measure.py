"""Steps, timings and peak memory, the same way on CPU and GPU (used by gpu_check and benchmarks/run.py).

A *step* is one forward + backward of a function of an input dict: the gradients of the leaves are set to
None first, so every step allocates its gradients afresh (as a training step after zero_grad(set_to_none)).

Time: CUDA events around each step on a GPU (one synchronize per step), ``time.perf_counter`` on the CPU.
Peak memory: ``torch.cuda.max_memory_allocated`` above what was allocated before the step on a GPU; on the
CPU the same quantity from the torch profiler's allocation records (tracemalloc cannot see torch's allocator). The *floor* of a step
is what any implementation must hold: its inputs and their gradients. ``floor_step`` is a step that
allocates exactly the gradients, measured with the same instrument, so peak above floor is a fair
comparison between implementations.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Iterable, List

import torch
from torch import Tensor


def run_step(fn: Callable, x: dict, grads: Iterable[str], upstream: Callable):
    """One forward + backward: (output, {name: grad}, the upstream gradient used)."""
    leaves = {name: x[name].detach().requires_grad_() for name in grads}
    out = fn({**x, **leaves})
    grad_out = upstream(out)
    if leaves:  # an op without a gradient (nn_topk) runs its forward only
        out.backward(grad_out)
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}, grad_out


def make_step(fn: Callable, x: dict, grads: Iterable[str], upstream: Callable) -> Callable[[], None]:
    """A step of ``fn`` on fixed leaves whose gradients are reset to None before each run."""
    leaves = {name: x[name].detach().requires_grad_() for name in grads}
    inputs = {**x, **leaves}
    grad_out = upstream(fn(inputs)).detach()  # also a warm-up call

    def step():
        for leaf in leaves.values():
            leaf.grad = None
        out = fn(inputs)
        if leaves:  # an op without a gradient: forward only
            out.backward(grad_out)

    return step


class _Floor(torch.autograd.Function):
    """A zero output whose backward allocates exactly one gradient per input: the floor of any step."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.shapes = [(t.shape, t.dtype) for t in inputs]
        return inputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.zeros(shape, dtype=dtype, device=grad.device) for shape, dtype in ctx.shapes)


def floor_step(x: dict, grads: Iterable[str]) -> Callable[[], None]:
    """The step that holds only the inputs and allocates only their gradients."""
    names = list(grads)
    if not names:  # an op without a gradient: the inputs only, nothing allocated
        return lambda: None
    return make_step(lambda inputs: _Floor.apply(*(inputs[n] for n in names)), x, names, torch.ones_like)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(step: Callable[[], None], device: torch.device, rounds: int, warmup: int = 1) -> List[float]:
    """Milliseconds per step, one sample per round (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        step()
    _sync(device)
    samples = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            step()
            samples.append((time.perf_counter() - begin) * 1e3)
    return samples


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated while one step runs (GPU: above the allocation before it; CPU: profiler timeline)."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler import _memory_profiler  # what export_memory_timeline reads; gives every allocation
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    # Live bytes of the blocks allocated inside the step. Frees of blocks from before it (the previous step's
    # gradients) are left out: the profiler sees some and not others. So the floor step counts its gradients,
    # and peak above floor is what the step adds beyond its inputs and gradients, as on the GPU.
    live = peak = 0
    created = set()
    for _, action, key, size in _memory_profiler.MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == _memory_profiler.Action.CREATE:
            created.add(key)
            live += size
        elif action == _memory_profiler.Action.DESTROY and key in created:
            live -= size
        peak = max(peak, live)
    return peak


def summary(samples: List[float]) -> Dict[str, float]:
    return {"min_ms": min(samples), "median_ms": statistics.median(samples), "rounds": len(samples)}


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
