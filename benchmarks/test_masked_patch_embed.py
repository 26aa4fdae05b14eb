"""masked_patch_embed forward+backward: fused CPU backend vs embed-all-then-gather, side by side.

Shape from the issue: B = 256, 3x32x32 images, patch 4 (N = 64), D = 192, mask ratio 0.75 (K = 16).
Gradients for weight, bias and pos_embed (the images of a training step need none).
    pytest benchmarks/test_masked_patch_embed.py        (or: python benchmarks/report.py)
"""
import pytest
import torch

from _measure import fwd_bwd, peak_memory_bytes
from vitfast.ops import masked_patch_embed, masked_patch_embed_reference, random_masking

BATCH, CHANNELS, SIZE, PATCH, DIM, MASK_RATIO = 256, 3, 32, 4, 192, 0.75


def make_inputs():
    gen = torch.Generator().manual_seed(0)
    num_patches = (SIZE // PATCH) ** 2
    images = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    weight = torch.randn(DIM, CHANNELS, PATCH, PATCH, generator=gen).mul_(0.05).requires_grad_()
    bias = torch.zeros(DIM).requires_grad_()
    pos_embed = torch.randn(num_patches, DIM, generator=gen).requires_grad_()
    keep_idx, _, _ = random_masking(BATCH, num_patches, MASK_RATIO, generator=gen)
    return images, weight, bias, pos_embed, keep_idx


IMPLEMENTATIONS = {
    "vitfast-cpu": lambda *a: masked_patch_embed(*a, backend="cpu"),
    "embed-all-then-gather": masked_patch_embed_reference,
    "torch.compile(embed-all-then-gather)": torch.compile(masked_patch_embed_reference),
}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_masked_patch_embed_fwd_bwd(benchmark, impl):
    step = fwd_bwd(IMPLEMENTATIONS[impl], *make_inputs())
    step()  # warm-up (and compile)
    benchmark.group = "masked_patch_embed fwd+bwd B256 32px p4 D192 r0.75"
    benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(step)
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=2)
