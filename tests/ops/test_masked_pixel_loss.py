"""masked_pixel_loss: every backend against the reference, the reference against MAE, gradients, registration,
edge cases (masks, NaN, dtypes) and errors. Triton runs under the interpreter on CPU: shapes stay small."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitfast
from vitfast.ops import MaskedPixelLoss, masked_pixel_loss, masked_pixel_loss_reference
from vitfast.ops.masked_pixel_loss import BACKENDS

# (B, C, H, W, p): ragged B and N (never a power of two except p=2), p = 2, 4, 8, 16, C = 1 and 3,
# non-square images; E = p*p*C from 12 to 768.
SHAPES = [
    (3, 3, 8, 12, 2),    # N = 24, E = 12
    (3, 3, 12, 20, 4),   # N = 15, E = 48
    (3, 1, 24, 16, 8),   # N = 6,  E = 64
    (2, 3, 16, 48, 16),  # N = 3,  E = 768
    (3, 1, 12, 8, 4),    # N = 6,  E = 16
]
FUSED = ("cpu", "triton", "cuda")


def shape_id(shape):
    return "B{}C{}H{}W{}p{}".format(*shape)


def backend_cases():
    return [(backend, dtype) for backend in ("cpu", "torch", "triton", "cuda")
            for dtype in (torch.float32, torch.float16, torch.bfloat16)]


def make_inputs(shape, dtype, device, seed=0, mask_kind="random", images_dtype=None):
    batch, channels, height, width, patch = shape
    num_patches = (height // patch) * (width // patch)
    gen = torch.Generator().manual_seed(seed)
    # Pixels with an offset and a scale, so that the normalisation matters.
    images = 3 + 2 * torch.randn(batch, channels, height, width, generator=gen)
    pred = torch.randn(batch, num_patches, channels * patch * patch, generator=gen)
    if mask_kind == "random":  # MAE's 0.75 ratio, at least one masked patch
        mask = (torch.rand(batch, num_patches, generator=gen) < 0.75).float()
        mask[0, 0] = 1
    elif mask_kind == "one":
        mask = torch.zeros(batch, num_patches)
        mask[-1, num_patches // 2] = 1
    elif mask_kind == "all":
        mask = torch.ones(batch, num_patches)
    elif mask_kind == "bool":
        mask = torch.rand(batch, num_patches, generator=gen) < 0.5
        mask[0, 0] = True
    elif mask_kind == "weights":  # fractional weights are a weighted mean, as in MAE's formula
        mask = torch.rand(batch, num_patches, generator=gen) * (torch.rand(batch, num_patches, generator=gen) < 0.6)
        mask[0, 0] = 0.5
    else:
        raise ValueError(mask_kind)
    pred = pred.to(dtype=dtype, device=device).requires_grad_()
    return pred, images.to(dtype=images_dtype or dtype, device=device), mask.to(device)


def reference_with_grad(pred, images, mask, patch, norm_pix, grad):
    leaf = pred.detach().double().cpu().requires_grad_()
    loss = masked_pixel_loss_reference(leaf, images.double().cpu(), mask.double().cpu(), patch, norm_pix)
    (d_pred,) = torch.autograd.grad(loss, leaf, grad)
    return loss.detach(), d_pred


def unit_gradient(pred, mask):
    """An upstream gradient that makes d_pred = 0.7 * mask * (pred - target): O(1) values, so the fp16 tolerance
    of the table is a real check (with grad 1, d_pred ~ 1 / (E * sum(mask)) would pass any tolerance)."""
    return torch.tensor(0.7 * pred.shape[-1] * mask.double().sum().item() / 2)


def run(backend, pred, images, mask, patch, norm_pix):
    loss = masked_pixel_loss(pred, images, mask, patch, norm_pix, backend=backend)
    grad = unit_gradient(pred, mask)
    (d_pred,) = torch.autograd.grad(loss, pred, grad.to(dtype=loss.dtype, device=loss.device))
    return loss, d_pred, grad


def skip_unless_runs(backend, device):
    if not BACKENDS.runs_on(backend, device):
        pytest.skip(f"backend {backend} cannot run on {device} in this install (needs a GPU or the build)")


@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=lambda v: str(v).replace("torch.", ""))
def test_backend_matches_reference(backend, dtype, shape, norm_pix, assert_close, backend_device):
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    pred, images, mask = make_inputs(shape, dtype, device)
    loss, d_pred, grad = run(backend, pred, images, mask, shape[4], norm_pix)
    want_loss, want_d_pred = reference_with_grad(pred, images, mask, shape[4], norm_pix, grad)
    assert loss.dtype == dtype and loss.shape == () and d_pred.dtype == dtype and d_pred.shape == pred.shape
    assert_close(loss.cpu(), want_loss, dtype, f"{backend}/loss")
    assert_close(d_pred.cpu(), want_d_pred, dtype, f"{backend}/d_pred")


@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw"])
@pytest.mark.parametrize("max_block", [None, 32], ids=["p32", "forced32"])
def test_triton_chunked_path(max_block, norm_pix, assert_close, backend_device, monkeypatch):
    """Patches wider than one tile are walked in BLOCK_E chunks (three passes with norm_pix). Naturally at p = 32
    (E = 3072 > 2048); forced with 32-wide chunks at E = 48 (a ragged last chunk), so both run in seconds."""
    device = backend_device("triton")
    skip_unless_runs("triton", device)
    from vitfast.kernels import masked_pixel_loss as kernels
    shape = (2, 3, 32, 64, 32) if max_block is None else SHAPES[1]
    if max_block is not None:
        monkeypatch.setitem(kernels.CONFIG, torch.float32, dict(kernels.CONFIG[torch.float32], MAX_BLOCK_E=max_block))
    E = shape[1] * shape[4] ** 2
    assert E > kernels.launch_config(E, torch.float32)["BLOCK_E"], "the chunked path must run"
    pred, images, mask = make_inputs(shape, torch.float32, device, mask_kind="all" if max_block is None else "random")
    loss, d_pred, grad = run("triton", pred, images, mask, shape[4], norm_pix)
    want_loss, want_d_pred = reference_with_grad(pred, images, mask, shape[4], norm_pix, grad)
    assert_close(loss.cpu(), want_loss, torch.float32, "loss")
    assert_close(d_pred.cpu(), want_d_pred, torch.float32, "d_pred")


def test_triton_launch_count(monkeypatch):
    """Forward: the kernel and the one-program finalize (no zero fill, no torch reductions or casts); backward:
    mask.sum() and the kernel (the scale is formed in the kernel). Before: 6 and 6 (fp16 7 and 7)."""
    kernels = pytest.importorskip("vitfast.kernels.masked_pixel_loss")
    from _launch_count import count_launches
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not BACKENDS.runs_on("triton", device):
        pytest.skip("triton cannot run here")
    pred, images, mask = make_inputs(SHAPES[1], torch.float16, device, images_dtype=torch.float32)
    pred = pred.detach()
    with count_launches(kernels, monkeypatch) as launches:
        loss, stats = kernels.masked_pixel_loss_forward(pred, images, mask, 4, True)
    assert launches == ["triton:_mpl_forward_kernel", "triton:_mpl_finalize_kernel"]
    grad = torch.ones((), dtype=loss.dtype, device=device)
    with count_launches(kernels, monkeypatch) as launches:
        kernels.masked_pixel_loss_backward(grad, pred, images, mask, stats, 4, True)
    assert launches == ["sum", "triton:_mpl_backward_kernel"]


def test_triton_grid_is_one_axis():
    """Rows go on grid axis 0 (up to 2^31 - 1 programs): 10M patch rows fit (no kernel run)."""
    kernels = pytest.importorskip("vitfast.kernels.masked_pixel_loss")
    grid = kernels.forward_grid(10_000_000, kernels.launch_config(48, torch.float16))
    assert len(grid) == 1 and 65535 < grid[0] < 2 ** 31
    with pytest.raises(ValueError, match=r"B\*N must be below"):
        kernels.forward_grid(2 ** 31, kernels.launch_config(48, torch.float16))


@pytest.mark.parametrize("mask_kind", ["one", "all", "bool", "weights"])
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton", "cuda"])
def test_masks(backend, mask_kind, assert_close, backend_device):
    """One masked patch in the whole batch, every patch masked, a bool mask, fractional weights."""
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    shape = SHAPES[1]
    pred, images, mask = make_inputs(shape, torch.float32, device, seed=2, mask_kind=mask_kind)
    loss, d_pred, grad = run(backend, pred, images, mask, shape[4], True)
    want_loss, want_d_pred = reference_with_grad(pred, images, mask, shape[4], True, grad)
    assert_close(loss.cpu(), want_loss, torch.float32, "loss")
    assert_close(d_pred.cpu(), want_d_pred, torch.float32, "d_pred")
    kept = (mask == 0).cpu()
    assert (d_pred.cpu()[kept] == 0).all(), "unmasked patches must get exactly zero gradient"


def test_reference_is_mae_forward_loss():
    """The reference equals a literal transcription of MAE's forward_loss (models_mae.py: patchify with
    3 channels and square images, per-patch mean and unbiased var, MSE, mean over removed patches)."""

    def mae_patchify(imgs, p):
        h = w = imgs.shape[2] // p
        x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(shape=(imgs.shape[0], h * w, p ** 2 * 3))

    def mae_forward_loss(imgs, pred, mask, p, norm_pix_loss):
        target = mae_patchify(imgs, p)
        if norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
        loss = (loss * mask).sum() / mask.sum()  # mean loss on removed patches
        return loss

    gen = torch.Generator().manual_seed(5)
    images = torch.randn(4, 3, 32, 32, generator=gen) * 1.7 + 0.4
    _, _, mask = vitfast.ops.random_masking(4, 64, 0.75, generator=gen)
    pred = torch.randn(4, 64, 48, generator=gen)
    for norm_pix in (True, False):
        ours = masked_pixel_loss_reference(pred, images, mask, 4, norm_pix)
        theirs = mae_forward_loss(images, pred, mask, 4, norm_pix)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        fused = masked_pixel_loss(pred, images, mask, 4, norm_pix, backend="cpu")
        torch.testing.assert_close(fused, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw"])
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton", "cuda"])
def test_gradcheck_float64(backend, norm_pix, backend_device):
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    pred, images, mask = make_inputs((2, 3, 4, 8, 2), torch.float64, device, seed=3)
    assert torch.autograd.gradcheck(lambda x: masked_pixel_loss(x, images, mask, 2, norm_pix, backend=backend),
                                    (pred,))


def test_reference_backward_matches_autograd(assert_close):
    """The torch backend's closed-form backward equals autograd through the reference."""
    for norm_pix in (True, False):
        pred, images, mask = make_inputs(SHAPES[1], torch.float64, "cpu", seed=4, mask_kind="weights")
        grad = torch.tensor(1.3, dtype=torch.float64)
        (ours,) = torch.autograd.grad(masked_pixel_loss(pred, images, mask, 4, norm_pix, backend="torch"), pred, grad)
        assert_close(ours, reference_with_grad(pred, images, mask, 4, norm_pix, grad)[1], torch.float64, "d_pred")


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton", "cuda"])
def test_opcheck(backend, backend_device):
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    pred, images, mask = make_inputs(SHAPES[0], torch.float32, device)
    sliced = torch.cat([pred[:, :1], pred], dim=1).detach()[:, 1:].requires_grad_()  # batch stride (N + 1)·E
    for norm_pix in (True, False):
        for x in (pred, sliced):
            torch.library.opcheck(torch.ops.vitfast.masked_pixel_loss.default, (x, images, mask, 2, norm_pix, backend))


