"""``python -m vitfast.gpu_check --smoke`` runs (so the first GPU session's command cannot rot) and fails loudly.

Cost: one smoke run of the real command in a subprocess (~40-60 s on 2 loaded cores: Triton interpreter on the ragged
shapes), started in the background when the module starts so that the other tests here run meanwhile (the tests that
read its report come last), and one narrowed run in this process with a corrupted reference (~3 s).
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from vitfast.gpu_check import OPS
from vitfast.gpu_check.cases import CASES
from vitfast.gpu_check.checks import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TRITON_INTERPRET": "1"}


@pytest.fixture(scope="module", autouse=True)
def smoke_run(request, tmp_path_factory):
    """The smoke command, started at once when a selected test of this module reads its report (None otherwise)."""
    module = request.node
    if not any(item.module is module.obj and "smoke_report" in item.fixturenames for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("gpu_check")
    with open(folder / "smoke.log", "w") as log:  # a file, not a pipe: nobody reads a pipe while it runs
        process = subprocess.Popen([sys.executable, "-m", "vitfast.gpu_check", "--smoke", "--out",
                                    str(folder / "smoke.json")], cwd=REPO, env=ENV, stdout=log, stderr=log)
    yield process, folder
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def smoke_report(smoke_run):
    process, folder = smoke_run
    code = process.wait(timeout=600)
    assert code == 0, (folder / "smoke.log").read_text()[-6000:]
    return json.loads((folder / "smoke.json").read_text())


def test_a_wrong_result_makes_it_exit_nonzero(tmp_path, monkeypatch, capsys):
    """A reference off by 1 % (a stand-in for a wrong kernel) must fail the run with exit code 1 (main() in this
    process, as ``python -m vitfast.gpu_check`` calls it; TRITON_INTERPRET is set here as in the command)."""
    from vitfast import gpu_check
    from vitfast.gpu_check import cases

    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py: main() runs here, not in a child
    saved = dict(cases.CASES)  # run() narrows CASES in place to --ops: put every case back afterwards
    case = cases.CASES["masked_pixel_loss"]
    wrong = lambda x, ref=case.reference: ref(x) * 1.01  # noqa: E731
    monkeypatch.setitem(cases.CASES, "masked_pixel_loss", dataclasses.replace(case, reference=wrong))
    out = tmp_path / "fault.json"
    try:
        code = gpu_check.main(["--smoke", "--ops", "masked_pixel_loss", "--sections", "accuracy", "--out", str(out)])
    finally:
        cases.CASES.clear()
        cases.CASES.update(saved)
    assert code == 1, capsys.readouterr()
    report = json.loads(out.read_text())
    assert not report["ok"] and report["failures"]
    assert all(r["op"] == "masked_pixel_loss" and r["tensors"]["output"]["ratio"] > 1 for r in report["failures"])
    assert "FAILED" in capsys.readouterr().err


def test_compare_tolerances():
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert compare(expected.float(), expected, "fp32")["ok"]
    assert not compare(expected * (1 + 1e-3), expected, "fp32")["ok"]  # 1e-3 relative is far beyond fp32
    assert compare(expected * (1 + 1e-3), expected, "bf16")["ok"]
    assert not compare(expected * (1 + 5e-2), expected, "bf16")["ok"]
    assert not compare(torch.tensor([1.0, float("nan"), 0.5]), expected, "bf16")["ok"]
    assert not compare(expected[:2], expected, "bf16")["ok"]
    assert not compare(torch.tensor([1e-30]), torch.zeros(1), "bf16")["ok"]  # zeros must be met exactly
    assert compare(torch.zeros(1), torch.zeros(1), "fp32")["ok"]


def test_traffic_counts_bytes_and_flops_of_aten_ops():
    """The unfused column's counter on a known composition: (a @ b).sum() with a broadcast add."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitfast.traffic import _Log, table
    a, b = torch.ones(8, 4, device="meta"), torch.ones(4, 16, device="meta")
    bias = torch.ones(16, device="meta").expand(8, 16)  # broadcast: read once (16 floats)
    log, flops = _Log(), FlopCounterMode(display=False)
    with flops, log:
        ((a @ b) + bias).sum()
    # mm: read 32 + 64, write 128; add: read 128 + 16, write 128; sum: read 128, write 1 (floats)
    assert log.launches == 3 and log.bytes == 4 * (32 + 64 + 128 + 128 + 16 + 128 + 128 + 1)
    assert flops.get_total_flops() == 2 * 8 * 4 * 16
    rows = table(torch.float32)
    assert {r["op"] for r in rows} == set(OPS)
    for r in rows:  # the point of fusing: fewer bytes than the composition, at every benchmark shape
        assert 0 < r["fused"]["bytes"] < r["unfused"]["bytes"], r["op"]


