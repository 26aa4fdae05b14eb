"""Fixtures of the op tests, and their one tolerance table: per op, backend and dtype, the band a result may differ
from the float64 reference, beside the largest error measured over these tests.

``assert_close(actual, expected, dtype, name)`` takes its band from TOLERANCES[(op, backend, dtype, kind)]. It finds
  - the op from the test module's name (``test_<op>...``), or its ``op=`` keyword;
  - the backend from its ``backend=`` keyword, else the prefix of ``name`` (``"cpu/loss"``), else the test's
    ``backend`` parameter, else "triton" when the test's or the module's name says so. Where it cannot tell, the
    widest band of the op for that dtype applies;
  - the kind from the expected value: "scalar" (one element: a loss) or "tensor" (outputs, gradients). They get
    separate bands: the tests' gradients also carry the rounding of an upstream gradient in the dtype (0.4 % in bf16),
    which a scalar loss does not.
The error is normwise: max|actual - expected| / max|expected| (absolute where expected is all zero). Results are
sums over many terms, whose error follows the largest term, not each element. Where nothing is measured (a new op,
a backend without rows) DEFAULT_BANDS apply.

How the bands are chosen (docs/testing.md): ``python tests/ops/measure_errors.py`` runs these tests with
VITFAST_MEASURE_ERRORS set, so that assert_close records each error instead of checking it, and prints this table
with the largest error per row and the band ``proposed_band`` gives it: FACTOR x measured (an error below half an
ulp of the dtype counts as half an ulp: the rounding of the result itself), rounded up to two significant digits.
"""
import json
import os

import pytest
import torch

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# A new op: add its name.
OPS = ("contrastive_loss", "dino_loss", "masked_patch_embed", "masked_pixel_loss", "nn_topk", "relation_loss",
       "relation_mlp_loss", "self_attention")
KINDS = ("scalar", "tensor")
BACKENDS = ("triton", "cuda", "cpu", "torch")
# band = FACTOR x measured. bf16 gets 2: its results' own rounding (up to 0.4 %, 0.8 % with a bf16 upstream gradient)
# is within a factor 2.6 of the smallest faults worth catching (1 %: a variance off by (E - 1) / E at E = 48).
FACTOR = {F64: 4, F32: 4, F16: 4, BF16: 2}
MEASURE_ENV = "VITFAST_MEASURE_ERRORS"

