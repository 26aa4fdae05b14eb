"""Launcher-level tests of the Triton kernels of masked_patch_embed (vitfast.kernels.masked_patch_embed).

The op-level tests (test_masked_patch_embed.py) go through the dispatcher; these call the launchers
directly to reach the paths a dispatcher rarely takes: split-M partials and their reduction, d_bias without
d_weight, every position repeated, empty K, wide patches (C*p*p = 768), every tile candidate, the launch
count, the one-axis grids past 65535 programs, and the launch tables behind AOT_SPECS.
Under the interpreter (no GPU) they run on CPU tensors; keep shapes small (the whole file: ~1 min on 2 cores).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from vitfast.ops import masked_patch_embed_reference  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from vitfast.kernels import masked_patch_embed as mpe  # noqa: E402

from _launch_count import count_launches  # noqa: E402

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
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


@pytest.fixture
def small_splits(monkeypatch):
    """Splits of 16 rows, so that interpreter-sized problems take the split-partials path."""
    monkeypatch.setattr(mpe, "MIN_ROWS_PER_SPLIT", 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_over_rows_and_bias_without_weight(dtype, assert_close, small_splits):
    """M = 120 rows in several splits: fp32 partials of d_weight, d_bias and d_pos_embed, reduced in split order;
    then every subset of the three gradients, including d_bias alone (no dot at all)."""
    images, weight, bias, pos, keep_idx, pos_idx, grad = make(3, 3, 16, 16, 4, 20, 40, 16, dtype, seed=3)
    want = expected(images, weight, bias, pos, keep_idx, pos_idx, grad)
    assert mpe.bwd_params_plan(120, 20, 48, 16, dtype, True, True)["split"] > 1
    for mask in [(True, True, True, True), (False, True, False, False), (False, False, True, False),
                 (False, False, False, True), (False, True, True, False), (False, False, True, True)]:
        got = run(images, weight, bias, pos, keep_idx, pos_idx, grad, 4, dtype, mask=mask)
        for name, actual, wanted, wanted_mask in zip(NAMES[1:], got[1:], want[1:], mask):
            assert (actual is None) == (not wanted_mask), name
            if wanted_mask:
                assert_close(actual.cpu(), wanted, dtype, f"{name} {mask}")


def test_backward_is_deterministic(small_splits):
    """Bitwise-equal reruns: split partials and one-hot position sums are summed in a fixed order; d_images is
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


def test_zero_width_and_float64():
    """D = 0 gives empty outputs without a launch; float64 (routed to the reference by the op) is a clear error."""
    images, weight, bias, pos, keep_idx, pos_idx, grad = make(2, 3, 8, 8, 2, 0, 5, 4, torch.float32)
    out, *grads = run(images, weight, bias, pos, keep_idx, pos_idx, grad, 2, torch.float32)
    assert out.shape == (2, 5, 0) and [tuple(g.shape) for g in grads] == [(2, 3, 8, 8), (0, 12), (0,), (4, 0)]
    assert not grads[0].any()
    images, weight, bias, pos, keep_idx, pos_idx, grad = make(2, 3, 8, 8, 2, 4, 5, 4, torch.float64)
    with pytest.raises(TypeError, match="takes float32/float16/bfloat16, got torch.float64"):
        mpe.masked_patch_embed_forward(images, weight, bias, pos, keep_idx, pos_idx, 2)


def test_empty_keep():
    images, weight, bias, pos, keep_idx, pos_idx, grad = make(2, 3, 8, 8, 2, 20, 0, 4, torch.float32)
    out, *grads = run(images, weight, bias, pos, keep_idx, pos_idx, grad, 2, torch.float32)
    assert out.shape == (2, 0, 20)
    shapes = [(2, 3, 8, 8), (20, 12), (20,), (4, 20)]
    for g, shape in zip(grads, shapes):
        assert g.shape == shape and not g.any()


TABLES = {"_mpe_forward_kernel": mpe.FORWARD_TILES, "_mpe_bwd_params_kernel": mpe.BWD_PARAMS_TILES,
          "_mpe_bwd_images_kernel": mpe.BWD_IMAGES_TILES}
CANDIDATES = [(kernel, klass, i) for kernel, table in TABLES.items() for klass in table for i in range(len(table[klass]))]


@pytest.mark.parametrize("kernel,klass,index", CANDIDATES, ids=lambda v: str(v))
def test_every_tile_candidate_matches_reference(kernel, klass, index, monkeypatch, assert_close, small_splits):
    """Each candidate tile of each kernel, forced, on a ragged shape (D = 20, E = 48, M = 30 rows)."""
    table = TABLES[kernel]
    monkeypatch.setitem(table, klass, [table[klass][index]])
    dtype = torch.float32 if klass == "fp32" else torch.float16
    args = make(3, 3, 16, 12, 4, 20, 10, 12, dtype, seed=6)
    for name, actual, want in zip(NAMES, run(*args, 4, dtype), expected(*args)):
        assert_close(actual.cpu(), want, dtype, f"{kernel} {table[klass][0]}: {name}")


