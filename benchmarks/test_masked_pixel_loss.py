"""masked_pixel_loss forward+backward: fused CPU backend vs MAE's forward_loss (the reference), side by side.

Shape from the issue: B = 256, 3x32x32 images, patch 4 (N = 64, p*p*C = 48), mask ratio 0.75, norm_pix.
Gradient for pred only (the images are data).
    pytest benchmarks/test_masked_pixel_loss.py
    python benchmarks/report.py $PWD/benchmarks/test_masked_pixel_loss.py   (report.py runs pytest inside benchmarks/)
"""
import pytest
import torch

from _measure import fwd_bwd, peak_memory_bytes
from vitfast.ops import masked_pixel_loss, masked_pixel_loss_reference, random_masking

BATCH, CHANNELS, SIZE, PATCH, MASK_RATIO = 256, 3, 32, 4, 0.75


def make_inputs():
    gen = torch.Generator().manual_seed(0)
    num_patches = (SIZE // PATCH) ** 2
    images = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    pred = torch.randn(BATCH, num_patches, CHANNELS * PATCH * PATCH, generator=gen).requires_grad_()
    _, _, mask = random_masking(BATCH, num_patches, MASK_RATIO, generator=gen)
    return pred, images, mask


IMPLEMENTATIONS = {
    "vitfast-cpu": lambda pred, images, mask: masked_pixel_loss(pred, images, mask, PATCH, backend="cpu"),
    "mae-forward-loss": lambda pred, images, mask: masked_pixel_loss_reference(pred, images, mask, PATCH),
    "torch.compile(mae-forward-loss)": torch.compile(
        lambda pred, images, mask: masked_pixel_loss_reference(pred, images, mask, PATCH)),
}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_masked_pixel_loss_fwd_bwd(benchmark, impl):
    step = fwd_bwd(IMPLEMENTATIONS[impl], *make_inputs())
    step()  # warm-up (and compile)
    benchmark.group = "masked_pixel_loss fwd+bwd B256 32px p4 r0.75 norm_pix"
    benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(step)
    benchmark.pedantic(step, rounds=50, iterations=1, warmup_rounds=3)