# (op, backend, dtype, kind): (band, measured) = (proposed_band(measured), the largest normwise error over tests/ops,
# rounded up to two digits). Measured with python tests/ops/measure_errors.py on an AMD EPYC CPU (2 cores), Triton
# under its interpreter (bf16 dots and fp32 -> bf16 rounding mended by tests/conftest.py, as a GPU computes them;
# triton bf16 rows re-measured after the rounding fix). The cuda rows cannot be measured there: they carry the cpu row's numbers
# (UNMEASURED below) until the script runs on a GPU.
TOLERANCES = {
    ("contrastive_loss", "triton", F32, "scalar"): (1.6e-06, 4e-07),
    ("contrastive_loss", "triton", F32, "tensor"): (1.9e-06, 4.7e-07),
    ("contrastive_loss", "triton", F16, "scalar"): (0.002, 7.5e-05),
    ("contrastive_loss", "triton", F16, "tensor"): (0.004, 0.00099),
    ("contrastive_loss", "triton", BF16, "scalar"): (0.0079, 0.00088),
    ("contrastive_loss", "triton", BF16, "tensor"): (0.015, 0.0074),
    ("contrastive_loss", "cpu", F64, "scalar"): (2e-15, 4.8e-16),
    ("contrastive_loss", "cpu", F64, "tensor"): (8e-15, 2e-15),
    ("contrastive_loss", "cpu", F32, "scalar"): (4.8e-07, 1.2e-07),
    ("contrastive_loss", "cpu", F32, "tensor"): (2.5e-05, 6.2e-06),
    ("contrastive_loss", "cpu", F16, "scalar"): (0.002, 7.5e-05),
    ("contrastive_loss", "cpu", F16, "tensor"): (0.0048, 0.0012),
    ("contrastive_loss", "cpu", BF16, "scalar"): (0.0079, 0.00088),
    ("contrastive_loss", "cpu", BF16, "tensor"): (0.015, 0.0074),
    ("contrastive_loss", "torch", F64, "scalar"): (1.1e-15, 2.6e-16),
    ("contrastive_loss", "torch", F64, "tensor"): (2.4e-15, 5.9e-16),
    ("contrastive_loss", "torch", F32, "scalar"): (6e-07, 1.5e-07),
    ("contrastive_loss", "torch", F32, "tensor"): (2.3e-06, 5.6e-07),
    ("contrastive_loss", "torch", F16, "scalar"): (0.002, 7.5e-05),
    ("contrastive_loss", "torch", F16, "tensor"): (0.0048, 0.0012),
    ("contrastive_loss", "torch", BF16, "scalar"): (0.0079, 0.00088),
    ("contrastive_loss", "torch", BF16, "tensor"): (0.015, 0.0074),
    ("dino_loss", "triton", F32, "scalar"): (6e-07, 1.5e-07),
    ("dino_loss", "triton", F32, "tensor"): (8.4e-05, 2.1e-05),
    ("dino_loss", "triton", F16, "scalar"): (0.002, 7.6e-05),
    ("dino_loss", "triton", F16, "tensor"): (0.0033, 0.00081),
    ("dino_loss", "triton", BF16, "scalar"): (0.0079, 0.00068),
    ("dino_loss", "triton", BF16, "tensor"): (0.012, 0.006),
    ("dino_loss", "cpu", F64, "scalar"): (1.6e-15, 4e-16),
    ("dino_loss", "cpu", F64, "tensor"): (4e-14, 9.8e-15),
    ("dino_loss", "cpu", F32, "scalar"): (4.4e-07, 1.1e-07),
    ("dino_loss", "cpu", F32, "tensor"): (2.8e-05, 6.9e-06),
    ("dino_loss", "cpu", F16, "scalar"): (0.002, 9.3e-08),
    ("dino_loss", "cpu", F16, "tensor"): (0.002, 0.00044),
    ("dino_loss", "cpu", BF16, "scalar"): (0.0079, 1.8e-07),
    ("dino_loss", "cpu", BF16, "tensor"): (0.0079, 0.0036),
    ("dino_loss", "torch", F64, "scalar"): (1.1e-15, 2.6e-16),
    ("dino_loss", "torch", F64, "tensor"): (8.8e-15, 2.2e-15),
    ("dino_loss", "torch", F32, "scalar"): (4.4e-07, 1.1e-07),
    ("dino_loss", "torch", F32, "tensor"): (1.2e-05, 2.9e-06),
    ("dino_loss", "torch", F16, "scalar"): (0.002, 1.2e-07),
    ("dino_loss", "torch", F16, "tensor"): (0.002, 0.00044),
    ("dino_loss", "torch", BF16, "scalar"): (0.0079, 1.8e-07),
    ("dino_loss", "torch", BF16, "tensor"): (0.0079, 0.0036),
    ("masked_patch_embed", "triton", F32, "tensor"): (8.4e-07, 2.1e-07),
    ("masked_patch_embed", "triton", F16, "tensor"): (0.0022, 0.00054),
    ("masked_patch_embed", "triton", BF16, "tensor"): (0.011, 0.0052),
    ("masked_patch_embed", "cuda", F32, "tensor"): (1.6e-06, 4e-07),
    ("masked_patch_embed", "cuda", F16, "tensor"): (0.002, 0.00044),
    ("masked_patch_embed", "cuda", BF16, "tensor"): (0.0079, 0.0037),
    ("masked_patch_embed", "cpu", F32, "tensor"): (1.6e-06, 4e-07),
    ("masked_patch_embed", "cpu", F16, "tensor"): (0.002, 0.00044),
    ("masked_patch_embed", "cpu", BF16, "tensor"): (0.0079, 0.0037),
    ("masked_patch_embed", "torch", F32, "tensor"): (2.4e-06, 6e-07),
    ("masked_patch_embed", "torch", F16, "tensor"): (0.0023, 0.00057),
    ("masked_patch_embed", "torch", BF16, "tensor"): (0.011, 0.0054),
    ("masked_pixel_loss", "triton", F32, "scalar"): (4.8e-07, 1.2e-07),
    ("masked_pixel_loss", "triton", F32, "tensor"): (7.6e-07, 1.9e-07),
    ("masked_pixel_loss", "triton", F16, "scalar"): (0.002, 0.00027),
    ("masked_pixel_loss", "triton", F16, "tensor"): (0.0028, 0.00068),
    ("masked_pixel_loss", "triton", BF16, "scalar"): (0.0079, 0.003),
    ("masked_pixel_loss", "triton", BF16, "tensor"): (0.0098, 0.0049),
    ("masked_pixel_loss", "cuda", F64, "scalar"): (4.5e-16, 0),
    ("masked_pixel_loss", "cuda", F64, "tensor"): (1.7e-15, 4.1e-16),
    ("masked_pixel_loss", "cuda", F32, "scalar"): (9.2e-07, 2.3e-07),
    ("masked_pixel_loss", "cuda", F32, "tensor"): (1.5e-06, 3.6e-07),
    ("masked_pixel_loss", "cuda", F16, "scalar"): (0.002, 0.00027),
    ("masked_pixel_loss", "cuda", F16, "tensor"): (0.0028, 0.00068),
    ("masked_pixel_loss", "cuda", BF16, "scalar"): (0.0079, 0.003),
    ("masked_pixel_loss", "cuda", BF16, "tensor"): (0.0098, 0.0049),
    ("masked_pixel_loss", "cpu", F64, "scalar"): (4.5e-16, 0),
    ("masked_pixel_loss", "cpu", F64, "tensor"): (1.7e-15, 4.1e-16),
    ("masked_pixel_loss", "cpu", F32, "scalar"): (9.2e-07, 2.3e-07),
    ("masked_pixel_loss", "cpu", F32, "tensor"): (1.5e-06, 3.6e-07),
    ("masked_pixel_loss", "cpu", F16, "scalar"): (0.002, 0.00027),
    ("masked_pixel_loss", "cpu", F16, "tensor"): (0.0028, 0.00068),
    ("masked_pixel_loss", "cpu", BF16, "scalar"): (0.0079, 0.003),
    ("masked_pixel_loss", "cpu", BF16, "tensor"): (0.0098, 0.0049),
    ("masked_pixel_loss", "torch", F64, "scalar"): (4.5e-16, 0),
    ("masked_pixel_loss", "torch", F32, "scalar"): (4.8e-07, 1.2e-07),
    ("masked_pixel_loss", "torch", F32, "tensor"): (7.6e-07, 1.9e-07),
    ("masked_pixel_loss", "torch", F16, "scalar"): (0.002, 0.00029),
    ("masked_pixel_loss", "torch", F16, "tensor"): (0.0028, 0.00068),
    ("masked_pixel_loss", "torch", BF16, "scalar"): (0.0098, 0.0049),
    ("masked_pixel_loss", "torch", BF16, "tensor"): (0.0098, 0.0049),
    ("nn_topk", "triton", F32, "tensor"): (7.6e-07, 1.9e-07),
    ("nn_topk", "triton", F16, "tensor"): (0.002, 2.2e-07),
    ("nn_topk", "triton", BF16, "tensor"): (0.0079, 9.1e-08),
    ("nn_topk", "cpu", F64, "tensor"): (1e-15, 2.5e-16),
    ("nn_topk", "cpu", F32, "scalar"): (2.4e-07, 5.4e-08),
    ("nn_topk", "cpu", F32, "tensor"): (1.8e-06, 4.3e-07),
    ("nn_topk", "cpu", F16, "tensor"): (0.002, 4.2e-07),
    ("nn_topk", "cpu", BF16, "tensor"): (0.0079, 1.7e-07),
    ("nn_topk", "torch", F64, "tensor"): (4.5e-16, 0),
    ("nn_topk", "torch", F32, "tensor"): (1.8e-06, 4.3e-07),
    ("nn_topk", "torch", F16, "tensor"): (0.002, 4.2e-07),
    ("nn_topk", "torch", BF16, "tensor"): (0.0079, 1.7e-07),
    ("relation_loss", "triton", F32, "scalar"): (2.5e-07, 6.2e-08),
    ("relation_loss", "triton", F32, "tensor"): (2.7e-06, 6.6e-07),
    ("relation_loss", "triton", F16, "scalar"): (0.002, 3.8e-08),
    ("relation_loss", "triton", F16, "tensor"): (0.002, 0.00038),
    ("relation_loss", "triton", BF16, "scalar"): (0.0079, 6.8e-08),
    ("relation_loss", "triton", BF16, "tensor"): (0.0079, 0.0035),
    ("relation_loss", "cpu", F64, "scalar"): (1.8e-15, 4.5e-16),
    ("relation_loss", "cpu", F64, "tensor"): (2.2e-15, 5.4e-16),
    ("relation_loss", "cpu", F32, "scalar"): (2.4e-07, 3.9e-08),
    ("relation_loss", "cpu", F32, "tensor"): (2.2e-06, 5.5e-07),
    ("relation_loss", "cpu", F16, "scalar"): (0.002, 5.1e-08),
    ("relation_loss", "cpu", F16, "tensor"): (0.002, 0.00037),
    ("relation_loss", "cpu", BF16, "scalar"): (0.0079, 5.2e-08),
    ("relation_loss", "cpu", BF16, "tensor"): (0.0079, 0.0032),
    ("relation_loss", "torch", F32, "scalar"): (4.8e-07, 1.2e-07),
    ("relation_loss", "torch", F32, "tensor"): (1.5e-06, 3.7e-07),
    ("relation_loss", "torch", F16, "scalar"): (0.002, 2.6e-06),
    ("relation_loss", "torch", F16, "tensor"): (0.002, 0.00046),
    ("relation_mlp_loss", "triton", F32, "scalar"): (3.3e-07, 8.2e-08),
    ("relation_mlp_loss", "triton", F32, "tensor"): (7.2e-07, 1.8e-07),
    ("relation_mlp_loss", "triton", F16, "scalar"): (0.002, 0.00011),
    ("relation_mlp_loss", "triton", F16, "tensor"): (0.0023, 0.00057),
    ("relation_mlp_loss", "triton", BF16, "scalar"): (0.0079, 0.00075),
    ("relation_mlp_loss", "triton", BF16, "tensor"): (0.0092, 0.0046),
    ("relation_mlp_loss", "cpu", F64, "scalar"): (7.2e-16, 1.8e-16),
    ("relation_mlp_loss", "cpu", F64, "tensor"): (5.6e-15, 1.4e-15),
    ("relation_mlp_loss", "cpu", F32, "scalar"): (4.8e-07, 1.2e-07),
    ("relation_mlp_loss", "cpu", F32, "tensor"): (1.6e-06, 3.8e-07),
    ("relation_mlp_loss", "cpu", F16, "scalar"): (0.002, 4.6e-08),
    ("relation_mlp_loss", "cpu", F16, "tensor"): (0.002, 0.0004),
    ("relation_mlp_loss", "cpu", BF16, "scalar"): (0.0079, 8.4e-08),
    ("relation_mlp_loss", "cpu", BF16, "tensor"): (0.0079, 0.0036),
    ("relation_mlp_loss", "torch", F64, "scalar"): (4.5e-16, 0),
    ("relation_mlp_loss", "torch", F64, "tensor"): (5.6e-15, 1.4e-15),
    ("relation_mlp_loss", "torch", F32, "scalar"): (4.4e-07, 1.1e-07),
    ("relation_mlp_loss", "torch", F32, "tensor"): (2.8e-06, 7e-07),
    ("relation_mlp_loss", "torch", F16, "scalar"): (0.002, 1.2e-07),
    ("relation_mlp_loss", "torch", F16, "tensor"): (0.002, 0.0004),
    ("self_attention", "cpu", F64, "tensor"): (1.2e-14, 2.9e-15),
    ("self_attention", "cpu", F32, "tensor"): (6.8e-06, 1.7e-06),
    ("self_attention", "cpu", F16, "tensor"): (0.002, 0.00039),
    ("self_attention", "cpu", BF16, "tensor"): (0.0079, 0.0032),
    ("self_attention", "torch", F64, "tensor"): (1.2e-14, 2.8e-15),
    ("self_attention", "torch", F32, "tensor"): (6.8e-06, 1.7e-06),
    ("self_attention", "torch", F16, "tensor"): (0.002, 0.00039),
    ("self_attention", "torch", BF16, "tensor"): (0.0079, 0.0032),
}
# Rows copied from the cpu row, not measured (no GPU where the table was measured).
UNMEASURED = {
    ("masked_patch_embed", "cuda", F32, "tensor"),
    ("masked_patch_embed", "cuda", F16, "tensor"),
    ("masked_patch_embed", "cuda", BF16, "tensor"),
    ("masked_pixel_loss", "cuda", F64, "scalar"),
    ("masked_pixel_loss", "cuda", F64, "tensor"),
    ("masked_pixel_loss", "cuda", F32, "scalar"),
    ("masked_pixel_loss", "cuda", F32, "tensor"),
    ("masked_pixel_loss", "cuda", F16, "scalar"),
    ("masked_pixel_loss", "cuda", F16, "tensor"),
    ("masked_pixel_loss", "cuda", BF16, "scalar"),
    ("masked_pixel_loss", "cuda", BF16, "tensor"),
}
# No row for an (op, dtype): the bands before measurement. A new op runs against these until it is measured.
DEFAULT_BANDS = {F64: 1e-10, F32: 1e-4, F16: 2e-2, BF16: 1e-1}
# Triton and CUDA kernels on a real GPU sum in other orders than the interpreter / the C++ code measured here.
GPU_SLACK = 4


