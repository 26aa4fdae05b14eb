"""The op tests' tolerance table (tests/ops/conftest.py) is consistent with its measured errors and tight enough to
catch a real fault: MAE's norm_pix variance divided by E instead of E - 1. Cost: well under a second."""
import importlib.util
import pathlib

import pytest
import torch

from vitfast.ops import masked_pixel_loss_reference

# tests/ops/conftest.py by its path ("conftest" alone may name tests/conftest.py).
_spec = importlib.util.spec_from_file_location("ops_conftest", pathlib.Path(__file__).with_name("conftest.py"))
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)
BACKENDS, FACTOR, KINDS, OPS, TOLERANCES, UNMEASURED = (table.BACKENDS, table.FACTOR, table.KINDS, table.OPS,
                                                       table.TOLERANCES, table.UNMEASURED)
band, normwise_error, proposed_band = table.band, table.normwise_error, table.proposed_band

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("key", sorted(TOLERANCES, key=str), ids=lambda k: f"{k[0]}-{k[1]}-{str(k[2])[6:]}-{k[3]}")
def test_band_is_the_rule_applied_to_the_measured_error(key):
    """band = proposed_band(measured): FACTOR x the measured error (room for the next change), no wider (a band
    widened by hand without re-measuring fails here)."""
    value, measured = TOLERANCES[key]
    assert key[0] in OPS and key[1] in BACKENDS and key[3] in KINDS and 0 <= measured < float("inf"), key
    assert value == proposed_band(measured, key[2]) >= FACTOR[key[2]] * measured, (key, value, measured)


def test_unmeasured_rows_are_rows():
    assert UNMEASURED <= set(TOLERANCES)


def normalised_patches(images, patch, correction):
    """MAE's patchify + per-patch normalisation in float32, the variance divided by E - correction."""
    batch, channels, height, width = images.shape
    x = images.float().reshape(batch, channels, height // patch, patch, width // patch, patch)
    target = torch.einsum("nchpwq->nhwpqc", x).reshape(batch, -1, patch * patch * channels)
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True, correction=correction)
    return (target - mean) / (var + 1e-6) ** 0.5


def fused_like(pred, images, mask, patch, grad, correction):
    """(loss, d_pred) as a fused kernel computes them: fp32 accumulation from the dtype's inputs, results rounded to
    the dtype once."""
    target = normalised_patches(images, patch, correction)
    error = pred.float() - target
    weight = mask.float()
    loss = ((error ** 2).mean(-1) * weight).sum() / weight.sum()
    d_pred = 2 * error * weight[..., None] / (pred.shape[-1] * weight.sum()) * grad
    return loss.to(pred.dtype), d_pred.to(pred.dtype)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_band_catches_a_biased_variance(backend, dtype):
    """Fault injection at E = p*p*C = 48: the biased variance (/ E, off by a factor (E - 1) / E) must fall outside
    bands of (masked_pixel_loss, backend, dtype) in the loss (its "scalar" band) or d_pred ("tensor"), while the same
    computation with MAE's unbiased variance (/ (E - 1)) stays inside. Fails when a band is too wide (or the control
    too tight)."""
    gen = torch.Generator().manual_seed(0)
    patch, batch, num_patches = 4, 3, 15
    images = (3 + 2 * torch.randn(batch, 3, 12, 20, generator=gen)).to(dtype)
    pred = torch.randn(batch, num_patches, 48, generator=gen).to(dtype)
    mask = (torch.rand(batch, num_patches, generator=gen) < 0.75).float()
    grad = 0.7 * 48 * mask.sum().item() / 2  # d_pred = 0.7 w (pred - target): O(1) values, as the op tests use
    leaf = pred.double().requires_grad_()
    want = masked_pixel_loss_reference(leaf, images.double(), mask.double(), patch, True)
    (want_d_pred,) = torch.autograd.grad(want, leaf, torch.tensor(grad, dtype=torch.float64))
    allowed = [band("masked_pixel_loss", backend, dtype, kind) for kind in ("scalar", "tensor")]

    def errors(correction):  # (loss, d_pred) normwise errors
        loss, d_pred = fused_like(pred, images, mask, patch, grad, correction)
        return normwise_error(loss, want), normwise_error(d_pred, want_d_pred)

    assert all(e <= a for e, a in zip(errors(correction=1), allowed)), "control: the unbiased computation must pass"
    biased = errors(correction=0)
    assert any(e > a for e, a in zip(biased, allowed)), f"a biased variance {biased} passes the bands {allowed}"