def test_tiles_fit_the_benchmark_shape():
    """MAE at B256, 32 px, p4, D192, ratio .75 (M = 4096, E = 48): no idle lanes in the forward's tiles and
    enough programs for a 132-SM GPU (the old 128x128x32 tile made 64 programs, 25 % of them idle lanes)."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        cfg, grid = mpe.forward_plan(4096, 192, 48, dtype)
        assert 192 % cfg["BLOCK_N"] == 0 and 48 % cfg["BLOCK_K"] == 0 and 4096 % cfg["BLOCK_M"] == 0, cfg
        assert grid[0] >= 132, (cfg, grid)
        plan = mpe.bwd_params_plan(4096, 192, 48, 64, dtype, True, True)
        assert 192 % plan["cfg"]["BLOCK_D"] == 0 and 48 % plan["cfg"]["BLOCK_E"] == 0, plan
        assert plan["grid"][0] >= 132 and plan["split"] <= 32, plan
    # ViT-B/16 keeps the large tile.
    assert mpe.forward_plan(256 * 49, 768, 768, torch.float16)[0] == mpe.FORWARD_TILES["half"][0]


def test_grids_use_axis_0_past_65535_programs():
    """Grid axes 1 and 2 stop at 65535 programs: 10M token rows (no kernel run) must fit on axis 0."""
    rows = 10_000_000
    for dtype in (torch.float16, torch.float32):
        for grid in (mpe.forward_plan(rows, 192, 48, dtype)[1], mpe.bwd_images_plan(rows, 192, 48, dtype)[1],
                     mpe.bwd_params_plan(rows, 192, 48, 64, dtype, True, True)["grid"]):
            assert len(grid) == 1 and 0 < grid[0] < 2 ** 31
        assert mpe.forward_plan(rows, 192, 48, dtype)[1][0] > 65535
    with pytest.raises(ValueError, match="B\\*K must be below"):
        mpe.forward_plan(2 ** 31, 192, 48, torch.float16)


def test_launch_count(monkeypatch):
    """Forward: 1 launch. Backward of weight, bias and pos_embed (MAE's encoder): 1 launch with one split,
    2 with several (kernel + reduction); no sort, no search, no casts, no torch reductions."""
    args = make(3, 3, 16, 16, 4, 20, 40, 16, torch.float16, seed=7)  # M = 120 rows: up to 4 splits
    to = lambda t: t.to(device=DEVICE, dtype=torch.float16)
    images, weight, bias, pos, keep_idx, pos_idx, grad = (to(t) if t.is_floating_point() else t for t in args)
    with count_launches(mpe, monkeypatch) as launches:
        mpe.masked_patch_embed_forward(images, weight, bias, pos, keep_idx, pos_idx, 4)
    assert launches == ["triton:_mpe_forward_kernel"]
    for min_rows, expected_launches in ((256, ["triton:_mpe_bwd_params_kernel"]),
                                        (8, ["triton:_mpe_bwd_params_kernel", "triton:_mpe_reduce_splits_kernel"])):
        monkeypatch.setattr(mpe, "MIN_ROWS_PER_SPLIT", min_rows)
        with count_launches(mpe, monkeypatch) as launches:
            mpe.masked_patch_embed_backward(grad, images, weight, keep_idx, pos_idx, 4, 16, (False, True, True, True))
        assert launches == expected_launches


def test_split_does_not_depend_on_the_gpu(monkeypatch, small_splits):
    """The split (hence every bit of d_weight) is a function of the shape: no device property is read."""
    def no_query(*args, **kwargs):
        raise AssertionError("the backward must not query the device")
    monkeypatch.setattr(torch.cuda, "get_device_properties", no_query)
    args = make(3, 3, 16, 16, 4, 20, 40, 16, torch.float32, seed=3)
    run(*args, 4, torch.float32)


def test_aot_specs_use_the_launch_tables():
    """The compile check must see every tile candidate, with the warps and stages the launchers use."""
    dtypes = {"fp32": "fp32", "fp16": "half", "bf16": "half"}
    seen = set()
    for spec in mpe.AOT_SPECS:
        if spec.name not in TABLES:
            continue
        klass = dtypes[spec.variant.split()[0].split("-")[0]]
        blocks = {k: v for k, v in spec.constexprs.items() if k.startswith("BLOCK_")}
        matches = [i for i, cfg in enumerate(TABLES[spec.name][klass])
                   if blocks == {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
                   and (spec.num_warps, spec.num_stages) == (cfg["num_warps"], cfg["num_stages"])]
        assert matches, spec.variant
        seen.add((spec.name, spec.variant.split()[0], matches[0]))
    for kernel, klass, index in CANDIDATES:
        for label, k in dtypes.items():
            if k == klass:
                assert (kernel, label, index) in seen, (kernel, label, index)
    assert {spec.name for spec in mpe.AOT_SPECS} >= {"_mpe_reduce_splits_kernel"}


def test_launches_under_the_inputs_device():
    """Tensors on cuda:1 while cuda:0 is current: both ops' launchers enter the input's device (no GPU needed:
    the guard object is inspected, not entered); CPU tensors (the interpreter) get no guard."""
    from types import SimpleNamespace

    from vitfast.kernels import masked_pixel_loss as mpl
    on_gpu1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    for module in (mpe, mpl):
        guard = module.launch_device(on_gpu1)
        assert isinstance(guard, torch.cuda.device) and guard.idx == 1, module.__name__
        assert not isinstance(module.launch_device(torch.zeros(1)), torch.cuda.device)
