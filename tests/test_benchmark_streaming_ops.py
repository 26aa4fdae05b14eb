"""benchmarks/run.py times dino_loss and nn_topk (benchmarks/streaming_ops.py) and saves their rows like the other
ops': checked at the tiny "smoke" shapes, one round, torch.compile with the eager backend (no C++ compiled).
Cost: one subprocess, ~15 s on 2 loaded cores (imports and the profiler)."""
import json
import os
import subprocess
import sys

import torch

from vitfast import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_streaming_ops_benchmark_rows(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--ops", "dino_loss,nn_topk", "--shapes", "smoke",
                             "--rounds", "1", "--no-gemm", "--compile-backend", "eager", "--note", "test", "--out",
                             str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "bench.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wanted = ("triton", "cuda") if device == "cuda" else ("cpu",)
    others = {"dino_loss": ["eager reference", "torch.compile(reference)"],
              "nn_topk": ["eager matmul + masked_fill + topk", "torch.compile(matmul + masked_fill + topk)"]}
    for op, unfused in others.items():
        group = [r for r in rows if r["op"] == op]
        fused = [f"vitfast-{b}" for b in wanted if b in ops.available_backends(op)]
        assert [r["implementation"] for r in group] == fused + unfused, group
        assert {r["shape"] for r in group} == {group[0]["shape"]} and group[0]["shape"].startswith("smoke")
        for r in group:
            assert "error" not in r and r["median_ms"] > 0 and r["note"] == "test" and r["dtype"] == "fp32", r
            assert r["peak_above_floor_mib"] >= 0 and r["floor_mib"] >= 0, r
        if fused:  # neither fused op holds the [rows, K] logits or the [B, Q] similarities that the eager one does
            assert group[0]["median_vs_fused"] == 1.0
            assert group[0]["peak_above_floor_bytes"] < group[len(fused)]["peak_above_floor_bytes"], group
    assert "dino_loss smoke" in result.stdout and "nn_topk smoke" in result.stdout  # the markdown tables
    header = (tmp_path / "bench.csv").read_text().splitlines()[0]
    assert header.startswith("op,shape,dtype,implementation,device,min_ms,median_ms")
