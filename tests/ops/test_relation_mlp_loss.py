"""relation_mlp_loss: every backend against the dense reference, both tasks and activations, masks, gradients,
registration, errors."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from vitfast.ops import (relation_mlp_loss, relation_mlp_loss_reference, relation_mlp_outputs, relation_offsets,
                         relation_targets)
from vitfast.ops.relation_mlp_loss import BACKENDS, TASK_OUTPUTS

# (B, N, S, H, layout, options). layout: "identity" (positions None, N = S*S), "shuffled" (a permutation of the
# grid), "subset" (N of the S*S cells in random order). options: "mask" (random [B, N, N] pair mask), "offdiag"
# ([N, N] without the diagonal), "smooth" (label smoothing 0.1, direction only).
SHAPES = [
    (2, 16, 4, 24, "identity", ()),
    (2, 25, 5, 33, "shuffled", ("mask",)),            # ragged H
    (1, 37, 8, 16, "subset", ("offdiag", "smooth")),  # ragged N drawn from an 8x8 grid
    (3, 9, 3, 8, "subset", ("mask", "smooth")),
]
CASES = [(task, activation) for task in ("direction", "offset") for activation in ("gelu", "relu")]


def shape_id(shape):
    batch, n, side, hidden, layout, options = shape
    return f"B{batch}N{n}S{side}H{hidden}-{layout}" + "".join("-" + o for o in options)


def make_inputs(shape, dtype, task="direction", seed=0):
    batch, n, side, hidden, layout, options = shape
    gen = torch.Generator().manual_seed(seed)
    outputs = TASK_OUTPUTS[task]
    u = torch.randn(batch, n, hidden, generator=gen).to(dtype)
    v = torch.randn(batch, n, hidden, generator=gen).to(dtype)
    weight = (torch.randn(outputs, hidden, generator=gen) / math.sqrt(hidden)).to(dtype)
    bias = (torch.randn(outputs, generator=gen) * 0.1).to(dtype)
    kwargs = dict(grid_size=side, task=task)
    if layout != "identity":
        kwargs["positions"] = torch.stack([torch.randperm(side * side, generator=gen)[:n] for _ in range(batch)])
    if "mask" in options:
        kwargs["pair_mask"] = torch.rand(batch, n, n, generator=gen) < 0.6
    if "offdiag" in options:
        kwargs["pair_mask"] = ~torch.eye(n, dtype=torch.bool)
    if "smooth" in options and task == "direction":
        kwargs["label_smoothing"] = 0.1
    return (u, v, weight, bias), kwargs


def selected_pairs(u, kwargs):
    batch, n = u.shape[:2]
    mask = kwargs.get("pair_mask")
    return batch * n * n if mask is None else int(mask.expand(batch, n, n).sum())


def reference_with_grads(inputs, kwargs, grad):
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    loss = relation_mlp_loss_reference(*leaves, **kwargs)
    return (loss, *torch.autograd.grad(loss, leaves, grad))


def skip_unless_runs(backend):
    if not BACKENDS.runs_on(backend, torch.device("cpu")):
        pytest.skip(f"backend {backend} cannot run here (vitfast._C built without relation_mlp_loss?)")


def backend_cases():
    return [("torch", torch.float32), ("torch", torch.float16), ("cpu", torch.float32), ("cpu", torch.float16),
            ("cpu", torch.bfloat16)]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("task,activation", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=lambda v: str(v).replace("torch.", ""))
def test_backend_matches_reference(backend, dtype, task, activation, shape, assert_close):
    skip_unless_runs(backend)
    inputs, kwargs = make_inputs(shape, dtype, task)
    inputs = [t.requires_grad_() for t in inputs]
    loss = relation_mlp_loss(*inputs, activation=activation, backend=backend, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    # d(count * loss): gradients of the pair *sum*, O(1) per element, so the tolerances mean something.
    grad = torch.tensor(float(selected_pairs(inputs[0], kwargs)))
    grads = torch.autograd.grad(loss, inputs, grad)
    want_loss, *want_grads = reference_with_grads(inputs, dict(kwargs, activation=activation), grad.double())
    assert_close(loss.detach(), want_loss, dtype, f"{backend}/loss")
    for name, got, want in zip(("d_u", "d_v", "d_weight", "d_bias"), grads, want_grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        # d_weight, d_bias sum over all N^2 pairs: compare relative to their magnitude
        assert_close(got, want, dtype, f"{backend}/{name}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_accuracy_matches_reference(backend):
    skip_unless_runs(backend)
    inputs, kwargs = make_inputs((2, 25, 5, 12, "shuffled", ("mask",)), torch.float32)
    inputs[2].mul_(8.0)  # a confident head, so that some argmaxes hit their targets
    loss, accuracy = relation_mlp_loss(*inputs, return_accuracy=True, backend=backend, **kwargs)
    want, want_accuracy = relation_mlp_loss_reference(*inputs, return_accuracy=True, **kwargs)
    torch.testing.assert_close(loss, want)
    assert accuracy.dtype == torch.float32 and not accuracy.requires_grad
    assert accuracy.item() == pytest.approx(want_accuracy.item(), abs=1e-6)


def test_reference_is_the_written_out_pair_mlp():
    """h = gelu(A z_i + B z_j + b), out = W h + c; CE against RelViT's direction classes / MSE against the offset."""
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64)
    a, bmat = torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randn(5, 6, generator=gen,
                                                                                  dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    positions = torch.stack([torch.randperm(9, generator=gen) for _ in range(2)])
    for task, outputs in TASK_OUTPUTS.items():
        weight = torch.randn(outputs, 5, generator=gen, dtype=torch.float64)
        bias = torch.randn(outputs, generator=gen, dtype=torch.float64)
        out = torch.empty(2, 9, 9, outputs, dtype=torch.float64)
        for n in range(2):
            for i in range(9):
                for j in range(9):
                    pre = a @ z[n, i] + bmat @ z[n, j] + b
                    out[n, i, j] = weight @ (0.5 * pre * (1 + torch.erf(pre / math.sqrt(2)))) + bias
        u, v = z @ a.T, z @ bmat.T + b
        torch.testing.assert_close(relation_mlp_outputs(u, v, weight, bias, "gelu"), out)
        got = relation_mlp_loss_reference(u, v, weight, bias, positions, grid_size=3, task=task)
        if task == "direction":
            want = F.cross_entropy(out.permute(0, 3, 1, 2), relation_targets(positions, 3))
        else:
            rows, cols = positions // 3, positions % 3
            offsets = torch.stack((rows[:, :, None] - rows[:, None, :], cols[:, :, None] - cols[:, None, :]), -1)
            want = ((out - offsets / 2.0) ** 2).mean()
            assert relation_offsets(positions, 3).abs().max() == 1.0  # normalised to [-1, 1]
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("task,activation", CASES, ids=lambda v: str(v))
def test_gradcheck_float64(backend, task, activation):
    skip_unless_runs(backend)
    inputs, kwargs = make_inputs((2, 5, 3, 4, "subset", ("mask", "smooth")), torch.float64, task)
    inputs = [t.requires_grad_() for t in inputs]
    fn = lambda *args: relation_mlp_loss(*args, activation=activation, backend=backend, **kwargs)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_partial_gradients(backend, assert_close):
    """Only the asked-for gradients are computed, and they are right."""
    skip_unless_runs(backend)
    inputs, kwargs = make_inputs((2, 16, 4, 10, "shuffled", ("mask",)), torch.float32, "offset")
    leaves = [t.double().requires_grad_() for t in inputs]
    want = torch.autograd.grad(relation_mlp_loss_reference(*leaves, **kwargs), leaves)
    for index in range(4):
        args = [t.detach().clone() for t in inputs]
        args[index].requires_grad_()
        (grad,) = torch.autograd.grad(relation_mlp_loss(*args, backend=backend, **kwargs), (args[index],))
        assert_close(grad * 1e3, want[index] * 1e3, torch.float32, f"grad {index}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_tiles_never_hold_all_pairs(backend, monkeypatch, assert_close):
    """With a tiny tile budget the torch backend walks one query row per tile (the C++ backend tiles on its own);
    the result does not change."""
    skip_unless_runs(backend)
    # vitfast.ops.relation_mlp_loss is the function (the package re-exports it): take the module itself.
    module = sys.modules["vitfast.ops.relation_mlp_loss"]
    monkeypatch.setattr(module, "_TILE_ELEMENTS", 64)
    inputs, kwargs = make_inputs((2, 25, 5, 7, "shuffled", ("mask", "smooth")), torch.float64)
    inputs = [t.requires_grad_() for t in inputs]
    ours = relation_mlp_loss(*inputs, backend=backend, **kwargs)
    want = relation_mlp_loss_reference(*inputs, **kwargs)
    assert_close(ours, want, torch.float64, "loss")
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(want, inputs)):
        assert_close(a, b, torch.float64, "grad")


def test_cpu_is_bitwise_reproducible_across_thread_counts():
    """Forward: per-row sums added in a fixed order; backward: one batch element per work item, dW / dbias partials
    summed in batch order. So 1 and 2 threads give the same bits, and both match the reference."""
    skip_unless_runs("cpu")
    inputs, kwargs = make_inputs((3, 49, 7, 40, "shuffled", ("mask", "smooth")), torch.float32)
    inputs = [t.requires_grad_() for t in inputs]
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            loss = relation_mlp_loss(*inputs, backend="cpu", **kwargs)
            runs.append((loss, *torch.autograd.grad(loss, inputs)))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    want = relation_mlp_loss_reference(*leaves, **kwargs)
    for got, expected in zip(runs[0], (want, *torch.autograd.grad(want, leaves))):
        torch.testing.assert_close(got.double() * 1e3, expected * 1e3, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("task", ["direction", "offset"])
def test_empty_pair_mask_gives_zero(backend, task):
    skip_unless_runs(backend)
    inputs, kwargs = make_inputs((2, 16, 4, 8, "identity", ()), torch.float32, task)
    inputs = [t.requires_grad_() for t in inputs]
    loss = relation_mlp_loss(*inputs, pair_mask=torch.zeros(16, 16, dtype=torch.bool), backend=backend, **kwargs)
    assert loss.item() == 0.0
    for grad in torch.autograd.grad(loss, inputs):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_batched_and_shared_masks_agree():
    inputs, kwargs = make_inputs((3, 25, 5, 10, "shuffled", ()), torch.float64)
    mask = torch.rand(25, 25, generator=torch.Generator().manual_seed(1)) < 0.5
    for backend in ("torch", "cpu"):
        if not BACKENDS.runs_on(backend, torch.device("cpu")):
            continue
        shared = relation_mlp_loss(*inputs, pair_mask=mask, backend=backend, **kwargs)
        batched = relation_mlp_loss(*inputs, pair_mask=mask.expand(3, 25, 25).clone(), backend=backend, **kwargs)
        torch.testing.assert_close(shared, batched)


def test_offset_grid_of_one_cell():
    """S = 1: every offset is 0 (no division by S - 1 = 0)."""
    u, v = torch.randn(1, 1, 4), torch.randn(1, 1, 4)
    weight, bias = torch.randn(2, 4), torch.randn(2)
    loss = relation_mlp_loss(u, v, weight, bias, task="offset")
    out = relation_mlp_outputs(u, v, weight, bias)
    torch.testing.assert_close(loss, out.square().mean())


# ---- registration: opcheck, torch.compile, autocast ----

@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("task", ["direction", "offset"])
def test_opcheck(backend, task):
    skip_unless_runs(backend)
    inputs, kwargs = make_inputs((2, 9, 4, 6, "subset", ("mask",)), torch.float32, task)
    inputs = [t.requires_grad_() for t in inputs]
    args = (*inputs, kwargs["positions"], kwargs["pair_mask"], 4, task, "gelu", 0.0, backend)
    torch.library.opcheck(torch.ops.vitfast.relation_mlp_loss.default, args)
    args = (*inputs, None, None, 3, task, "relu", 0.1 if task == "direction" else 0.0, backend)
    torch.library.opcheck(torch.ops.vitfast.relation_mlp_loss.default, args)


def test_torch_compile_matches_eager(assert_close):
    inputs, kwargs = make_inputs((2, 16, 4, 8, "shuffled", ("mask", "smooth")), torch.float32)
    inputs = [t.requires_grad_() for t in inputs]
    fn = lambda u, v, w, b, positions, mask: relation_mlp_loss(u, v, w, b, positions, grid_size=4, pair_mask=mask,
                                                               label_smoothing=0.1)
    eager = fn(*inputs, kwargs["positions"], kwargs["pair_mask"])
    eager_grads = torch.autograd.grad(eager, inputs)
    out = torch.compile(fn, fullgraph=True)(*inputs, kwargs["positions"], kwargs["pair_mask"])
    for a, b in zip((out, *torch.autograd.grad(out, inputs)), (eager, *eager_grads)):
        assert_close(a * 1e3, b * 1e3, torch.float32, "compiled")


def test_autocast_casts_to_autocast_dtype():
    inputs, kwargs = make_inputs((2, 16, 4, 8, "identity", ()), torch.float32)
    inputs = [t.requires_grad_() for t in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = relation_mlp_loss(*inputs, **kwargs)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(t.grad.dtype == torch.float32 for t in inputs)


# ---- argument errors name the argument, the expectation and what arrived ----

def _good():
    (u, v, weight, bias), kwargs = make_inputs((2, 16, 5, 6, "subset", ()), torch.float32)
    return dict(u=u, v=v, weight=weight, bias=bias, **kwargs)


@pytest.mark.parametrize("change,message", [
    (dict(u=torch.randn(2, 16)), "u must be float16/bfloat16/float32/float64 [B, N, H]"),
    (dict(v=torch.randn(2, 15, 6)), "v must be float16/bfloat16/float32/float64 [B, N, H] with N = 16"),
    (dict(weight=torch.randn(2, 6)), "weight must be float16/bfloat16/float32/float64 [9, H]"),
    (dict(weight=torch.randn(9, 5)), "weight must be float16/bfloat16/float32/float64 [9, H] with H = 6"),
    (dict(bias=torch.randn(2)), "bias must be float16/bfloat16/float32/float64 [9]"),
    (dict(v=torch.randn(2, 16, 6, dtype=torch.float64)), "v must have the dtype of u"),
    (dict(task="offset"), "weight must be float16/bfloat16/float32/float64 [2, H]"),
    (dict(task="angle"), "task must be one of ('direction', 'offset'), got 'angle'"),
    (dict(activation="tanh"), "activation must be one of ('gelu', 'relu'), got 'tanh'"),
    (dict(positions=torch.zeros(2, 16)), "positions must be int64 [B, N] with values in [0, 25), got float32 [2, 16]"),
    (dict(positions=torch.full((2, 16), 25)),
     "positions must be int64 [B, N] with values in [0, 25), got values in [25, 25]"),
    (dict(grid_size=None), "grid_size (the side S of the token grid) is required with positions"),
    (dict(grid_size=0), "grid_size must be a positive int"),
    (dict(pair_mask=torch.ones(16, 16)), "pair_mask must be bool [N, N]"),
    (dict(pair_mask=torch.ones(3, 16, 16, dtype=torch.bool)), "pair_mask must be bool [B, N, N] with B = 2"),
    (dict(label_smoothing=1.5), "label_smoothing must be in [0, 1]"),
    (dict(positions=None, grid_size=None, u=torch.randn(2, 15, 6), v=torch.randn(2, 15, 6)),
     "N = 15 tokens is not a square grid; pass grid_size"),
    (dict(positions=None, grid_size=3), "N = 16 tokens do not fit a 3x3 grid"),
])
def test_bad_arguments_are_named(change, message):
    args = {**_good(), **change}
    with pytest.raises(ValueError) as error:
        relation_mlp_loss(**args)
    assert message in str(error.value), str(error.value)
    assert str(error.value).startswith("vitfast.ops.relation_mlp_loss: ")


def test_offset_refuses_direction_options():
    args = _good()
    args["task"], args["weight"], args["bias"] = "offset", torch.randn(2, 6), torch.randn(2)
    for extra in (dict(label_smoothing=0.1), dict(return_accuracy=True)):
        with pytest.raises(ValueError, match='apply to task="direction" only'):
            relation_mlp_loss(**args, **extra)

# ---- the triton backend (under TRITON_INTERPRET=1 on CPU-only machines; tiny shapes keep the interpreter fast) ----

TRITON_SHAPES = [
    (2, 5, 3, 8, "subset", ()),
    (2, 9, 3, 20, "shuffled", ("mask",)),            # ragged H (two hidden chunks), two j-tiles
    (2, 7, 4, 13, "subset", ("offdiag", "smooth")),
]


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=shape_id)
@pytest.mark.parametrize("task,activation", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_triton_matches_reference(dtype, task, activation, shape, assert_close):
    skip_unless_runs("triton")
    inputs, kwargs = make_inputs(shape, dtype, task)
    inputs = [t.requires_grad_() for t in inputs]
    loss = relation_mlp_loss(*inputs, activation=activation, backend="triton", **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    grad = torch.tensor(float(selected_pairs(inputs[0], kwargs)))
    grads = torch.autograd.grad(loss, inputs, grad)
    want_loss, *want_grads = reference_with_grads(inputs, dict(kwargs, activation=activation), grad.double())
    assert_close(loss.detach(), want_loss, dtype, "triton/loss")
    for name, got, want in zip(("d_u", "d_v", "d_weight", "d_bias"), grads, want_grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close(got, want, dtype, f"triton/{name}")


def test_triton_accuracy_and_partial_gradients(assert_close):
    skip_unless_runs("triton")
    inputs, kwargs = make_inputs((2, 9, 3, 12, "shuffled", ("mask",)), torch.float32)
    inputs[2].mul_(8.0)  # a confident head, so that some argmaxes hit their targets
    loss, accuracy = relation_mlp_loss(*inputs, return_accuracy=True, backend="triton", **kwargs)
    want, want_accuracy = relation_mlp_loss_reference(*inputs, return_accuracy=True, **kwargs)
    torch.testing.assert_close(loss, want)
    assert accuracy.dtype == torch.float32 and not accuracy.requires_grad
    assert accuracy.item() == pytest.approx(want_accuracy.item(), abs=1e-6)
    leaves = [t.clone().requires_grad_(i == 1) for i, t in enumerate(inputs)]  # d_v only
    (d_v,) = torch.autograd.grad(relation_mlp_loss(*leaves, backend="triton", **kwargs), (leaves[1],))
    assert_close(d_v, reference_with_grads(inputs, kwargs, torch.tensor(1.0, dtype=torch.float64))[2],
                 torch.float32, "triton/d_v")


def test_triton_empty_pair_mask_gives_zero():
    skip_unless_runs("triton")
    inputs, kwargs = make_inputs((2, 6, 3, 8, "subset", ()), torch.float32)
    inputs = [t.requires_grad_() for t in inputs]
    loss = relation_mlp_loss(*inputs, pair_mask=torch.zeros(6, 6, dtype=torch.bool), backend="triton", **kwargs)
    assert loss.item() == 0.0
    assert all(g.abs().max().item() == 0.0 for g in torch.autograd.grad(loss, inputs))


def _triton_kernels():
    pytest.importorskip("triton")
    from vitfast.kernels import relation_mlp_loss as kernels
    return kernels


def test_triton_backward_scratch_is_bounded():
    """The backward's fp32 buffers are O(B * N * H): d u plus at most MAX_SPLITS partials of d v (482 MB at
    B = 64, N = 196, H = 384 when every i-tile had its own d v partial)."""
    kernels = _triton_kernels()
    batch, n, hidden = 64, 196, 384
    shapes = kernels.backward_scratch(batch, n, hidden, torch.float16)
    total = sum(math.prod(shape) for shape in shapes.values()) * 4
    one = batch * n * hidden * 4  # bytes of one fp32 [B, N, H]
    assert shapes["dv_part"][1] <= kernels.MAX_SPLITS
    assert total <= (1 + kernels.MAX_SPLITS) * one + batch * kernels.MAX_SPLITS * 17 * hidden * 4
    assert total < 482e6 / 4
    # a big batch fills the GPU on its own: one partial, no more scratch than the gradients themselves
    big = kernels.backward_scratch(kernels.TARGET_PROGRAMS, n, hidden, torch.float16)
    assert big["dv_part"][1] == 1
    # every program gets at least one i-tile
    for batch in (1, 3, 64, 300):
        for n in (1, 8, 9, 40, 196):
            splits, per_split = kernels.backward_split(batch, n, torch.float32)
            tiles = -(-n // kernels.BACKWARD_CONFIG[torch.float32]["BLOCK_I"])
            assert (splits - 1) * per_split < tiles <= splits * per_split


@pytest.mark.parametrize("splits", [1, 2], ids=lambda s: f"target{s}")
def test_triton_backward_splits(splits, monkeypatch, assert_close):
    """Programs that loop over several i-tiles (one split per batch element, or ragged splits: 3 i-tiles in 2)
    give the reference gradients; the fp32 buffers the launcher allocates are exactly backward_scratch()."""
    skip_unless_runs("triton")
    kernels = _triton_kernels()
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", splits)  # batch 1: `splits` programs wanted
    inputs, kwargs = make_inputs((1, 20, 5, 12, "shuffled", ("mask", "smooth")), torch.float32, seed=2)
    inputs = [t.requires_grad_() for t in inputs]
    loss = relation_mlp_loss(*inputs, backend="triton", **kwargs)
    allocated = []
    empty = torch.empty

    def recording_empty(*args, **kw):
        out = empty(*args, **kw)
        allocated.append((tuple(out.shape), out.dtype))
        return out

    grad = torch.tensor(float(selected_pairs(inputs[0], kwargs)))
    torch.empty = recording_empty
    try:
        grads = torch.autograd.grad(loss, inputs, grad)
    finally:
        torch.empty = empty
    assert kernels.backward_split(1, 20, torch.float32) == [(1, 3), (2, 2)][splits - 1]  # 3 i-tiles
    scratch = kernels.backward_scratch(1, 20, 12, torch.float32)
    assert sorted(s for s, d in allocated if d == torch.float32) == sorted(scratch.values())
    _, *want = reference_with_grads(inputs, kwargs, grad.double())
    for name, got, expected in zip(("d_u", "d_v", "d_weight", "d_bias"), grads, want):
        assert_close(got, expected, torch.float32, f"triton/{name}")


@pytest.mark.parametrize("task", ["direction", "offset"])
def test_triton_tf32_branch(task, request, assert_close):
    """fp32 dots as TF32 (matmul precision "high"); exact fp32 under the interpreter, fp16-like on a GPU."""
    skip_unless_runs("triton")
    kernels = _triton_kernels()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    request.addfinalizer(lambda: torch.set_float32_matmul_precision(before))
    assert kernels._scalars(torch.empty(1, 4, 8), None, None, 2, task, "gelu", 0.0)["INPUT_PRECISION"] == "tf32"
    inputs, kwargs = make_inputs((1, 9, 3, 8, "shuffled", ("mask",)), torch.float32, task)
    inputs = [t.requires_grad_() for t in inputs]
    loss = relation_mlp_loss(*inputs, backend="triton", **kwargs)
    grad = torch.tensor(float(selected_pairs(inputs[0], kwargs)))
    grads = torch.autograd.grad(loss, inputs, grad)
    want_loss, *want = reference_with_grads(inputs, kwargs, grad.double())
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    assert_close(loss.detach(), want_loss, dtype, "loss")
    for got, expected in zip(grads, want):
        assert_close(got, expected, dtype, "grad")


def test_triton_aot_specs_cover_the_launch_tables():
    kernels = _triton_kernels()
    tables = {"_mlp_fwd_kernel": kernels.FORWARD_CONFIG, "_mlp_bwd_kernel": kernels.BACKWARD_CONFIG}
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    seen = set()
    for spec in kernels.AOT_SPECS:
        dtype = dtypes[spec.variant.split("-")[0]]
        cfg = tables[spec.name][dtype]
        assert {key: spec.constexprs[key] for key in cfg if key.startswith("BLOCK_")} == \
            {key: value for key, value in cfg.items() if key.startswith("BLOCK_")}, spec.variant
        assert (spec.num_warps, spec.num_stages) == (cfg["num_warps"], cfg["num_stages"]), spec.variant
        seen.add((spec.name, dtype, spec.constexprs["INPUT_PRECISION"]))
    assert seen == {(name, dtype, precision) for name in tables
                    for dtype, precision in ((torch.float32, "ieee"), (torch.float32, "tf32"),
                                             (torch.float16, "tf32"), (torch.bfloat16, "tf32"))}
