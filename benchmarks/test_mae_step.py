"""One full MAE training step (forward, backward, AdamW step) of vitfast.methods.MAE: fused vs the usual way.

Both cases run the same model, the same data and the same step; only VITFAST_BACKEND differs:
- ``cpu``   (fused, vitfast._C): masked_patch_embed embeds only the kept patches, masked_pixel_loss
            never materialises the normalised targets;
- ``torch`` (the usual way): embed all patches with the strided conv then gather the kept ones, and
            MAE's unfused forward_loss (patchify, per-patch normalisation, MSE over masked patches).

Setup: B = 256 random uint8 images, 3x32x32, fp32, mask ratio 0.75, norm_pix, MAE's augmentation
(random-resized crop + flip, as in training). Encoder: the small-data ViT of Gani et al. ("small_data":
patch 4 -> N = 64, K = 16 kept, 192 wide, depth 9, 12 heads, MLP ratio 2, no drop-path). Decoder:
128 wide x 2 blocks x 4 heads. Optimizer: AdamW (the engine's param groups, betas (0.9, 0.95),
wd 0.05), zero_grad(set_to_none) each step as in vitfast.engine. One step is seconds on 2 cores,
so few rounds (5, after 1 warm-up round). images/s = B / median step time.
    pytest benchmarks/test_mae_step.py
    python benchmarks/report.py $PWD/benchmarks/test_mae_step.py   (report.py runs pytest inside benchmarks/)
"""
import pytest
import torch

from _measure import peak_memory_bytes
from vitfast.config import build_config
from vitfast.methods import MAE, DataInfo
from vitfast.ops.masked_patch_embed import BACKENDS as PATCH_EMBED_BACKENDS
from vitfast.ops.masked_pixel_loss import BACKENDS as PIXEL_LOSS_BACKENDS

BATCH, CHANNELS, SIZE, MASK_RATIO = 256, 3, 32, 0.75
DATA = DataInfo(channels=CHANNELS, image_size=SIZE, num_classes=10,
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))  # CIFAR-10 statistics
CPU = torch.device("cpu")

# name -> VITFAST_BACKEND
CASES = {"vitfast-cpu (fused)": "cpu", "torch (embed-all-then-gather, unfused loss)": "torch"}


def make_step():
    config = build_config("mae", "paper", batch_size=BATCH, mask_ratio=MASK_RATIO, decoder_dim=128,
                          decoder_depth=2, decoder_heads=4, precision="fp32")
    assert (config.model, config.patch_size, config.drop_path) == ("small_data", None, 0.0)
    torch.manual_seed(0)  # identical initial weights in every case
    method = MAE(config, DATA).train()
    encoder = method.model
    assert (encoder.patch_size, encoder.embed_dim, len(encoder.blocks)) in (((4, 4), 192, 9), (4, 192, 9))
    optimizer = torch.optim.AdamW(method.param_groups(), lr=config.base_lr * BATCH / 256, betas=config.betas)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, CHANNELS, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    labels, indices = torch.zeros(BATCH, dtype=torch.int64), torch.arange(BATCH)

    def step():
        loss, _ = method(images, labels, indices, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def spy_backends(monkeypatch, chosen):
    """Record the backend each op call resolves to (BACKENDS.select is what masked_* call)."""
    for name, table in (("masked_patch_embed", PATCH_EMBED_BACKENDS), ("masked_pixel_loss", PIXEL_LOSS_BACKENDS)):
        select = table.select

        def recording(device, dtype, requested=None, _select=select, _name=name):
            backend = _select(device, dtype, requested)
            chosen.append((_name, backend))
            return backend

        monkeypatch.setattr(table, "select", recording)


@pytest.mark.parametrize("case", list(CASES))
def test_mae_train_step(benchmark, monkeypatch, case):
    backend = CASES[case]
    monkeypatch.setenv("VITFAST_BACKEND", backend)
    # The environment alone picks the backend, with no fallback (a fallback would also warn).
    assert PATCH_EMBED_BACKENDS.select(CPU, torch.float32) == backend
    assert PIXEL_LOSS_BACKENDS.select(CPU, torch.float32) == backend

    step = make_step()
    chosen = []
    with monkeypatch.context() as m:  # the spy is removed before timing
        spy_backends(m, chosen)
        loss = step()  # warm-up
    assert torch.isfinite(loss)
    assert sorted(set(chosen)) == [("masked_patch_embed", backend), ("masked_pixel_loss", backend)], chosen

    benchmark.group = ("MAE train step (fwd+bwd+AdamW) B256 32px p4 r0.75, small_data ViT 192x9x12h mlp2, "
                       "decoder 128x2x4h, fp32")
    benchmark.extra_info["backend"] = backend
    benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(step)
    benchmark.pedantic(step, rounds=12, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_second"] = BATCH / benchmark.stats.stats.median
