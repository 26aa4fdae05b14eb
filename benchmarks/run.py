"""The benchmark harness: every fused backend on this machine beside the eager reference and torch.compile(reference).

    python benchmarks/run.py                                  # every op at its benchmark shapes, fp32
    python benchmarks/run.py --ops relation_loss --rounds 5   # one op, fewer rounds
    python benchmarks/run.py --mae-step                       # also one full MAE training step (benchmarks/mae_step.py)
    python benchmarks/run.py --dtypes fp32,bf16 --note "..."  # other dtypes; a note stored with every row
    python benchmarks/run.py --ops dino_loss,nn_topk          # the DINO loss and the feature-queue lookup
    python benchmarks/run.py --ops self_attention --dtypes fp32,bf16   # the fused CPU attention vs SDPA

Rows per (op, shape, dtype): ``vitfast-<backend>`` for every fused backend that runs here (``cpu`` on a CPU-only
machine; ``triton`` and ``cuda`` on a GPU), ``eager reference`` (the op's plain-PyTorch spec, what users write
today) and ``torch.compile(reference)``. The shapes and inputs are those of ``vitfast/gpu_check/cases.py``
("bench ..." shapes); a step is forward + backward with the gradients a training step needs (nn_topk, a lookup:
forward only, its rows named in ``benchmarks/nn_topk_bench.py``: the public lookup vs matmul + masked_fill + topk).
self_attention has no GPU backend and no gpu_check case: its case and rows (vs SDPA as timm calls it) are in
``benchmarks/self_attention_bench.py``.

Time: CUDA events on a GPU, perf_counter on the CPU (``vitfast/gpu_check/measure.py``); min and median over the
rounds after warm-up. Memory: peak during one step above the step's floor (its inputs and their gradients, which
every implementation holds), measured with the same instrument as the floor: torch.cuda.max_memory_allocated on a
GPU, the torch profiler's memory timeline on the CPU. Each run writes ``<out>.csv`` and ``<out>.json`` (default
``benchmarks/results/<UTC time>-<device>``) and prints the markdown tables that the README shows.
"""
import argparse
import csv
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from vitfast.gpu_check import checks  # noqa: E402
from vitfast.machine import describe  # noqa: E402
from vitfast.gpu_check.cases import CASES  # noqa: E402
import nn_topk_bench  # noqa: E402  (benchmarks/: the script's folder)
import self_attention_bench  # noqa: E402

# Ops whose benchmark rows are not gpu_check's case as it stands, and the names of their two unfused rows.
BENCH_CASES = {"nn_topk": nn_topk_bench.NN_TOPK_BENCH, "self_attention": self_attention_bench.SELF_ATTENTION_BENCH}
LABELS = {"nn_topk": nn_topk_bench.LABELS, "self_attention": self_attention_bench.LABELS}

# Rounds per op on the CPU (one step there takes 3 ms to 1 s); on a GPU every op gets GPU_ROUNDS.
CPU_ROUNDS = {"masked_patch_embed": 30, "masked_pixel_loss": 50, "relation_loss": 8, "relation_mlp_loss": 5,
              "contrastive_loss": 3, "dino_loss": 3, "nn_topk": 5, "self_attention": 10}
GPU_ROUNDS = 50
COLUMNS = ["op", "shape", "dtype", "implementation", "device", "min_ms", "median_ms", "rounds", "median_vs_fused",
           "peak_above_floor_mib", "floor_mib", "peak_mib", "images_per_s", "gflops_at_median", "machine",
           "torch_threads", "date_utc", "note"]


