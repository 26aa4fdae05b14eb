"""self_attention: every backend against the float64 reference (values and d_qkv; fp64, fp32, fp16, bf16; ragged N,
heads and head sizes), the reference against timm's Attention and against autograd, the kernel's GEMM paths and
thread-count independence, NaN rows, what is saved for backward, registration (opcheck, torch.compile, autocast),
the ViT's attn_impl dispatch, and argument errors. Cost: ~10 s on 2 cores."""
import pytest
import torch
import torch.nn.functional as F

from vitfast.nn.vit import FUSED_MAX_TOKENS, Attention
from vitfast.ops import self_attention, self_attention_reference
from vitfast.ops.self_attention import BACKENDS, _reference_backward, _reference_forward

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
CPU_BUILT = BACKENDS.runs_on("cpu", torch.device("cpu"))
needs_cpu = pytest.mark.skipif(not CPU_BUILT, reason="vitfast._C is not built")

# (B, N, H, d): N = 1 (a lone CLS token), MAE's 17 kept tokens, odd lengths, one head, head sizes that are not powers
# of two (12) and DeiT-S's 64.
SHAPES = [(2, 1, 2, 4), (3, 17, 3, 16), (2, 50, 1, 12), (1, 65, 4, 8), (2, 197, 2, 64)]


def shape_id(shape):
    return "B{}N{}H{}d{}".format(*shape)


def skip_unless_runs(backend):
    if not BACKENDS.runs_on(backend, torch.device("cpu")):
        pytest.skip(f"backend {backend} does not run here")


def make_inputs(shape, seed=0, spread=2.0):
    """qkv [B, N, 3 H d] and an upstream gradient [B, N, H d] in float64; spread scales q and k so that the softmax
    is far from uniform (a uniform one hides errors in the scores)."""
    batch, tokens, heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads * head_dim, generator=gen, dtype=F64)
    qkv[:, :, :2] *= spread
    return qkv.reshape(batch, tokens, -1), torch.randn(batch, tokens, heads * head_dim, generator=gen, dtype=F64)


def expected(qkv, grad, heads):
    """(out, d_qkv) of the float64 reference through autograd."""
    leaf = qkv.detach().to(F64).requires_grad_()
    out = self_attention_reference(leaf, heads)
    out.backward(grad.to(F64))
    return out.detach(), leaf.grad


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_backend_matches_reference(shape, dtype, backend, assert_close):
    skip_unless_runs(backend)
    qkv, grad = make_inputs(shape)
    # Inputs rounded to the dtype first: the reference sees the same numbers the backend does.
    qkv, grad = qkv.to(dtype), grad.to(dtype)
    want_out, want_grad = expected(qkv, grad, shape[2])
    leaf = qkv.clone().requires_grad_()
    out = self_attention(leaf, shape[2], backend=backend)
    out.backward(grad)
    assert out.dtype == dtype and leaf.grad.dtype == dtype and out.shape == want_out.shape
    assert_close(out, want_out, dtype, f"{backend}/out")
    assert_close(leaf.grad, want_grad, dtype, f"{backend}/d_qkv")


def test_reference_is_timms_attention():
    """The reference with a qkv / proj pair is timm's Attention (its explicit, non-fused path)."""
    timm_attention = pytest.importorskip("timm.layers").Attention
    torch.manual_seed(0)
    theirs = timm_attention(48, num_heads=4, qkv_bias=True).double().eval()
    theirs.fused_attn = False
    x = torch.randn(3, 11, 48, dtype=F64)
    ours = theirs.proj(self_attention_reference(theirs.qkv(x), 4))
    torch.testing.assert_close(ours, theirs(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES[1:4], ids=shape_id)
def test_closed_form_backward_is_autograd_of_the_reference(shape):
    qkv, grad = make_inputs(shape, seed=1)
    out, lse = _reference_forward(qkv, shape[2], shape[3] ** -0.5)
    want_out, want_grad = expected(qkv, grad, shape[2])
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_reference_backward(grad, qkv, lse, shape[2], shape[3] ** -0.5), want_grad,
                               rtol=1e-10, atol=1e-12)


