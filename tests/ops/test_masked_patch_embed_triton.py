"""Launcher-level tests of the Triton kernels of masked_patch_embed (vitfast.kernels.masked_patch_embed).

The op-level tests (test_masked_patch_embed.py) go through the dispatcher; these call the launchers
directly to reach the paths a dispatcher rarely takes: split-M d_weight partials, d_bias without d_weight,
every position repeated, empty K, wide patches (C*p*p = 768), and the launch tables behind AOT_SPECS.
Under the interpreter (no GPU) they run on CPU tensors; keep shapes small.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from vitfast.ops import masked_patch_embed_reference  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from vitfast.kernels import masked_patch_embed as mpe  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make(B, C, H, W, p, D, K, L, dtype, seed=0, keep_idx=None, pos_idx=None):
    gen = torch.Generator().manual_seed(seed)
    N = (H // p) * (W // p)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    images, weight, bias, pos = rand(B, C, H, W), rand(D, C * p * p) / (C * p * p) ** 0.5, rand(D), rand(L, D)
    if keep_idx is None:
        keep_idx = torch.randint(0, N, (B, K), generator=gen)
    if pos_idx is None:
        pos_idx = torch.randint(0, L, (B, K), generator=gen)
    grad = rand(B, keep_idx.shape[1], D)
    return images, weight, bias, pos, keep_idx, pos_idx, grad


def expected(images, weight, bias, pos, keep_idx, pos_idx, grad):
    leaves = [t.clone().requires_grad_() for t in (images, weight, bias, pos)]
    out = masked_patch_embed_reference(*leaves, keep_idx, pos_idx)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def run(images, weight, bias, pos, keep_idx, pos_idx, grad, p, dtype, mask=(True, True, True, True)):
    to = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype).contiguous()
    idx = lambda t: t.to(DEVICE)
    out = mpe.masked_patch_embed_forward(to(images), to(weight), to(bias), to(pos), idx(keep_idx), idx(pos_idx), p)
    grads = mpe.masked_patch_embed_backward(to(grad), to(images), to(weight), idx(keep_idx), idx(pos_idx), p,
                                            pos.shape[0], mask)
    return out, *grads


NAMES = ("tokens", "d_images", "d_weight", "d_bias", "d_pos_embed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [
    (3, 3, 8, 8, 2, 20, 5, 7),       # C*p*p = 12 (< one K tile)
    (3, 3, 16, 12, 4, 192, 5, 12),   # C*p*p = 48, D = 192 (non-power-of-two, two D tiles)
    (2, 3, 17, 19, 8, 20, 5, 6),     # C*p*p = 192, H, W not multiples of p (ragged border ignored)
    (2, 3, 32, 16, 16, 20, 3, 2),    # C*p*p = 768
], ids=lambda s: "B{}C{}H{}W{}p{}D{}K{}L{}".format(*s))
def test_matches_reference_with_duplicates(shape, dtype, assert_close):
    B, C, H, W, p, D, K, L = shape
    images, weight, bias, pos, keep_idx, pos_idx, grad = make(*shape, dtype)
    keep_idx[0, -1] = keep_idx[0, 0]           # duplicate patch in one row: d_images accumulates
    pos_idx[:, 0] = pos_idx[0, 1]              # one position used by many rows: d_pos_embed accumulates
    got = run(images, weight, bias, pos, keep_idx, pos_idx, grad, p, dtype)
    for name, actual, want in zip(NAMES, got, expected(images, weight, bias, pos, keep_idx, pos_idx, grad)):
        assert actual.dtype == dtype and actual.shape == want.shape, name
        assert_close(actual.cpu(), want, dtype, name)


def test_split_over_rows_and_bias_without_weight(assert_close):
    """M = 120 rows: d_weight is summed from several split partials; d_bias alone uses the segment kernel."""
    images, weight, bias, pos, keep_idx, pos_idx, grad = make(3, 3, 16, 16, 4, 20, 40, 16, torch.float32, seed=3)
    want = expected(images, weight, bias, pos, keep_idx, pos_idx, grad)
    cfg = mpe.BWD_WEIGHT_CONFIG[torch.float32]
    assert triton.cdiv(3 * 40, cfg["BLOCK_M"]) > 1  # more than one row block, so more than one split
    _, d_images, d_weight, d_bias, d_pos = run(images, weight, bias, pos, keep_idx, pos_idx, grad, 4, torch.float32)
    assert_close(d_weight.cpu(), want[2], torch.float32, "d_weight")
    assert_close(d_bias.cpu(), want[3], torch.float32, "d_bias")
    got = run(images, weight, bias, pos, keep_idx, pos_idx, grad, 4, torch.float32, mask=(False, False, True, False))
    assert got[1] is None and got[2] is None and got[4] is None
    assert_close(got[3].cpu(), want[3], torch.float32, "d_bias alone")


def test_backward_is_deterministic():
    """Bitwise-equal reruns: split partials and position segments are summed in a fixed order; d_images is
    an atomic add onto zero, exact while each row keeps distinct patches (as random_masking does)."""
    gen = torch.Generator().manual_seed(4)
    keep_idx = torch.stack([torch.randperm(64, generator=gen)[:40] for _ in range(3)])
    args = make(3, 3, 32, 32, 4, 20, 40, 4, torch.float32, seed=4, keep_idx=keep_idx)
    first = run(*args, 4, torch.float32)
    second = run(*args, 4, torch.float32)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_no_bias_no_pos_and_unused_positions(assert_close):
    images, weight, _, pos, keep_idx, _, grad = make(2, 2, 8, 8, 2, 20, 6, 30, torch.float32, seed=5)
    pos_idx = torch.zeros_like(keep_idx)  # every row at position 0; positions 1..29 get zero gradient
    to = lambda t: t.to(device=DEVICE, dtype=torch.float32)
    out = mpe.masked_patch_embed_forward(to(images), to(weight), None, None, keep_idx.to(DEVICE),
                                         pos_idx.to(DEVICE), 2)
    assert_close(out.cpu(), masked_patch_embed_reference(images, weight, None, None, keep_idx), torch.float32, "tokens")
    d = mpe.masked_patch_embed_backward(to(grad), to(images), to(weight), keep_idx.to(DEVICE), pos_idx.to(DEVICE), 2,
                                        30, (False, False, False, True))
    assert d[:3] == (None, None, None)
    want = torch.zeros(30, 20, dtype=torch.float64)
    want[0] = grad.sum((0, 1))
    assert_close(d[3].cpu(), want, torch.float32, "d_pos_embed")


def test_empty_keep():
    images, weight, bias, pos, keep_idx, pos_idx, grad = make(2, 3, 8, 8, 2, 20, 0, 4, torch.float32)
    out, *grads = run(images, weight, bias, pos, keep_idx, pos_idx, grad, 2, torch.float32)
    assert out.shape == (2, 0, 20)
    shapes = [(2, 3, 8, 8), (20, 12), (20,), (4, 20)]
    for g, shape in zip(grads, shapes):
        assert g.shape == shape and not g.any()


def test_aot_specs_use_the_launch_tables():
    """The compile check must see the block sizes and warps the launchers use."""
    tables = {"_mpe_forward_kernel": mpe.FORWARD_CONFIG, "_mpe_bwd_weight_kernel": mpe.BWD_WEIGHT_CONFIG,
              "_mpe_bwd_images_kernel": mpe.BWD_IMAGES_CONFIG, "_mpe_segment_sum_kernel": mpe.SEGMENT_SUM_CONFIG}
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    seen = set()
    for spec in mpe.AOT_SPECS:
        dtype = dtypes[spec.variant.split()[0].split("-")[0]]
        cfg = tables[spec.name][dtype]
        blocks = {k: v for k, v in spec.constexprs.items() if k.startswith("BLOCK_")}
        assert blocks == {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}, spec.variant
        assert (spec.num_warps, spec.num_stages) == (cfg["num_warps"], cfg["num_stages"]), spec.variant
        seen.add((spec.name, dtype))
    assert seen == {(name, dtype) for name in tables for dtype in dtypes.values()}