def machine(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else describe()


def gemm_row(device: torch.device, rounds: int = 10) -> dict:
    """The machine's fp32 GEMM rate (torch.mm 2048^3), measured in the same run: a yardstick for the op rows."""
    from vitfast.gpu_check import measure
    size = 2048
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    samples = measure.time_ms(lambda: torch.mm(a, b), device, rounds, warmup=2)
    stats = measure.summary(samples)
    return {"op": "fp32 GEMM torch.mm 2048^3", "shape": "", "dtype": "fp32", "implementation": "torch.mm",
            "device": str(device), **stats, "gflops_at_median": round(2 * size ** 3 / stats["median_ms"] / 1e6, 1)}


def finish(rows: list, device: torch.device, note: str) -> list:
    """Ratios to the first fused row of each group, MiB columns, machine and date on every row."""
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    groups = {}
    for row in rows:
        groups.setdefault((row["op"], row["shape"], row["dtype"]), []).append(row)
    for group in groups.values():
        base = next((r["median_ms"] for r in group if "median_ms" in r and r["implementation"].startswith("vitfast")),
                    None)
        for row in group:
            if base and "median_ms" in row:
                row["median_vs_fused"] = round(row["median_ms"] / base, 2)
            for key in ("peak_above_floor", "floor", "peak"):
                if row.get(f"{key}_bytes") is not None:
                    row[f"{key}_mib"] = round(row[f"{key}_bytes"] / 2 ** 20, 1)
            row.update(machine=machine(device), torch_threads=torch.get_num_threads(), date_utc=stamp, note=note)
    return rows


def markdown(rows: list) -> str:
    """One table per (op, shape, dtype), as in the README."""
    lines, seen = [], []
    for row in rows:
        key = (row["op"], row["shape"], row["dtype"])
        if key not in seen:
            seen.append(key)
    for op, shape, dtype in seen:
        group = [r for r in rows if (r["op"], r["shape"], r["dtype"]) == (op, shape, dtype)]
        lines += [f"\n{op} {shape} {dtype}\n",
                  "| implementation | min (ms) | median (ms) | median / fused | peak above floor (MiB) |",
                  "|---|---:|---:|---:|---:|"]
        for r in group:
            if "gflops_at_median" in r:
                lines[-3:] = [f"\n{op}: min {r['min_ms']:.2f} ms, median {r['median_ms']:.2f} ms, "
                              f"{r['gflops_at_median']} GFLOP/s at the median"]
                continue
            if "error" in r:
                lines.append(f"| {r['implementation']} | error: {r['error'][:80]} | | | |")
                continue
            ratio = f"{r['median_vs_fused']:.2f}x" if "median_vs_fused" in r else ""
            peak = r.get("peak_above_floor_mib", f"(total {r['peak_mib']})" if "peak_mib" in r else "")
            if "images_per_s" in r:
                peak = f"{peak}; {r['images_per_s']} images/s"
            lines.append(f"| {r['implementation']} | {r['min_ms']:.2f} | {r['median_ms']:.2f} | {ratio} | {peak} |")
        floor = next((r.get("floor_mib") for r in group if r.get("floor_mib") is not None), None)
        if floor is not None:
            lines.append(f"\n(floor: inputs and their gradients, {floor} MiB)")
    return "\n".join(lines)


def write(rows: list, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as handle:
        json.dump(rows, handle, indent=1)
    with open(out + ".csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + ["error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", default=",".join({**CASES, **BENCH_CASES}), help="comma-separated ops")
    parser.add_argument("--shapes", default="bench", help='the shapes whose name starts with this ("ragged": '
                        "gpu_check's small ones, to check the harness)")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, tf32, fp16, bf16")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per implementation (default per op)")
    parser.add_argument("--mae-step", action="store_true", help="also time one full MAE training step")
    parser.add_argument("--no-gemm", action="store_true", help="skip the fp32 GEMM yardstick row")
    parser.add_argument("--note", default="", help="a note stored with every row (e.g. the machine's load)")
    parser.add_argument("--out", default=None, help="path prefix of the .csv and .json files")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                        "'eager' only checks that the harness runs)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for op in args.ops.split(","):
        case = BENCH_CASES.get(op) or CASES[op]
        for shape in (s for s in case.shapes if s.startswith(args.shapes)):
            for dtype in args.dtypes.split(","):
                rounds = args.rounds or (GPU_ROUNDS if device.type == "cuda" else CPU_ROUNDS[op])
                group = checks.time_case(case, shape, dtype, device, rounds, args.compile_backend)
                if op in BENCH_CASES:
                    for row in group:
                        row["implementation"] = LABELS[op].get(row["implementation"], row["implementation"])
                print(markdown(finish(group, device, args.note)), flush=True)
                rows += group
    if args.mae_step:
        from mae_step import time_mae_step
        rows += time_mae_step(device, args.rounds or (GPU_ROUNDS if device.type == "cuda" else 5))
    if not args.no_gemm:
        rows.append(gemm_row(device))
    rows = finish(rows, device, args.note)
    out = args.out or os.path.join(HERE, "results", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{device.type}")
    write(rows, out)
    print(markdown([r for r in rows if not r["op"].startswith(tuple({**CASES, **BENCH_CASES}))]))  # MAE step, GEMM
    print(f"\nmachine: {machine(device)}, torch threads {torch.get_num_threads()}; rows in {out}.csv and {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
