"""relation_mlp_loss forward+backward (MLP pair head, direction CE): fused CPU vs the dense [B, N, N, H] formula.

RelViT-CIFAR shape with a ViT-S width: B = 64, N = 64 (8x8 grid), hidden H = 384 (the default hidden = D),
GELU, 9 classes; u = A z and v = B z + b are the leaves (the Linear layers run once, outside the timing).
    python benchmarks/report.py $PWD/benchmarks/test_relation_mlp_loss.py
"""
import pytest
import torch

from _measure import fwd_bwd, peak_memory_bytes
from vitfast.ops import relation_mlp_loss, relation_mlp_loss_reference

BATCH, TOKENS, HIDDEN, CLASSES, GRID = 64, 64, 384, 9, 8


def make_inputs():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(BATCH, TOKENS, HIDDEN, generator=gen).requires_grad_()
    v = torch.randn(BATCH, TOKENS, HIDDEN, generator=gen).requires_grad_()
    weight = (torch.randn(CLASSES, HIDDEN, generator=gen) / HIDDEN ** 0.5).requires_grad_()
    bias = torch.zeros(CLASSES).requires_grad_()
    return u, v, weight, bias


IMPLEMENTATIONS = {
    "vitfast-cpu": lambda *a: relation_mlp_loss(*a, grid_size=GRID, backend="cpu"),
    "dense [B,N,N,H] (eager)": lambda *a: relation_mlp_loss_reference(*a, grid_size=GRID),
    "torch.compile(dense)": torch.compile(lambda *a: relation_mlp_loss_reference(*a, grid_size=GRID)),
}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_relation_mlp_loss_fwd_bwd(benchmark, impl):
    step = fwd_bwd(IMPLEMENTATIONS[impl], *make_inputs())
    step()  # warm-up (and compile)
    benchmark.group = f"relation_mlp_loss fwd+bwd B{BATCH} N{TOKENS} H{HIDDEN} gelu direction fp32"
    benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(step)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
