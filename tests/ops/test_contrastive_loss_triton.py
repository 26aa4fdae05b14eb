"""Launcher-level tests of the Triton kernels of contrastive_loss (vitfast.kernels.contrastive_loss).

Every kernel branch (one-chunk and chunked D, d anchors and d pool), every launch-table entry, fp32/fp16/bf16, the
three positive layouts of the op, output_mask subsets, anchors without positives or without any allowed column, the
launch count, the scratch memory and the AOT specs, against the kernel-level float64 reference (the torch backend).
Under the interpreter (no GPU) they run on CPU tensors with a few dozen rows; the whole file: ~10 s on 2 idle cores.
"""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from vitfast.kernels import contrastive_loss as cl  # noqa: E402
from vitfast.ops.contrastive_loss import BACKENDS, _layout  # noqa: E402

from _launch_count import _CountedKernel, _Recorder, count_launches  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INV_TEMPERATURE = 1 / 0.2
REFERENCE = BACKENDS("torch")


def make(A, M, D, seed=0, classes=4, self_rows=True):
    """Unit rows (as the op feeds them) anchors [A, D], pool [M, D]; labels in [0, classes); anchor_self a random
    pool row or -1."""
    gen = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(A, D, generator=gen, dtype=torch.float64), dim=1)
    pool = F.normalize(torch.randn(M, D, generator=gen, dtype=torch.float64), dim=1)
    anchor_labels = torch.randint(0, classes, (A,), generator=gen)
    pool_labels = torch.randint(0, classes, (M,), generator=gen)
    anchor_self = torch.randint(-1, M, (A,), generator=gen) if self_rows else torch.full((A,), -1)
    return anchors, pool, anchor_labels, pool_labels, anchor_self


def run_both(args, dtype, loss_scale=0.7, grad=2.0, mask=(True, True)):
    """((loss, lse, count, d_anchors, d_pool) of the triton launchers, the same of the float64 reference on the
    rounded inputs)."""
    anchors, pool, *ints = args
    anchors, pool = anchors.to(dtype), pool.to(dtype)
    on = lambda t: t.to(DEVICE).contiguous()  # noqa: E731
    scale = loss_scale / anchors.shape[0]
    loss, lse, count = cl.contrastive_loss_forward(on(anchors), on(pool), *map(on, ints), INV_TEMPERATURE, scale)
    grads = cl.contrastive_loss_backward(torch.tensor(grad, device=DEVICE), on(anchors), on(pool), *map(on, ints),
                                         lse, count, INV_TEMPERATURE, scale, list(mask))
    ref = REFERENCE.forward(anchors.double(), pool.double(), *ints, INV_TEMPERATURE, scale)
    ref_grads = REFERENCE.backward(torch.tensor(grad, dtype=torch.float64), anchors.double(), pool.double(), *ints,
                                   ref[1], ref[2], INV_TEMPERATURE, scale, list(mask))
    return (loss, lse, count, *grads), (*ref, *ref_grads)


def check(got, want, dtype, assert_close, label=""):
    loss, lse, count, d_anchors, d_pool = got
    assert loss.dtype == torch.float32 and loss.shape == () and lse.dtype == torch.float32
    assert count.dtype == torch.int32 and torch.equal(count.cpu(), want[2])
    for name, actual, expected in (("loss", loss, want[0]), ("lse", lse, want[1]), ("d_anchors", d_anchors, want[3]),
                                   ("d_pool", d_pool, want[4])):
        assert (actual is None) == (expected is None), f"{label} {name}"
        if actual is not None:
            assert torch.isfinite(actual).all(), f"{label} {name}"
            assert actual.dtype in (torch.float32, dtype)
            assert_close(actual.cpu(), expected, dtype, f"triton/{name} {label}")


