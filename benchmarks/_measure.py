"""Peak memory of a callable on the CPU, from the torch profiler's memory timeline.

tracemalloc cannot see torch's allocations; the profiler records every allocation and free of
the CPU allocator, and the timeline's maximum total is the peak of live tensor bytes.
"""
import json
import os
import tempfile
import warnings

import torch
from torch.profiler import ProfilerActivity, profile


def peak_memory_bytes(fn) -> int:
    """Peak bytes of tensors allocated while ``fn()`` runs (live inputs excluded)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = os.path.join(folder, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.load(open(path))
    return max((sum(s) for s in sizes), default=0)


def fwd_bwd(fn, *inputs):
    """Forward and backward of ``fn(*inputs)`` as one step (a random-projection loss, no grad zeroing)."""

    def step():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    return step