def round_up(value: float) -> float:
    """value rounded up to two significant digits (3.41e-07 -> 3.5e-07)."""
    if not 0 < value < float("inf"):
        return value
    digits = f"{value:.1e}"
    if float(digits) < value:
        mantissa, exponent = digits.split("e")
        digits = f"{float(mantissa) + 0.1:.1f}e{exponent}"
    return float(digits)


def proposed_band(measured: float, dtype: torch.dtype) -> float:
    """FACTOR x max(measured, half an ulp of dtype), rounded up to two significant digits."""
    return round_up(FACTOR[dtype] * max(measured, torch.finfo(dtype).eps / 2))


def normwise_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| in float64 (absolute where expected is all zero). Equal values,
    infinities and NaNs included, count as no error; a NaN or infinity on one side only is an infinite error."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if actual.numel() == 0:
        return 0.0
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    diff = torch.where(same, torch.zeros_like(actual), (actual - expected).abs().nan_to_num(nan=float("inf")))
    finite = expected[expected.isfinite()].abs()
    scale = finite.max().item() if finite.numel() else 0.0
    error = diff.max().item()
    return error / scale if scale > 0 else error


def op_of_module(module_name: str):
    """``test_relation_mlp_loss`` -> ``relation_mlp_loss``; None when the module is not an op's."""
    stem = module_name.rsplit(".", 1)[-1].removeprefix("test_")
    matches = [op for op in OPS if stem == op or stem.startswith(op + "_")]
    return max(matches, key=len) if matches else None


