"""Launcher-level tests of the Triton kernels of dino_loss (vitfast.kernels.dino_loss), and the op on them.

softmax_rows (one K split and several) and softmax_columns for every width class (d64 / d128 / d256 one chunk in 16
bits; chunked above 256, and fp32) and fp32 / fp16 / bf16, ragged R, K, d, e, R = 1, K = 1, with raw keys / values
(row norms 0.5 to 2 times unit), key_scale / value_scale that are not 1 and softmax_columns adding to a nonzero out,
against the float64 torch primitives on the same rounded inputs; the whole dino_loss(..., backend="triton") and its gradients against
dino_loss_reference; the launch count, the scratch memory, the tile tables at DINO's benchmark shape and the AOT specs.
Under the interpreter (no GPU) the shapes are a few dozen rows; the whole file: about 50 s on 2 loaded cores.
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from vitfast.kernels import dino_loss as kd  # noqa: E402

from _launch_count import count_launches  # noqa: E402

op = importlib.import_module("vitfast.ops.dino_loss")  # the module (vitfast.ops.dino_loss is also the function)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
F32, F16, BF16 = DTYPES
SCALE = 1 / 0.1  # DINO's student temperature

# Normwise error bands (max|actual - expected| / max|expected|) of these tests until tests/ops/conftest.py TOLERANCES
# has dino_loss rows (assert_close checks against those too): 4x (bf16: 2x) the largest error measured over this file
# on an AMD EPYC CPU (2 cores), Triton under its interpreter with the bf16 mends, rounded up (contract v2: raw keys
# and values with key / value scales). Largest measured (lse / out / columns / loss / d_student / d_prototypes):
# fp32 8.4e-8 / 4.0e-7 / 6.9e-7 / 1.4e-7 / 8.4e-7 / 1.2e-6; fp16 8.8e-8 / 3.7e-4 / 4.0e-4 / 8.3e-6 / 3.5e-4 / 5.4e-4;
# bf16 8.6e-8 / 2.3e-3 / 3.7e-3 / 2.2e-5 / 4.1e-3 / 5.2e-3. The 16-bit out / columns carry the rounding of
# p * value_scale (rows) and of p and y (columns) to the input dtype for the tensor-core dot (as flash attention
# rounds p); d_prototypes also the rounding of the fp32 gradient to the input dtype.
BANDS = {F32: 5e-6, F16: 2.2e-3, BF16: 1.1e-2}


def check(actual, expected, dtype, name, assert_close):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape and torch.isfinite(actual).all(), name
    error = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert error <= BANDS[dtype], f"{name}: normwise error {error:.3g} > {BANDS[dtype]:.3g}"
    assert_close(actual, expected, dtype, f"triton/{name}", op="dino_loss", backend="triton")


def make(R, K, d, e, seed=0, dtype=F32):
    """x [R, d] unit rows, raw keys [K, d] (row norms 0.5..2, as prototypes v), values [K, e] in dtype; key_scale
    (about 1 / ||keys_k||, not exactly: the kernel must not assume it), value_scale, bias [K], y [R, e] and the
    nonzero out [K, e] that softmax_columns adds to, fp32."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(R, d, generator=gen), dim=1).to(dtype)
    keys = (F.normalize(torch.randn(K, d, generator=gen), dim=1) * (0.5 + 1.5 * torch.rand(K, 1, generator=gen)))
    keys = keys.to(dtype)
    values = torch.randn(K, e, generator=gen).to(dtype)
    key_scale = keys.float().norm(dim=1).reciprocal() * (0.8 + 0.4 * torch.rand(K, generator=gen))
    value_scale = 0.5 + torch.rand(K, generator=gen)
    bias = torch.randn(K, generator=gen)
    y = torch.randn(R, e, generator=gen)
    out = torch.randn(K, e, generator=gen)
    return [t.to(DEVICE) for t in (x, keys, key_scale, values, value_scale, bias, y, out)]


def run_both(R, K, d, e, dtype, seed=0):
    """((lse, out, columns) of the launchers, the same of the float64 reference primitives on the rounded inputs);
    columns is what softmax_columns added to the nonzero out."""
    x, keys, key_scale, values, value_scale, bias, y, out = make(R, K, d, e, seed, dtype)
    lse, rows = kd.softmax_rows(x, keys, key_scale, values, value_scale, bias, SCALE)
    before = out.clone()
    assert kd.softmax_columns(x, keys, key_scale, bias, SCALE, lse, y, out) is None
    x, keys, key_scale, values, value_scale, bias, y, ref_out = (t.double().cpu() for t in (
        x, keys, key_scale, values, value_scale, bias, y, before))
    ref_lse, ref_rows = op._reference_softmax_rows(x, keys, key_scale, values, value_scale, bias, SCALE)
    op._reference_softmax_columns(x, keys, key_scale, bias, SCALE, ref_lse, y, ref_out)
    for t in (lse, rows, out):
        assert t.dtype == torch.float32 and t.device == DEVICE
    return (lse, rows, out - before), (ref_lse, ref_rows, ref_out - before.double().cpu())


