"""One full MAE training step (forward, backward, AdamW step) of vitfast.methods.MAE: fused ops vs the usual way.

Every row runs the same model, data and step; only VITFAST_BACKEND differs:
- ``vitfast-<backend>`` (every fused backend of both ops on this machine: ``cpu`` here, ``triton``/``cuda`` on a
  GPU): masked_patch_embed embeds only the kept patches, masked_pixel_loss never materialises the targets;
- ``torch (usual way)``: embed all patches with the strided conv then gather the kept ones, and MAE's unfused
  forward_loss (patchify, per-patch normalisation, MSE over masked patches).
No torch.compile row: compiling a whole training step is another comparison.

Setup: B = 256 random uint8 images, 3x32x32, fp32, mask ratio 0.75, norm_pix, MAE's augmentation. Encoder: the
small-data ViT of Gani et al. ("small_data": patch 4 -> N = 64, K = 16 kept, 192 wide, depth 9, 12 heads, MLP
ratio 2). Decoder: 128 wide x 2 blocks x 4 heads. AdamW with the engine's param groups, zero_grad(set_to_none).
    python benchmarks/run.py --mae-step --ops masked_pixel_loss   (the rows come with the harness's columns)
"""
import os
import warnings

import torch

from vitfast import ops
from vitfast.gpu_check import measure

BATCH, SIZE, MASK_RATIO = 256, 32, 0.75
SHAPE = "B256 32px p4 r0.75, small_data ViT 192x9x12h mlp2, decoder 128x2x4h"


def make_step(device: torch.device):
    """The vitfast MAE step of benchmarks/train_step.py at this file's shape (its rows differ only in the backend)."""
    from train_step import SMALL_DATA_VIT, vitfast_step
    return vitfast_step("mae", "", SIZE, BATCH, SMALL_DATA_VIT, "fp32", None, device, mask_ratio=MASK_RATIO,
                        decoder_dim=128, decoder_depth=2, decoder_heads=4)


def time_mae_step(device: torch.device, rounds: int) -> list:
    fused = [b for b in (("triton", "cuda") if device.type == "cuda" else ("cpu",))
             if b in ops.available_backends("masked_patch_embed") and b in ops.available_backends("masked_pixel_loss")]
    rows = []
    for name, backend in [(f"vitfast-{b}", b) for b in fused] + [("torch (usual way)", "torch")]:
        row = dict(op="MAE train step (fwd+bwd+AdamW)", shape=SHAPE, dtype="fp32", implementation=name,
                   device=str(device))
        old = os.environ.get(ops.ENV_VAR)
        os.environ[ops.ENV_VAR] = backend
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*falling back.*")  # the row runs the backend it names
                step = make_step(device)
                samples = measure.time_ms(step, device, rounds, warmup=1)
                peak = measure.peak_bytes(step, device)
            stats = measure.summary(samples)
            rows.append({**row, **stats, "images_per_s": round(BATCH / stats["median_ms"] * 1e3, 1),
                         "peak_bytes": peak})
        except Exception as error:
            rows.append({**row, "error": f"{type(error).__name__}: {error}"})
        finally:
            if old is None:
                os.environ.pop(ops.ENV_VAR, None)
            else:
                os.environ[ops.ENV_VAR] = old
    return rows
