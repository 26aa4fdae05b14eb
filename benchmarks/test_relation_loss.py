"""relation_loss forward+backward: fused CPU backend vs dense [B, 9, N, N] logits + F.cross_entropy, side by side.

Shapes from RelViT with ViT-S (D = 384, d_h = 384 // 9 = 42): 32-px images with patch 4 (N = 64, 8x8 grid) and
224-px-style 14x14 grids (N = 196), B = 64. q and k come from one bias-free Linear(D, 9 * d_h) each, computed once:
the benchmark times the op on (q, k) leaves, gradients for both.
    pytest benchmarks/test_relation_loss.py        (or: python benchmarks/report.py benchmarks/test_relation_loss.py)

Also timed in the same run: a large fp32 torch.mm, the machine's GEMM throughput to compare the op's GFLOP/s with
(extra_info "gflops": useful FLOPs 6 * B * C * N^2 * d_h per step / median; the fused backend executes 8 of those
"6" because its backward recomputes the logits), and a "memory floor": a step whose backward only allocates the two
gradients. The profiler's peak counts every tensor a step touches, q, k, q.grad and k.grad included, so no
implementation can go below that floor.
"""
import pytest
import torch

from _measure import fwd_bwd, peak_memory_bytes
from vitfast.ops import relation_loss, relation_loss_reference

BATCH, DIM, CLASSES = 64, 384, 9
HEAD_DIM = DIM // CLASSES  # 42
SHAPES = {"N64 (8x8, 32px p4)": 64, "N196 (14x14)": 196}


def make_inputs(num_tokens):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(BATCH, num_tokens, DIM, generator=gen)
    q_proj = torch.nn.Linear(DIM, CLASSES * HEAD_DIM, bias=False)
    k_proj = torch.nn.Linear(DIM, CLASSES * HEAD_DIM, bias=False)
    with torch.no_grad():
        q = q_proj(tokens).view(BATCH, num_tokens, CLASSES, HEAD_DIM)
        k = k_proj(tokens).view(BATCH, num_tokens, CLASSES, HEAD_DIM)
    return q.requires_grad_(), k.requires_grad_()


class _FloorFunction(torch.autograd.Function):
    """A zero loss whose backward allocates exactly the two gradients: the memory floor of any implementation."""

    @staticmethod
    def forward(ctx, q, k):
        ctx.shapes = (q.shape, k.shape)
        return q.new_zeros(()) + k.new_zeros(())  # both inputs seen by the profiler, as in every implementation

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(ctx.shapes[0]), grad.new_zeros(ctx.shapes[1])


def _floor(q, k):
    return _FloorFunction.apply(q, k)


IMPLEMENTATIONS = {
    "vitfast-cpu": lambda q, k: relation_loss(q, k, backend="cpu"),
    "dense logits + F.cross_entropy (eager)": relation_loss_reference,
    "torch.compile(dense logits + F.cross_entropy)": torch.compile(relation_loss_reference),
}


def _flops(num_tokens):
    return 6 * BATCH * CLASSES * num_tokens * num_tokens * HEAD_DIM  # fwd 2*..., bwd 4*... (useful math)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_relation_loss_fwd_bwd(benchmark, impl, shape):
    num_tokens = SHAPES[shape]
    step = fwd_bwd(IMPLEMENTATIONS[impl], *make_inputs(num_tokens))
    step()  # warm-up (and compile)
    benchmark.group = f"relation_loss fwd+bwd B{BATCH} {shape} C{CLASSES} d_h{HEAD_DIM} fp32"
    benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(step)
    benchmark.pedantic(step, rounds=20 if num_tokens <= 64 else 8, iterations=1, warmup_rounds=1)
    benchmark.extra_info["gflops"] = _flops(num_tokens) / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("shape", list(SHAPES))
def test_memory_floor(benchmark, shape):
    """Inputs + gradients only: what the profiler counts for any implementation of this step."""
    step = fwd_bwd(_floor, *make_inputs(SHAPES[shape]))
    step()
    benchmark.group = "memory floor: a step that only allocates the gradients (time meaningless)"
    benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(step)
    benchmark.pedantic(step, rounds=3, iterations=1)


def test_fp32_gemm_throughput(benchmark):
    """This machine's fp32 GEMM rate (torch.mm 2048^3, all threads), measured in the same run as the op."""
    size = 2048
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    benchmark.group = f"fp32 GEMM torch.mm {size}^3 ({2 * size ** 3 / 1e9:.1f} GFLOP): machine throughput"
    benchmark.pedantic(torch.mm, args=(a, b), rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info["gflops"] = 2 * size ** 3 / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["peak_memory_bytes"] = 0
