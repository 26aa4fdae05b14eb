"""Runs the benchmarks side by side in one pytest-benchmark session and prints a markdown table.

    python benchmarks/report.py [pytest args, e.g. benchmarks/test_masked_patch_embed.py]

Per group: min and median time, the ratio of every implementation's median to the first
(vitfast) row's median, peak memory (torch profiler timeline, see _measure.py), and images/s
(a column only in groups whose benchmarks record extra_info["images_per_second"]).
"""
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv):
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "bench.json")
        targets = [os.path.abspath(a) if os.path.exists(a) else a for a in argv] or [HERE]
        code = subprocess.call([sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider",
                                f"--benchmark-json={out}", "--benchmark-columns=min,median,rounds"], cwd=HERE)
        if code != 0:
            return code
        data = json.load(open(out))
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    info = data["machine_info"]
    print(f"\nmachine: {info.get('cpu', {}).get('brand_raw', '?')}, {os.cpu_count()} cores, "
          f"torch threads {__import__('torch').get_num_threads()}")
    for group, benches in groups.items():
        base = benches[0]["stats"]["median"]
        print(f"\n{group}\n")
        rate = any("images_per_second" in b["extra_info"] for b in benches)
        print("| implementation | min (ms) | median (ms) | median / vitfast | peak memory (MiB) |"
              + (" images/s |" if rate else ""))
        print("|---|---:|---:|---:|---:|" + ("---:|" if rate else ""))
        for b in benches:
            s = b["stats"]
            name = b["param"] if b.get("param") else b["name"]
            peak = b["extra_info"].get("peak_memory_bytes", 0) / 2**20
            ips = b["extra_info"].get("images_per_second")
            print(f"| {name} | {s['min'] * 1e3:.2f} | {s['median'] * 1e3:.2f} | {s['median'] / base:.2f}x | {peak:.1f} |"
                  + ((f" {ips:.1f} |" if ips is not None else " |") if rate else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
