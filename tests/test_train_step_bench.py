"""benchmarks/train_step.py: every row of the end-to-end step comparison runs and is saved (tiny shapes, one round,
torch.compile with the eager backend so that no C++ is compiled), bf16 rows are skipped with the measured reason on
a CPU without bf16 hardware and timed elsewhere, and --methods times a method's quick step eager and compiled.
Cost: one subprocess, ~30 s on 2 cores."""
import json
import os
import subprocess
import sys

import pytest
import torch

from vitfast.machine import cpu_bf16_hardware

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_rows(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "steps"
    result = subprocess.run([sys.executable, "benchmarks/train_step.py", "--smoke", "--compile-backend", "eager",
                             "--methods", "supervised", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "steps.json").read_text())
    bf16_runs = torch.cuda.is_available() or cpu_bf16_hardware() is not None
    steps = sorted({(r["step"], r["shape"]) for r in rows if "quick" not in r["step"]})
    assert [s for s, _ in steps] == ["MAE", "RelViT upstream", "RelViT upstream"], steps
    for step in steps:
        group = [r for r in rows if (r["step"], r["shape"]) == step]
        assert [r["implementation"] for r in group] == [
            "vitfast fp32", "vitfast fp32 + compile", "vitfast bf16", "vitfast bf16 + compile",
            "timm + formulas fp32", "timm + formulas bf16 autocast", "vitfast fp32, SDPA attention"], group
        for r in group:
            if r["precision"] == "bf16" and not bf16_runs:
                assert "no bf16 hardware" in r["skipped"] and "GFLOP/s" in r["skipped"], r
                continue
            assert r["median_ms"] > 0 and r["images_per_s"] > 0 and r["peak_mib"] >= 0, r
            assert r["gflop_per_step"] > 0 and r["gflops"] > 0 and r["gemm_peak_gflops"] > 0, r
        assert group[0]["vs_vitfast_fp32"] == 1.0
        # The usual way materialises what vitfast fuses away: it counts at least the same matmul FLOPs.
        assert group[4]["gflop_per_step"] >= 0.5 * group[0]["gflop_per_step"], group
    quick = [r for r in rows if r["step"] == "supervised quick"]
    assert [r["implementation"] for r in quick] == ["vitfast fp32", "vitfast fp32 + compile"], quick
    assert all(r["median_ms"] > 0 for r in quick)
    assert "| MAE |" in result.stdout and "machine:" in result.stdout


def test_interleaved_rows(tmp_path):
    """--interleaved: the three fp32 steps alternate round by round; one row each with the per-round ratio. In this
    process (no start-up cost), smoke shapes."""
    pytest.importorskip("timm")
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import train_step
    assert train_step.main(["--smoke", "--interleaved", "--out", str(tmp_path / "ab")]) == 0
    rows = json.loads((tmp_path / "ab.json").read_text())
    assert [r["implementation"] for r in rows[:3]] == ["vitfast fp32 (interleaved)",
                                                       "vitfast fp32, SDPA attention (interleaved)",
                                                       "timm + formulas fp32 (interleaved)"]
    assert len(rows) == 9 and rows[0]["vs_vitfast_fp32"] == 1.0
    assert all(r["median_ms"] > 0 and r["vs_vitfast_fp32"] > 0 for r in rows)