def check_all(got, want, dtype, label, assert_close):
    for name, actual, expected in zip(("lse", "out", "columns"), got, want):
        check(actual, expected, dtype, f"{name} {label}", assert_close)


# ---- every width class and dtype, ragged R, K, d, e (more than one tile of the class's table, ending ragged) ----
CLASS_SHAPES = {"d64": (24, 80, 40, 40), "d128": (13, 70, 100, 72), "d256": (9, 40, 200, 33),
                "chunked": (13, 70, 33, 300)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("klass", list(CLASS_SHAPES))
def test_every_class_and_dtype_matches_reference(klass, dtype, assert_close):
    R, K, d, e = CLASS_SHAPES[klass]
    assert kd.width_class(d, e) == klass
    if dtype == F32 and klass in ("d128", "d256"):
        assert kd.ROWS_CONFIG[klass][F32] == kd.ROWS_CONFIG["d64"][F32] == kd.ROWS_CONFIG["chunked"][F32]
        assert kd.COLUMNS_CONFIG[klass][F32] == kd.COLUMNS_CONFIG["d64"][F32] == kd.COLUMNS_CONFIG["chunked"][F32]
        pytest.skip("fp32 runs one table entry in every class (run by d64 and chunked)")
    if dtype == BF16 and klass in ("d128", "d256"):
        pytest.skip("bf16 shares the fp16 entries (bf16 runs d64, chunked and the edge cases)")
    got, want = run_both(R, K, d, e, dtype, seed=1)
    check_all(got, want, dtype, klass, assert_close)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 7, 5), (1, 37, 9, 3), (6, 1, 16, 16)], ids=str)
def test_one_row_and_one_prototype(shape, dtype, assert_close):
    """R = 1 and K = 1 (the softmax over one key is 1: lse = z, out = values[0], columns = exp(z - lse) y)."""
    got, want = run_both(*shape, dtype, seed=2)
    check_all(got, want, dtype, str(shape), assert_close)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_k_splits_match_one(dtype, assert_close, monkeypatch):
    """K cut into splits of one tile (the last one short) and merged by _combine_kernel: the same results as the
    reference and as one split."""
    R, K, d, e = 10, 150, 24, 20
    cfg = kd.ROWS_CONFIG[kd.width_class(d, e)][dtype]
    monkeypatch.setattr(kd, "MIN_K_TILES_PER_SPLIT", 1)
    splits, per_split = kd.split_plan(R, K, e, cfg)
    assert splits == triton.cdiv(K, cfg["BLOCK_K"]) > 2 and per_split == 1 and K % cfg["BLOCK_K"]
    with count_launches(kd, monkeypatch) as launches:
        got, want = run_both(R, K, d, e, dtype, seed=3)
    assert [name for name in launches if name.startswith("triton:")] == [
        "triton:_rows_kernel", "triton:_combine_kernel", "triton:_columns_kernel"]
    check_all(got, want, dtype, "split", assert_close)
    monkeypatch.setattr(kd, "TARGET_PROGRAMS", 1)
    assert kd.split_plan(R, K, e, cfg)[0] == 1
    one, _ = run_both(R, K, d, e, dtype, seed=3)
    for a, b in zip(got[:2], one[:2]):  # in 16 bits p is rounded relative to each split's own maximum
        assert ((a - b).abs().max() / b.abs().max()).item() <= BANDS[dtype]