@needs_cpu
def test_scale_other_than_the_default(assert_close):
    qkv, grad = make_inputs((2, 9, 2, 8), seed=2)
    leaf = qkv.clone().requires_grad_()
    out = self_attention(leaf, 2, scale=0.3, backend="cpu")
    out.backward(grad)
    ref_leaf = qkv.clone().requires_grad_()
    q, k, v = ref_leaf.reshape(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2).reshape(2, 9, 16)
    ref.backward(grad)
    assert_close(out, ref, F64, "cpu/out")
    assert_close(leaf.grad, ref_leaf.grad, F64, "cpu/d_qkv")


@needs_cpu
def test_at_gemm_path_and_thread_count_give_the_same_bits(monkeypatch):
    """Each (b, h) is one thread's work in a fixed order: 1 or 2 threads give identical bits. The at::addmm_out GEMM
    path (builds without the BLAS symbols; VITFAST_CPU_GEMM=aten) agrees with the BLAS path."""
    qkv, grad = make_inputs((3, 33, 3, 16), seed=3)
    qkv, grad = qkv.float(), grad.float()

    def run():
        leaf = qkv.clone().requires_grad_()
        out = self_attention(leaf, 3, backend="cpu")
        out.backward(grad)
        return out.detach(), leaf.grad

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    monkeypatch.setenv("VITFAST_CPU_GEMM", "aten")
    for a, b in zip(run(), one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_nan_in_a_key_makes_every_row_nan(backend):
    """Every query attends to every key: a NaN key poisons every output row of its (b, h), and nothing else; the
    kernel's exp must not silently drop it."""
    skip_unless_runs(backend)
    qkv, _ = make_inputs((2, 7, 2, 4), seed=4)
    qkv = qkv.float()
    qkv[1, 3, 2 * 4 + 1] = float("nan")  # k of token 3, head 0, batch element 1
    out = self_attention(qkv, 2, backend=backend)
    assert out[1, :, :4].isnan().all()
    assert not out[0].isnan().any() and not out[1, :, 4:].isnan().any()


@needs_cpu
def test_saves_qkv_and_the_row_logsumexp_only():
    """No [B, H, N, N] tensor is kept for backward: the saved tensors are qkv itself and lse [B, H, N]."""
    qkv, _ = make_inputs((2, 40, 3, 8), seed=5)
    leaf = qkv.float().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        self_attention(leaf, 3, backend="cpu")
    assert sorted(tuple(t.shape) for t in saved) == [(2, 3, 40), (2, 40, 72)]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    skip_unless_runs(backend)
    qkv, grad = make_inputs((2, 5, 2, 4), seed=6)
    qkv, grad = qkv.float(), grad.float()
    torch.library.opcheck(torch.ops.vitfast.self_attention.default, (qkv.requires_grad_(), 2, 0.5, backend))
    _, lse = torch.ops.vitfast.self_attention(qkv, 2, 0.5, backend)
    torch.library.opcheck(torch.ops.vitfast.self_attention_backward.default,
                          (grad, qkv.detach(), lse, 2, 0.5, backend))


def test_torch_compile_fullgraph_matches_eager(assert_close):
    qkv, grad = make_inputs((2, 6, 2, 4), seed=7)
    qkv = qkv.float().requires_grad_()
    fn = lambda x: self_attention(x, 2)
    eager = fn(qkv)
    (eager_grad,) = torch.autograd.grad(eager, qkv, grad.float())
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(qkv)
    (grad_compiled,) = torch.autograd.grad(out, qkv, grad.float())
    assert_close(out, eager, F32, "compiled")
    assert_close(grad_compiled, eager_grad, F32, "compiled")


def test_autocast_bf16_on_cpu(assert_close):
    """Under autocast an fp32 qkv is rounded to bf16 first; the result is the op's on the bf16 inputs."""
    qkv, _ = make_inputs((2, 9, 2, 8), seed=8)
    qkv = qkv.float().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        out = self_attention(qkv, 2)
    assert out.dtype == BF16
    out.float().sum().backward()
    assert qkv.grad.dtype == F32
    torch.testing.assert_close(out, self_attention(qkv.detach().to(BF16), 2), rtol=0, atol=0)


# ---- the ViT's attention module: which implementation runs ----

def _attention(attn_impl, attn_drop=0.0, dtype=F32):
    torch.manual_seed(0)
    return Attention(32, 4, attn_drop=attn_drop, attn_impl=attn_impl).to(dtype)


def _qkv(tokens, dtype=F32):
    return torch.randn(2, tokens, 96).to(dtype)


@needs_cpu
def test_vit_auto_uses_the_fused_op_on_cpu_and_matches_sdpa(assert_close):
    x = torch.randn(3, 17, 32)
    auto, sdpa = _attention("auto"), _attention("sdpa")
    assert auto.uses_fused_op(_qkv(17)) and not sdpa.uses_fused_op(_qkv(17))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = auto(x1), sdpa(x2)
    a.sum().backward(), b.sum().backward()
    assert_close(a, b, F32, "cpu/module")
    assert_close(x1.grad, x2.grad, F32, "cpu/module")
    for (name, p), q in zip(auto.named_parameters(), sdpa.parameters()):
        assert_close(p.grad, q.grad, F32, f"cpu/{name}")


@needs_cpu
def test_vit_auto_picks_by_dtype_and_length_as_measured():
    """fp32 up to FUSED_MAX_TOKENS[fp32], bf16 / fp16 up to theirs (SDPA's bf16 backward is the slow one on a CPU),
    fp64 never; attention dropout in training and GPU tensors take SDPA."""
    auto = _attention("auto")
    for dtype, limit in FUSED_MAX_TOKENS.items():
        assert auto.uses_fused_op(_qkv(limit, dtype)) and not auto.uses_fused_op(_qkv(limit + 1, dtype))
    assert FUSED_MAX_TOKENS[BF16] > FUSED_MAX_TOKENS[F32]
    assert not auto.uses_fused_op(_qkv(17, F64))
    dropout = _attention("auto", attn_drop=0.1)
    assert not dropout.train().uses_fused_op(_qkv(5))  # attention dropout in training: SDPA
    assert dropout.eval().uses_fused_op(_qkv(5))  # no dropout in eval
    assert _attention("vitfast").uses_fused_op(_qkv(5000, F64))  # asked for explicitly
    with pytest.raises(ValueError, match='attn_impl="vitfast" has no attention dropout'):
        _attention("vitfast", attn_drop=0.1)


def test_vit_under_autocast_decides_on_the_projection_dtype(monkeypatch):
    """Under bf16 autocast the qkv projection's output is bf16: the bf16 limit applies, not fp32's."""
    auto = _attention("auto")
    seen = []
    monkeypatch.setattr(auto, "uses_fused_op", lambda qkv: seen.append(qkv.dtype) or False)
    with torch.autocast("cpu", dtype=BF16):
        auto(torch.randn(2, 5, 32))
    assert seen == [BF16]


# ---- argument errors name the argument, the expectation and what arrived ----

@pytest.mark.parametrize("args, kwargs, message", [
    ((torch.randn(2, 5, 24, 1), 2), {}, "qkv must be float16/bfloat16/float32/float64 [B, N, 3D], got float32"),
    ((torch.randn(2, 5, 20), 2), {}, "20 is not a positive multiple of 6"),
    ((torch.randn(2, 5, 0), 2), {}, "0 is not a positive multiple of 6"),
    ((torch.randint(0, 3, (2, 5, 24)), 2), {}, "qkv must be float16/bfloat16/float32/float64"),
    ((torch.randn(2, 5, 24), 0), {}, "num_heads must be a positive int, got 0"),
    ((torch.randn(2, 5, 24), 2.0), {}, "num_heads must be a positive int, got 2.0"),
    ((torch.randn(2, 5, 24), 2), {"scale": float("nan")}, "scale must be a positive finite number, got nan"),
    ((torch.randn(2, 5, 24), 2), {"scale": -1.0}, "scale must be a positive finite number, got -1.0"),
    (("qkv", 2), {}, "qkv must be a tensor"),
])
def test_errors_are_one_line(args, kwargs, message):
    with pytest.raises(ValueError, match="vitfast.ops.self_attention: ") as error:
        self_attention(*args, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