def test_benchmark_harness_writes_csv_and_json(tmp_path):
    """benchmarks/run.py: fused, eager and compiled rows with times and peak above the floor, in CSV and JSON
    (one round; torch.compile with the eager backend so that no C++ is compiled; ~10 s)."""
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--ops", "masked_pixel_loss", "--rounds", "1",
                             "--no-gemm", "--compile-backend", "eager", "--note", "test", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "bench.json").read_text())
    names = [r["implementation"] for r in rows]
    fused = ["vitfast-triton", "vitfast-cuda"] if torch.cuda.is_available() else ["vitfast-cpu"]
    assert names == [f for f in fused if f in names] + ["eager reference", "torch.compile(reference)"], names
    assert names[0] in fused
    for r in rows:
        assert "error" not in r and r["median_ms"] > 0 and r["note"] == "test" and r["floor_mib"] > 0, r
    assert rows[0]["median_vs_fused"] == 1.0
    # the fused op never builds the [B, N, E] normalised target that the eager formula allocates
    assert rows[0]["peak_above_floor_mib"] < rows[-2]["peak_above_floor_mib"]
    header = (tmp_path / "bench.csv").read_text().splitlines()[0]
    assert header.startswith("op,shape,dtype,implementation,device,min_ms,median_ms")


# The tests that read the smoke report come last: the other tests above run while it is made.
def test_smoke_report_covers_every_op_backend_dtype(smoke_report):
    report = smoke_report
    assert report["ok"] and report["failures"] == [] and report["smoke"]
    rows = report["sections"]["accuracy"]
    for op in OPS:
        case = CASES[op]
        ran = [r for r in rows if r["op"] == op and r["ok"] is True]
        assert {r["backend"] for r in ran} >= {"triton"}, op
        assert {r["dtype"] for r in ran if r["backend"] == "triton"} >= {"fp32", "fp16"}, op
        for r in ran:  # the output and every gradient were compared, each within its tolerance
            assert set(r["tensors"]) == {"output"} | {f"d_{n}" for n in case.grads}, (op, r["tensors"].keys())
            assert all(0 <= t["ratio"] <= 1 for t in r["tensors"].values()), r
    # bf16 runs on the Triton path too, also under the interpreter (vitfast.triton_interpreter mends its bf16)
    for op in OPS:
        assert any(r["op"] == op and r["backend"] == "triton" and r["dtype"] == "bf16" and r["ok"] for r in rows), op
    assert [r for r in rows if r["ok"] is None] == []  # nothing skipped: every backend takes fp32/fp16/bf16
    if not torch.cuda.is_available():
        assert any("cuda backend" in s for s in report["skipped"])


def test_smoke_report_repeatability_limits_timing(smoke_report):
    sections = smoke_report["sections"]
    assert {r["op"] for r in sections["repeatability"] if r["ok"] and r["differing"] == []} == set(OPS)
    limits = sections["limits"]
    assert limits and all(r["ok"] and r["proves_limit"] is False for r in limits)
    assert any("outside the tail" in name for r in limits for name in r["tensors"])
    timing = sections["timing"]
    assert {r["op"] for r in timing} == set(OPS)
    for op in OPS:
        names = {r["implementation"] for r in timing if r["op"] == op}
        fused = "vitfast-triton" if torch.cuda.is_available() else "vitfast-cpu"
        assert {"eager reference", "torch.compile(reference)", fused} <= names, names
    for r in timing:
        assert "error" not in r and r["median_ms"] > 0 and r["floor_bytes"] > 0, r
        assert isinstance(r["peak_above_floor_bytes"], int)