# ---- the whole op on the triton backend ----
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ema", [False, True], ids=["shared prototypes", "teacher prototypes"])
def test_dino_loss_and_gradients_match_reference(dtype, ema, assert_close):
    """4 student views (2 global + 2 local) x B = 3, d = 20, K = 45: loss, teacher mean and the gradients of the
    student features and the (weight-normalised) prototypes against dino_loss_reference in float64."""
    gen = torch.Generator().manual_seed(4)
    views, batch, d, K = 4, 3, 20, 45
    student = F.normalize(torch.randn(views * batch, d, generator=gen), dim=1).to(dtype)
    teacher = F.normalize(torch.randn(2 * batch, d, generator=gen), dim=1).to(dtype)
    prototypes = torch.randn(K, d, generator=gen).to(dtype)
    teacher_prototypes = (prototypes.float() + 0.1 * torch.randn(K, d, generator=gen)).to(dtype) if ema else None
    centre = 0.1 * torch.randn(K, generator=gen)
    kwargs = dict(n_student_views=views, n_teacher_views=2, student_temp=0.1, teacher_temp=0.04)
    results = {}
    for backend, cast in (("triton", lambda t: t.to(DEVICE)), ("reference", lambda t: t.double())):
        s, p = (cast(t).detach().requires_grad_() for t in (student, prototypes))
        t_p = cast(teacher_prototypes) if ema else None
        if backend == "triton":
            loss, mean = op.dino_loss(s, cast(teacher), p, cast(centre), teacher_prototypes=t_p, backend="triton",
                                      **kwargs)
        else:
            loss, mean = op.dino_loss_reference(s, cast(teacher), p, cast(centre), teacher_prototypes=t_p, **kwargs)
        loss.backward()
        assert s.grad.dtype == s.dtype and p.grad.dtype == p.dtype
        results[backend] = (loss, mean, s.grad, p.grad)
    for name, actual, expected in zip(("loss", "teacher_mean", "d_student", "d_prototypes"), *results.values()):
        check(actual, expected, dtype, name, assert_close)


def test_deterministic():
    x, keys, key_scale, values, value_scale, bias, y, out = make(24, 80, 40, 40, seed=5, dtype=F16)
    results = []
    for _ in range(2):
        lse, rows = kd.softmax_rows(x, keys, key_scale, values, value_scale, bias, SCALE)
        columns = out.clone()
        kd.softmax_columns(x, keys, key_scale, bias, SCALE, lse, y, columns)
        results.append((lse, rows, columns))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bad_arguments_are_clear_errors():
    x, keys, key_scale, values, value_scale, bias, y, out = make(4, 4, 8, 8)
    with pytest.raises(TypeError, match="takes float32/float16/bfloat16, got torch.float64"):
        kd.softmax_rows(x.double(), keys.double(), key_scale, values.double(), value_scale, bias, SCALE)
    with pytest.raises(TypeError, match="keys must be torch.float32 like x, got torch.float16"):
        kd.softmax_columns(x, keys.half(), key_scale, bias, SCALE, bias[:4], y, out)
    with pytest.raises(TypeError, match="bias must be float32, got torch.float64"):
        kd.softmax_rows(x, keys, key_scale, values, value_scale, bias.double(), SCALE)
    with pytest.raises(TypeError, match="value_scale must be float32, got torch.float16"):
        kd.softmax_rows(x, keys, key_scale, values, value_scale.half(), bias, SCALE)
    with pytest.raises(TypeError, match="out must be float32, got torch.float64"):
        kd.softmax_columns(x, keys, key_scale, bias, SCALE, bias[:4], y, out.double())
    with pytest.raises(ValueError, match=r"out must be a contiguous \[4, 8\] tensor .*, got non-contiguous \[4, 8\]"):
        kd.softmax_columns(x, keys, key_scale, bias, SCALE, bias[:4], y, torch.zeros(8, 4).T)


# ---- launches and memory ----
def test_launch_count_and_scratch(monkeypatch):
    """One split: one launch per primitive, the rows' outputs and no scratch (columns allocates nothing: it adds to
    out). Several: the rows kernel and the merge, and the scratch is (m, l) [S, 2, R] + acc [S, R, e] with
    S <= ceil(TARGET_PROGRAMS / row tiles) + 1: O(R * e), never [R, K] nor [K, e]."""
    x, keys, key_scale, values, value_scale, bias, y, out = make(20, 60, 24, 24, seed=6)
    allocated = []
    real_empty = torch.empty

    def empty(*shape, **kwargs):
        out = real_empty(*shape, **kwargs)
        allocated.append(out.numel())
        return out

    monkeypatch.setattr(torch, "empty", empty)
    for name in ("zeros", "empty_like", "zeros_like"):  # columns must allocate nothing of any kind
        monkeypatch.setattr(torch, name, lambda *a, name=name, **k: pytest.fail(f"torch.{name} called"))
    with count_launches(kd, monkeypatch) as launches:
        lse, _ = kd.softmax_rows(x, keys, key_scale, values, value_scale, bias, SCALE)
        kd.softmax_columns(x, keys, key_scale, bias, SCALE, lse, y, out)
    assert launches == ["triton:_rows_kernel", "triton:_columns_kernel"]
    assert sorted(allocated) == sorted([20, 20 * 24])  # the rows' outputs only
    allocated.clear()
    monkeypatch.setattr(kd, "MIN_K_TILES_PER_SPLIT", 1)
    splits = kd.split_plan(20, 60, 24, kd.ROWS_CONFIG["d64"][F32])[0]
    with count_launches(kd, monkeypatch) as launches:
        kd.softmax_rows(x, keys, key_scale, values, value_scale, bias, SCALE)
    assert launches == ["triton:_rows_kernel", "triton:_combine_kernel"] and splits == 2
    assert sorted(allocated) == sorted([20, 20 * 24, splits * 2 * 20, splits * 20 * 24])