# ---- every D class (d64 / d128 / d256: one chunk in 16 bits; chunked D > 256, and fp32) and dtype, ragged A, M, D ----
# A and M exceed one tile of the class's table (16 to 64 rows) and end ragged.
CLASS_SHAPES = {"d64": (37, 70, 40), "d128": (37, 70, 100), "d256": (70, 45, 200), "chunked": (70, 45, 300)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("klass", list(CLASS_SHAPES))
def test_every_class_and_dtype_matches_reference(klass, dtype, assert_close):
    A, M, D = CLASS_SHAPES[klass]
    assert cl.d_class(D) == klass
    if dtype == torch.bfloat16 and klass != "d64":  # same table entries as fp16; keeps the file fast
        pytest.skip("bf16 shares the fp16 entries (bf16 runs the d64 class and every layout test)")
    if dtype == torch.float32 and klass == "d256":
        assert [cl.FORWARD_CONFIG[k][dtype] for k in ("d256", "chunked")] == [cl.FORWARD_CONFIG["chunked"][dtype]] * 2
        assert cl.BACKWARD_CONFIG["d256"][dtype] == cl.BACKWARD_CONFIG["chunked"][dtype]
        pytest.skip("fp32 d256 runs the entries of fp32 chunked (several output chunks there too)")
    got, want = run_both(make(A, M, D, seed=1), dtype)
    check(got, want, dtype, assert_close, klass)


# ---- the op's three layouts (diagonal, ntxent, labels), built by the op itself ----
@pytest.mark.parametrize("positives", ["diagonal", "ntxent", "labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_layouts_match_reference(positives, dtype, assert_close):
    gen = torch.Generator().manual_seed(2)
    q, k = (F.normalize(torch.randn(19, 24, generator=gen, dtype=torch.float64), dim=1) for _ in range(2))
    labels = torch.randint(0, 5, (19,), generator=gen)
    if positives == "labels":
        labels[0] = 7  # alone in its class: one view, so an anchor without positives
        args = _layout(q, None, positives, labels, False)
    else:
        args = _layout(q, k, positives, None, False)
    got, want = run_both(args, dtype)
    if positives == "labels":
        assert got[2][0] == 0 and got[1][0] == 0
    check(got, want, dtype, assert_close, positives)


# ---- output_mask, and anchors that add nothing ----
@pytest.mark.parametrize("mask", [(True, False), (False, True), (False, False)], ids=str)
def test_output_mask_subsets(mask, assert_close, monkeypatch):
    args = make(20, 26, 24, seed=3)
    with count_launches(cl, monkeypatch) as launches:
        got, want = run_both(args, torch.float16, mask=mask)
    check(got, want, torch.float16, assert_close, str(mask))
    assert launches.count("triton:_contrastive_bwd_kernel") == sum(mask)


def test_no_positive_and_no_allowed_column(assert_close):
    """M = 1: anchor 0 excludes the only pool row (no allowed column), anchor 1 has another label (allowed, no
    positive), anchor 2 is a regular one. Anchors 0 and 1 get lse = 0, count = 0 and zero gradient; no NaN anywhere.
    Then A = 1 = M with the row excluded: loss 0 and zero gradients."""
    anchors, pool, _, _, _ = make(3, 1, 20, seed=4)
    args = (anchors, pool, torch.tensor([0, 1, 0]), torch.tensor([0]), torch.tensor([0, -1, -1]))
    for dtype in DTYPES:
        got, want = run_both(args, dtype)
        check(got, want, dtype, assert_close, "M = 1")
        assert got[2].tolist() == [0, 0, 1] and got[1][:2].tolist() == [0.0, 0.0]
        assert not got[3][:2].any() and torch.isfinite(got[4]).all()
    got, want = run_both((anchors[:1], pool, torch.tensor([0]), torch.tensor([0]), torch.tensor([0])), torch.float32)
    assert got[0].item() == 0.0 and not got[3].any() and not got[4].any() and got[2].item() == 0


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # the interpreter's numpy, on excluded columns
def test_large_logits_and_identical_rows_stay_finite(assert_close):
    """fp16 rows of norm 8 at temperature 0.05: logits up to 1280 (exp overflows fp32 without the running max);
    every pool row identical to an anchor."""
    anchors, _, labels, _, _ = make(24, 24, 16, seed=5, classes=3)
    anchors = anchors * 8
    args = (anchors, anchors.clone(), labels, labels.clone(), torch.arange(24))
    got, want = run_both(args, torch.float16)
    check(got, want, torch.float16, assert_close, "large logits")


def test_deterministic():
    args = make(37, 70, 40, seed=6)
    first, _ = run_both(args, torch.float16)
    second, _ = run_both(args, torch.float16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_float64_is_a_clear_error():
    anchors, pool, *ints = make(4, 4, 8)
    with pytest.raises(TypeError, match="takes float32/float16/bfloat16, got torch.float64"):
        cl.contrastive_loss_forward(anchors, pool, *ints, 1.0, 1.0)


# ---- launches and memory ----
def test_launch_count(monkeypatch):
    """Forward: the kernel, then the fixed-order sum of the per-anchor terms and its cast (3 launches). Backward:
    one launch per gradient, no host-side work."""
    anchors, pool, *ints = make(20, 26, 24, seed=7)
    anchors, pool = anchors.to(torch.float16).to(DEVICE), pool.to(torch.float16).to(DEVICE)
    ints = [t.to(DEVICE) for t in ints]
    with count_launches(cl, monkeypatch) as launches:
        _, lse, count = cl.contrastive_loss_forward(anchors, pool, *ints, INV_TEMPERATURE, 0.1)
    assert launches == ["triton:_contrastive_fwd_kernel", "sum", "_to_copy"]
    grad = torch.tensor(1.0, device=DEVICE)
    with count_launches(cl, monkeypatch) as launches:
        cl.contrastive_loss_backward(grad, anchors, pool, *ints, lse, count, INV_TEMPERATURE, 0.1, [True, True])
    assert launches == ["triton:_contrastive_bwd_kernel"] * 2


class _Allocations(_Recorder):
    """Largest number of elements of any tensor a torch op returns outside the Triton launches (the interpreter's
    own work inside a launch is not the GPU's memory)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not self.inside_triton:
                self.largest = max(self.largest, t.numel())
        return out


@contextlib.contextmanager
def largest_allocation(monkeypatch):
    recorder = _Allocations()
    for name in {spec.name for spec in cl.AOT_SPECS}:
        monkeypatch.setattr(cl, name, _CountedKernel(getattr(cl, name), name, recorder))
    with recorder:
        yield recorder
    monkeypatch.undo()


def test_no_buffer_scales_with_A_times_M(monkeypatch):
    """A = 60, M = 64, D = 8: no tensor made by the launchers (outputs, scratch) is larger than an input, while
    A x M logits would be 8x larger than the pool."""
    anchors, pool, *ints = make(60, 64, 8, seed=8)
    anchors, pool = anchors.float().to(DEVICE), pool.float().to(DEVICE)
    ints = [t.to(DEVICE) for t in ints]
    with largest_allocation(monkeypatch) as forward:
        _, lse, count = cl.contrastive_loss_forward(anchors, pool, *ints, INV_TEMPERATURE, 0.1)
    with largest_allocation(monkeypatch) as backward:
        cl.contrastive_loss_backward(torch.tensor(1.0, device=DEVICE), anchors, pool, *ints, lse, count,
                                     INV_TEMPERATURE, 0.1, [True, True])
    assert 0 < forward.largest <= 64 * 8 and 0 < backward.largest <= 64 * 8, (forward.largest, backward.largest)


# ---- launch tables and AOT specs ----
def test_tables_fit_the_benchmark_shapes():
    """NT-Xent at 2 x 2048 views, D = 128 and 2 x 8192 views, D = 256: 16-bit rows are one chunk with no idle lanes,
    fp32 chunks divide D, no tile has idle rows, and each kernel has at least 128 programs (a 132-SM GPU is about
    full)."""
    for rows, D in ((4096, 128), (16384, 256)):
        for dtype in DTYPES:
            fwd, bwd = cl.FORWARD_CONFIG[cl.d_class(D)][dtype], cl.BACKWARD_CONFIG[cl.d_class(D)][dtype]
            assert fwd["ONE_CHUNK"] == bwd["ONE_CHUNK"] == (dtype != torch.float32)
            if fwd["ONE_CHUNK"]:
                assert fwd["BLOCK_D"] == D == bwd["BLOCK_D"] == bwd["BLOCK_OUT"]
            assert D % fwd["BLOCK_D"] == 0 and D % bwd["BLOCK_D"] == 0 and D % bwd["BLOCK_OUT"] == 0
            assert rows % fwd["BLOCK_A"] == 0 and rows % fwd["BLOCK_M"] == 0 and rows % bwd["BLOCK_OTHER"] == 0
            assert rows // fwd["BLOCK_A"] >= 128 and rows // bwd["BLOCK_OWN"] >= 128


def test_one_chunk_entries_hold_the_whole_class():
    """A one-chunk entry must cover the widest row of its class (and the backward's two dots share one tile)."""
    for table in (cl.FORWARD_CONFIG, cl.BACKWARD_CONFIG):
        for klass, widest in cl.CLASSES.items():
            for cfg in table[klass].values():
                if cfg["ONE_CHUNK"]:
                    assert widest is not None and cfg["BLOCK_D"] >= widest and cfg.get("BLOCK_OUT", widest) == \
                        cfg["BLOCK_D"], (klass, cfg)


def test_aot_specs_cover_the_launch_tables():
    """Every kernel x D class x dtype x dot precision is in AOT_SPECS with the blocks, warps and stages the launchers
    use (so python -m vitfast.compile_check builds each of them)."""
    seen = set()
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for spec in cl.AOT_SPECS:
        label = spec.variant.split()[0]
        for klass in spec.variant.split()[-1].split("/"):  # one build may serve several classes (same entry)
            table = cl.FORWARD_CONFIG if spec.name == "_contrastive_fwd_kernel" else cl.BACKWARD_CONFIG
            cfg = table[klass][dtypes[label.split("-")[0]]]
            assert {k: v for k, v in spec.constexprs.items() if k.startswith("BLOCK_")} == \
                {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}, spec.variant
            assert (spec.num_warps, spec.num_stages) == (cfg["num_warps"], cfg["num_stages"]), spec.variant
            assert spec.constexprs["ONE_CHUNK"] == cfg["ONE_CHUNK"] and spec.tensor_cores == (label != "fp32")
            assert (spec.name, spec.constexprs.get("POOL"), klass, label) not in seen, spec.variant
            seen.add((spec.name, spec.constexprs.get("POOL"), klass, label))
    kernels = [("_contrastive_fwd_kernel", None), ("_contrastive_bwd_kernel", False), ("_contrastive_bwd_kernel", True)]
    assert seen == {(k, pool, klass, label) for k, pool in kernels for klass in CLASS_SHAPES
                    for label in ("fp32", "fp32-tf32", "fp16", "bf16")}
    assert set(CLASS_SHAPES) == set(cl.CLASSES)
