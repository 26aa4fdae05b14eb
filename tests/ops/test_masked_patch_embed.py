"""masked_patch_embed: every backend against the reference, gradients, registration, errors (masking helpers:
test_masking.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitfast.ops import masked_patch_embed, masked_patch_embed_reference
from vitfast.ops.masked_patch_embed import BACKENDS

# (B, C, H, W, p, D, K, L): ragged B, K, D; p = 2, 4, 8, 16; non-square images; L != N.
SHAPES = [
    (3, 3, 8, 8, 2, 20, 5, 16),
    (2, 3, 32, 32, 4, 24, 13, 64),
    (1, 1, 16, 24, 8, 7, 3, 8),
    (2, 3, 32, 32, 16, 12, 3, 4),
    (17, 3, 16, 16, 4, 24, 9, 16),  # several CPU tiles and threads
]


def make_inputs(shape, dtype, device, seed=0, duplicates=True):
    batch, channels, height, width, patch, dim, kept, positions = shape
    gen = torch.Generator().manual_seed(seed)
    num_patches = (height // patch) * (width // patch)
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype=dtype, device=device).requires_grad_()
    images, weight = rand(batch, channels, height, width), rand(dim, channels, patch, patch)
    bias, pos_embed = rand(dim), rand(positions, dim)
    keep_idx = torch.stack([torch.randperm(num_patches, generator=gen)[:kept] for _ in range(batch)])
    pos_idx = torch.randint(0, positions, (batch, kept), generator=gen)
    if duplicates and kept > 1:
        keep_idx[0, -1] = keep_idx[0, 0]  # a duplicated patch and position: gradients must accumulate
        pos_idx[0, -1] = pos_idx[0, 0]
    return images, weight, bias, pos_embed, keep_idx.to(device), pos_idx.to(device)


def reference_with_grads(inputs, grad):
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs[:4]]
    out = masked_patch_embed_reference(*leaves, inputs[4].cpu(), inputs[5].cpu())
    return (out, *torch.autograd.grad(out, leaves, grad.double().cpu()))


def backend_cases():
    cases = []
    for backend in ("cpu", "torch", "triton", "cuda"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            cases.append((backend, dtype))
    return cases


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}H{}W{}p{}D{}K{}L{}".format(*s))
@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=lambda v: str(v).replace("torch.", ""))
def test_backend_matches_reference(backend, dtype, shape, assert_close, backend_device):
    device = backend_device(backend)
    if not BACKENDS.runs_on(backend, device):
        pytest.skip(f"backend {backend} cannot run on {device} in this install (needs a GPU or the build)")
    inputs = make_inputs(shape, dtype, device)
    out = masked_patch_embed(*inputs, backend=backend)
    assert out.dtype == dtype and out.shape == (shape[0], shape[6], shape[5])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
    grads = torch.autograd.grad(out, inputs[:4], grad)
    expected = reference_with_grads(inputs, grad.float())
    for name, actual, want in zip(("tokens", "images", "weight", "bias", "pos_embed"), (out, *grads), expected):
        assert actual.dtype == dtype, name
        assert_close(actual.cpu(), want, dtype, f"{backend}/{name}")


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_partial_gradients_and_optional_inputs(backend, assert_close, backend_device):
    """No bias, no pos_embed, frozen images: only the asked-for gradients are computed, all correct."""
    device = backend_device(backend)
    if not BACKENDS.runs_on(backend, device):
        pytest.skip(f"backend {backend} cannot run on {device}")
    images, weight, _, _, keep_idx, _ = make_inputs(SHAPES[0], torch.float32, device)
    images = images.detach()
    out = masked_patch_embed(images, weight, None, None, keep_idx, backend=backend)
    (d_weight,) = torch.autograd.grad(out.square().sum(), [weight])
    ref_weight = weight.detach().double().cpu().requires_grad_()
    ref = masked_patch_embed_reference(images.double().cpu(), ref_weight, None, None, keep_idx.cpu())
    (ref_d_weight,) = torch.autograd.grad(ref.square().sum(), [ref_weight])
    assert_close(out.cpu(), ref, torch.float32, "tokens")
    assert_close(d_weight.cpu(), ref_d_weight, torch.float32, "weight")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck_float64(backend):
    images, weight, bias, pos_embed, keep_idx, pos_idx = make_inputs((2, 1, 8, 8, 4, 3, 3, 5), torch.float64, "cpu")
    fn = lambda i, w, b, p: masked_patch_embed(i, w, b, p, keep_idx, pos_idx, backend=backend)
    assert torch.autograd.gradcheck(fn, (images, weight, bias, pos_embed))


def test_reference_backward_matches_autograd(assert_close):
    """The torch backend's closed-form backward equals autograd through the reference."""
    inputs = make_inputs(SHAPES[1], torch.float64, "cpu")
    out = masked_patch_embed(*inputs, backend="torch")
    grad = torch.randn_like(out)
    for name, a, b in zip("iwbp", torch.autograd.grad(out, inputs[:4], grad), reference_with_grads(inputs, grad)[1:]):
        assert_close(a, b, torch.float64, name)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    images, weight, bias, pos_embed, keep_idx, pos_idx = make_inputs(SHAPES[0], torch.float32, "cpu")
    weight = weight.detach().reshape(weight.shape[0], -1).requires_grad_()
    args = (images, weight, bias, pos_embed, keep_idx, pos_idx, 2, backend)
    torch.library.opcheck(torch.ops.vitfast.masked_patch_embed.default, args)