def kind_of(expected: torch.Tensor) -> str:
    return "scalar" if expected.numel() == 1 else "tensor"


def band(op, backend, dtype: torch.dtype, kind: str = "tensor", on_gpu: bool = False) -> float:
    """The band of (op, backend, dtype, kind); for an unknown backend the op's widest for that dtype and kind (either
    kind where the op has rows of one only); DEFAULT_BANDS where nothing is measured."""
    rows = [(k, v[0]) for (o, b, d, k), v in TOLERANCES.items() if o == op and d == dtype and backend in (b, None)]
    same_kind = [value for k, value in rows if k == kind]
    value = max(same_kind or [value for _, value in rows] or [DEFAULT_BANDS[dtype]])
    return value * (GPU_SLACK if on_gpu and backend in ("triton", "cuda") else 1)


def _backend_of(name: str, request):
    prefix = name.split("/", 1)[0] if "/" in name else None
    if prefix in BACKENDS:
        return prefix
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") in BACKENDS:
        return callspec.params["backend"]
    if "triton" in request.node.name or "triton" in request.module.__name__:
        return "triton"
    return None


def _record(path: str, **row) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


@pytest.fixture
def assert_close(request):
    """assert_close(actual, expected, dtype, name="", *, op=None, backend=None): the normwise error of actual
    against expected (the float64 reference) is within the band of (op, backend, dtype, kind) of TOLERANCES."""
    module_op = op_of_module(request.module.__name__)
    measure = os.environ.get(MEASURE_ENV)

    def check(actual, expected, dtype, name="", *, op=None, backend=None):
        op = op or module_op
        backend = backend or _backend_of(name, request)
        kind = kind_of(expected)
        error = normwise_error(actual, expected)
        if measure:  # record, do not check: the table is being re-measured
            _record(measure, op=op, backend=backend, dtype=str(dtype).replace("torch.", ""), kind=kind, error=error,
                    test=request.node.nodeid, name=name)
            return
        allowed = band(op, backend, dtype, kind, torch.cuda.is_available())
        assert error <= allowed, (
            f"{name}: normwise error {error:.3g} > band {allowed:.3g} of ({op}, {backend}, "
            f"{str(dtype).replace('torch.', '')}, {kind}) in tests/ops/conftest.py TOLERANCES")

    return check


@pytest.fixture
def backend_device():
    """backend_device(backend): tensors for a backend live on CUDA when there is a GPU; else on the CPU (Triton via
    interpreter)."""

    def device(backend):
        if backend in ("triton", "cuda") and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")

    return device