def test_torch_compile_matches_eager(assert_close):
    pred, images, mask = make_inputs(SHAPES[1], torch.float32, "cpu")
    fn = lambda x: masked_pixel_loss(x, images, mask, 4, backend="cpu") * 3
    eager = fn(pred)
    (eager_grad,) = torch.autograd.grad(eager, pred)
    compiled = torch.compile(fn, fullgraph=True)
    loss = compiled(pred)
    (grad,) = torch.autograd.grad(loss, pred)
    assert_close(loss, eager, torch.float32, "compiled loss")
    assert_close(grad, eager_grad, torch.float32, "compiled grad")


@pytest.mark.parametrize("backend", FUSED)
def test_saves_only_inputs_and_per_patch_stats(backend, backend_device):
    """No tensor of size B·N·p·p·C is created for backward: autograd holds the inputs and 2 numbers per patch."""
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    pred, images, mask = make_inputs(SHAPES[1], torch.float32, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        masked_pixel_loss(pred, images, mask, 4, backend=backend)
    inputs = {t.data_ptr() for t in (pred, images, mask)}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    assert extra and all(t.numel() <= 2 * mask.numel() for t in extra), [tuple(t.shape) for t in extra]


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton", "cuda"])
def test_decoder_output_slice_is_read_in_place(backend, backend_device, assert_close):
    """MAE's decoder returns decoder_pred(x)[:, 1:] (CLS row dropped): contiguous rows, batch stride (N + 1)·E.
    It is read in place: no copy of pred is made, and the one autograd keeps is pred itself."""
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    pred, images, mask = make_inputs(SHAPES[1], torch.float32, device)
    full = torch.cat([torch.randn_like(pred[:, :1]), pred.detach()], dim=1).requires_grad_()
    sliced = full[:, 1:]
    assert not sliced.is_contiguous()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = masked_pixel_loss(sliced, images, mask, 4, backend=backend)
    assert any(t.data_ptr() == sliced.data_ptr() and t.stride() == sliced.stride() for t in saved)
    grad = unit_gradient(pred, mask)
    (d_full,) = torch.autograd.grad(loss, full, grad.to(loss.dtype))
    want_loss, want_d_pred = reference_with_grad(pred, images, mask, 4, True, grad)
    assert_close(loss.cpu(), want_loss, torch.float32, "loss")
    assert_close(d_full[:, 1:].cpu(), want_d_pred, torch.float32, "d_pred")
    assert (d_full[:, 0] == 0).all()


def test_cpu_is_deterministic_across_thread_counts():
    pred, images, mask = make_inputs((8, 3, 32, 32, 4), torch.float32, "cpu")  # 512 patches: several blocks
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            loss, d_pred, _ = run("cpu", pred, images, mask, 4, True)
            results.append((loss, d_pred))
    finally:
        torch.set_num_threads(threads)
    for loss, d_pred in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(d_pred, results[0][1])


@pytest.mark.parametrize("pred_dtype,images_dtype", [
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),   # autocast decoder, fp32 images (native)
    (torch.float32, torch.float16), (torch.bfloat16, torch.float16),  # up-cast at the boundary
    (torch.float32, torch.float64),
], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton", "cuda"])
def test_mixed_dtypes_follow_type_promotion(backend, pred_dtype, images_dtype, assert_close, backend_device):
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    pred, images, mask = make_inputs(SHAPES[1], pred_dtype, device, images_dtype=images_dtype)
    loss, d_pred, grad = run(backend, pred, images, mask, 4, True)
    promoted = torch.promote_types(pred_dtype, images_dtype)
    assert loss.dtype == promoted and d_pred.dtype == pred_dtype
    want_loss, want_d_pred = reference_with_grad(pred, images, mask, 4, True, grad)
    assert_close(loss.cpu(), want_loss, pred_dtype if backend != "torch" else promoted, "loss")
    assert_close(d_pred.cpu(), want_d_pred, pred_dtype, "d_pred")


def test_autocast_decoder_output_against_fp32_images(assert_close):
    """As in MAE under autocast: a bf16 pred and fp32 images give an fp32 loss from fp32 targets."""
    pred, images, mask = make_inputs(SHAPES[1], torch.float32, "cpu")
    head = torch.nn.Linear(48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(pred)
        assert out.dtype == torch.bfloat16
        loss = masked_pixel_loss(out, images, mask, 4)
    assert loss.dtype == torch.float32
    want = masked_pixel_loss_reference(out.detach().float(), images, mask, 4)
    assert_close(loss, want, torch.float32, "loss")
    loss.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


# ---- edge cases a demanding user hits ----

@pytest.mark.parametrize("backend", ["cpu", "torch", "triton", "cuda"])
def test_nan_in_a_masked_patch_propagates(backend, backend_device):
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    for where in ("pred", "images"):
        pred, images, mask = make_inputs(SHAPES[1], torch.float32, device, mask_kind="one")
        row = mask.nonzero()[0]
        if where == "pred":
            with torch.no_grad():
                pred[row[0], row[1], 5] = float("nan")
        else:  # pixel (0, 0) of channel 1 of that patch
            grid_w = SHAPES[1][3] // 4
            images[row[0], 1, (row[1] // grid_w) * 4, (row[1] % grid_w) * 4] = float("nan")
        loss, d_pred, _ = run(backend, pred, images, mask, 4, True)
        assert torch.isnan(loss), where
        assert torch.isnan(d_pred[row[0], row[1]]).any(), where


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_fused_backends_never_read_unmasked_patches(backend, backend_device, assert_close):
    """Documented difference from MAE's eager NaN·0 = NaN: a non-finite value in a kept (weight 0) patch is
    not read by the fused backends; the loss equals the loss with that value replaced, its gradient is 0."""
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    pred, images, mask = make_inputs(SHAPES[1], torch.float32, device)
    row = (mask == 0).nonzero()[0]
    clean, _, _ = run(backend, pred, images, mask, 4, True)
    with torch.no_grad():
        pred[row[0], row[1], 0] = float("nan")
    grid_w = SHAPES[1][3] // 4
    images[row[0], 1, (row[1] // grid_w) * 4 + 2, (row[1] % grid_w) * 4 + 3] = float("inf")
    loss, d_pred, _ = run(backend, pred, images, mask, 4, True)
    assert_close(loss.cpu(), clean.detach().double().cpu(), torch.float32, "loss")
    assert (d_pred[row[0], row[1]] == 0).all()
    reference = masked_pixel_loss(pred, images, mask, 4, backend="torch")
    assert torch.isnan(reference), "the torch backend keeps MAE's eager behaviour"


def test_zero_mask_raises():
    pred, images, mask = make_inputs(SHAPES[1], torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"mask.sum\(\) is 0: no patch is masked"):
        masked_pixel_loss(pred, images, torch.zeros_like(mask), 4)
    with pytest.raises(ValueError, match=r"mask.sum\(\) is 0"):
        masked_pixel_loss(pred, images, torch.zeros_like(mask, dtype=torch.bool), 4, backend="torch")


def test_images_and_mask_are_data():
    pred, images, mask = make_inputs(SHAPES[1], torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"images requires grad, but masked_pixel_loss differentiates with respect "
                                         r"to pred only .* pass images.detach\(\)"):
        masked_pixel_loss(pred, images.requires_grad_(), mask, 4)
    with pytest.raises(ValueError, match="mask requires grad"):
        masked_pixel_loss(pred, images.detach(), mask.requires_grad_(), 4)
    with torch.no_grad():  # no gradient wanted: nothing to complain about
        masked_pixel_loss(pred, images, mask, 4)


def test_module_wrapper():
    pred, images, mask = make_inputs(SHAPES[2], torch.float32, "cpu")
    criterion = MaskedPixelLoss(patch_size=8, norm_pix=False)
    assert "patch_size=8" in repr(criterion)
    torch.testing.assert_close(criterion(pred, images, mask), masked_pixel_loss(pred, images, mask, 8, False))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), channels=st.integers(1, 4), grid_h=st.integers(1, 4), grid_w=st.integers(1, 4),
       patch=st.sampled_from([1, 2, 3, 4]), norm_pix=st.booleans(), data=st.data())
def test_cpu_backend_property(batch, channels, grid_h, grid_w, patch, norm_pix, data):
    """Any shape, any 0/1 mask with a masked patch, either normalisation: the CPU backend equals the reference."""
    patch_len = channels * patch * patch
    norm_pix = norm_pix and patch_len >= 2
    num_patches = grid_h * grid_w
    bits = data.draw(st.lists(st.booleans(), min_size=batch * num_patches, max_size=batch * num_patches))
    mask = torch.tensor(bits, dtype=torch.float64).reshape(batch, num_patches)
    mask[0, data.draw(st.integers(0, num_patches - 1))] = 1
    gen = torch.Generator().manual_seed(patch_len * 7 + num_patches)
    images = torch.randn(batch, channels, grid_h * patch, grid_w * patch, generator=gen, dtype=torch.float64)
    pred = torch.randn(batch, num_patches, patch_len, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = masked_pixel_loss(pred, images, mask, patch, norm_pix, backend="cpu")
    ref = masked_pixel_loss_reference(pred, images, mask, patch, norm_pix)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, pred), torch.autograd.grad(ref, pred)):
        torch.testing.assert_close(a, b)


# ---- argument errors name the argument, the expectation and what arrived ----

def _good():
    pred, images, mask = make_inputs((2, 3, 32, 32, 4), torch.float32, "cpu")
    return dict(pred=pred, images=images, mask=mask, patch_size=4)


FLOATS = "float16/bfloat16/float32/float64"


@pytest.mark.parametrize("change,message", [
    (dict(images=torch.randn(3, 32, 32)), f"images must be {FLOATS} [B, C, H, W], got float32 [3, 32, 32]"),
    (dict(images=torch.randn(2, 3, 30, 32)), "image size 30x32 is not divisible by the patch size 4"),
    (dict(patch_size=0), "patch_size must be a positive int, got 0"),
    (dict(patch_size=4.0), "patch_size must be a positive int, got 4.0"),
    (dict(pred=torch.randn(2, 64, 47)), "pred must be [B, N, p*p*C] = [B, 64, 48] for 3x32x32 images and patch_size 4, "
                                        "got float32 [2, 64, 47]"),
    (dict(pred=torch.randn(3, 64, 48)), f"pred must be {FLOATS} [B, 64, 48] with B = 2 (from images)"),
    (dict(pred=torch.zeros(2, 64, 48, dtype=torch.int64)), f"pred must be {FLOATS} [B, 64, 48], got int64"),
    (dict(pred=torch.randn(64, 48)), f"pred must be {FLOATS} [B, 64, 48], got float32 [64, 48]"),
    (dict(mask=torch.ones(2, 63)), f"mask must be {FLOATS}/bool [B, 64], got float32 [2, 63]"),
    (dict(mask=torch.ones(2, 64, dtype=torch.int64)), f"mask must be {FLOATS}/bool [B, 64], got int64"),
    (dict(mask=torch.ones(2, 64, device="meta")), "mask must be on cpu like the other inputs"),
    (dict(pred=torch.randn(2, 64, 1), images=torch.randn(2, 1, 8, 8), patch_size=1),
     "norm_pix needs at least 2 values per patch (unbiased variance), got p*p*C = 1"),
])
def test_bad_arguments_are_named(change, message):
    args = {**_good(), **change}
    with pytest.raises(ValueError) as error:
        masked_pixel_loss(**args)
    assert message in str(error.value), str(error.value)
    assert str(error.value).startswith("vitfast.ops.masked_pixel_loss: ")