def test_torch_compile_matches_eager(assert_close):
    inputs = make_inputs(SHAPES[0], torch.float32, "cpu")
    fn = lambda *a: masked_patch_embed(*a, backend="cpu").square().sum()
    eager = torch.autograd.grad(fn(*inputs), inputs[:4])
    compiled = torch.compile(fn, fullgraph=True)
    grads = torch.autograd.grad(compiled(*inputs), inputs[:4])
    for a, b in zip(grads, eager):
        assert_close(a, b, torch.float32, "compiled")


def test_autocast_casts_to_autocast_dtype():
    images, weight, bias, pos_embed, keep_idx, _ = make_inputs(SHAPES[0], torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_patch_embed(images, weight, bias, pos_embed, keep_idx)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and images.grad.dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), channels=st.integers(1, 4), grid_h=st.integers(1, 5), grid_w=st.integers(1, 5),
       patch=st.sampled_from([1, 2, 3, 4]), dim=st.integers(1, 33), data=st.data())
def test_cpu_backend_property(batch, channels, grid_h, grid_w, patch, dim, data):
    """Any shape, any (duplicated, unordered) indices: the CPU backend equals the reference."""
    num_patches = grid_h * grid_w
    kept = data.draw(st.integers(0, 2 * num_patches))
    positions = data.draw(st.integers(1, 7))
    keep_idx = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, num_patches - 1), min_size=kept, max_size=kept),
                                              min_size=batch, max_size=batch)), dtype=torch.int64).reshape(batch, kept)
    pos_idx = torch.randint(0, positions, (batch, kept))
    gen = torch.Generator().manual_seed(kept)
    images = torch.randn(batch, channels, grid_h * patch, grid_w * patch, generator=gen, dtype=torch.float64)
    weight = torch.randn(dim, channels, patch, patch, generator=gen, dtype=torch.float64)
    bias, pos_embed = torch.randn(dim, dtype=torch.float64), torch.randn(positions, dim, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (images, weight, bias, pos_embed)]
    out = masked_patch_embed(*leaves, keep_idx, pos_idx, backend="cpu")
    ref = masked_patch_embed_reference(*leaves, keep_idx, pos_idx)
    torch.testing.assert_close(out, ref)
    if out.numel():
        grad = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
            torch.testing.assert_close(a, b)


# ---- argument errors name the argument, the expectation and what arrived ----

def _good():
    images, weight, bias, pos_embed, keep_idx, pos_idx = make_inputs(SHAPES[1], torch.float32, "cpu")
    return dict(images=images, weight=weight, bias=bias, pos_embed=pos_embed, keep_idx=keep_idx, pos_idx=pos_idx)


@pytest.mark.parametrize("change,message", [
    (dict(images=torch.randn(2, 3, 30, 32)), "image size 30x32 is not divisible by the patch size 4"),
    (dict(images=torch.randn(2, 1, 32, 32)), "weight must be"),
    (dict(images=torch.randn(3, 32, 32)), "images must be"),
    (dict(keep_idx=torch.zeros(2, 13)), "keep_idx must be int64 [B, K] with values in [0, 64), got float32 [2, 13]"),
    (dict(keep_idx=torch.full((2, 13), 64)), "keep_idx must be int64 [B, K] with values in [0, 64), got values in [64, 64]"),
    (dict(keep_idx=torch.zeros(3, 13, dtype=torch.int64)), "keep_idx must be int64 [B, K]"),
    (dict(pos_idx=torch.full((2, 13), -1)), "pos_idx must be int64 [B, K] with values in [0, 64)"),
    (dict(pos_idx=torch.zeros(2, 12, dtype=torch.int64)), "with K = 13"),
    (dict(bias=torch.randn(23)), "bias must be"),
    (dict(pos_embed=torch.randn(1, 64, 24)), "pos_embed must be"),
    (dict(pos_embed=torch.randn(64, 24, dtype=torch.float64)), "pos_embed must have the dtype of images"),
    (dict(weight=torch.randn(24, 47)), "weight must be [D, C*p*p]"),
])
def test_bad_arguments_are_named(change, message):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=None) as error:
        masked_patch_embed(**args)
    assert message in str(error.value), str(error.value)