def test_tables_fit_the_benchmark_shapes():
    """DINO's benchmark: 10 x 64 student rows and 2 x 64 teacher rows, K = 65536, d = e = 256. 16-bit rows are one
    chunk; no tile has idle rows or keys; each kernel has at least 132 programs (a 132-SM GPU is full); the rows
    kernel's scratch is below the prototypes' own size (K x d)."""
    K, d = 65536, 256
    for R in (640, 128):
        for dtype in DTYPES:
            rows, cols = kd.ROWS_CONFIG[kd.width_class(d, d)][dtype], kd.COLUMNS_CONFIG[kd.width_class(d, d)][dtype]
            assert rows["ONE_CHUNK"] == cols["ONE_CHUNK"] == (dtype != F32)
            if rows["ONE_CHUNK"]:
                assert rows["BLOCK_D"] == rows["BLOCK_E"] == cols["BLOCK_D"] == cols["BLOCK_E"] == d
            for cfg in (rows, cols):
                assert R % cfg["BLOCK_R"] == 0 and K % cfg["BLOCK_K"] == 0 and d % cfg["BLOCK_D"] == 0
                assert d % cfg["BLOCK_E"] == 0
            splits, per_split = kd.split_plan(R, K, d, rows)
            programs = splits * R // rows["BLOCK_R"] * d // rows["BLOCK_E"]
            k_tiles = K // rows["BLOCK_K"]
            assert programs >= 132 and (splits - 1) * per_split < k_tiles <= splits * per_split
            assert splits * R * d <= K * d
            assert K // cols["BLOCK_K"] * d // cols["BLOCK_E"] >= 132


def test_one_chunk_entries_hold_the_whole_class():
    for table in (kd.ROWS_CONFIG, kd.COLUMNS_CONFIG):
        for klass, widest in kd.CLASSES.items():
            for cfg in table[klass].values():
                if cfg["ONE_CHUNK"]:
                    assert widest is not None and cfg["BLOCK_D"] == cfg["BLOCK_E"] == widest, (klass, cfg)


def test_aot_specs_cover_the_launch_tables():
    """Every kernel x width class x dtype x dot precision (x SPLIT for the rows kernel) is in AOT_SPECS with the
    blocks, warps and stages the launchers use, and the merge kernel with COMBINE_CONFIG."""
    seen = set()
    dtypes = {"fp32": F32, "fp16": F16, "bf16": BF16}
    tables = {"_rows_kernel": kd.ROWS_CONFIG, "_columns_kernel": kd.COLUMNS_CONFIG}
    for spec in kd.AOT_SPECS:
        label, klass = spec.variant.split()[0], spec.variant.split()[-1]
        if spec.name == "_combine_kernel":
            cfg, klasses = kd.COMBINE_CONFIG, ["-"]
        else:
            klasses = list(kd.CLASSES) if klass == "all" else [klass]
            cfg = tables[spec.name][klasses[0]][dtypes[label.split("-")[0]]]
            assert spec.tensor_cores == (label != "fp32") and spec.constexprs["ONE_CHUNK"] == cfg["ONE_CHUNK"]
        for k in klasses:
            if spec.name != "_combine_kernel":
                assert tables[spec.name][k][dtypes[label.split("-")[0]]] == cfg
            assert {n: v for n, v in spec.constexprs.items() if n.startswith("BLOCK_")} == \
                {n: v for n, v in cfg.items() if n.startswith("BLOCK_")}, spec.variant
            assert (spec.num_warps, spec.num_stages) == (cfg["num_warps"], cfg["num_stages"]), spec.variant
            key = (spec.name, spec.constexprs.get("SPLIT"), k, label)
            assert key not in seen, spec.variant
            seen.add(key)
    labels = ("fp32", "fp32-tf32", "fp16", "bf16")
    kernels = [("_rows_kernel", False), ("_rows_kernel", True), ("_columns_kernel", None)]
    assert seen == {(name, split, k, label) for name, split in kernels for k in kd.CLASSES for label in labels} | {
        ("_combine_kernel", None, "-", "fp32")}
