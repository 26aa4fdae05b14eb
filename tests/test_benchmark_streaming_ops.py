"""benchmarks/run.py times dino_loss, nn_topk and self_attention (their rows named by benchmarks/nn_topk_bench.py and
benchmarks/self_attention_bench.py) and saves their rows
like the other ops': checked at gpu_check's small "ragged" shapes, one round, torch.compile with the eager backend
(no C++ compiled). Peak memory is compared at the benchmark shapes only (tiny shapes say nothing about it).
Cost: one subprocess, ~15 s on 2 loaded cores (imports and the profiler)."""
import json
import os
import subprocess
import sys

import torch

from vitfast import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dino_loss_nn_topk_and_self_attention_benchmark_rows(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--ops", "dino_loss,nn_topk,self_attention", "--shapes", "ragged",
                             "--rounds", "1", "--no-gemm", "--compile-backend", "eager", "--note", "test", "--out",
                             str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "bench.json").read_text())
    wanted = ("triton", "cuda") if torch.cuda.is_available() else ("cpu",)
    unfused = {"dino_loss": ["eager reference", "torch.compile(reference)"],
               "nn_topk": ["eager matmul + masked_fill + topk", "torch.compile(matmul + masked_fill + topk)"],
               "self_attention": ["eager SDPA as timm calls it", "torch.compile(SDPA as timm calls it)"]}
    for op, others in unfused.items():
        fused = [f"vitfast-{b}" for b in wanted if b in ops.available_backends(op)]
        shapes = sorted({r["shape"] for r in rows if r["op"] == op})
        assert shapes and all(s.startswith("ragged") for s in shapes), shapes
        for shape in shapes:
            group = [r for r in rows if (r["op"], r["shape"]) == (op, shape)]
            assert [r["implementation"] for r in group] == fused + others, group
            for r in group:
                assert "error" not in r and r["median_ms"] > 0 and r["note"] == "test" and r["dtype"] == "fp32", r
                # The memory columns are there (MiB with one decimal: a tiny shape's floor may print as 0.0).
                assert r["peak_above_floor_mib"] >= 0 and r["floor_mib"] >= 0, r
            assert not fused or group[0]["median_vs_fused"] == 1.0
            assert f"{op} {shape} fp32" in result.stdout  # its markdown table
    header = (tmp_path / "bench.csv").read_text().splitlines()[0]
    assert header.startswith("op,shape,dtype,implementation,device,min_ms,median_ms")
