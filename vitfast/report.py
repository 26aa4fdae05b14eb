"""The results table: every method's preset over several seeds, mean ± std, written as markdown.

    python -m vitfast.report                          # every method, quick preset, seeds 0 1 2, digits
    python -m vitfast.report --methods mae,simclr --seeds 0 1 --out reports/x
    python -m vitfast.report --readme README.md       # also replace the table between the README's report markers

Each run is ``python -m vitfast.train --method M --seed S --out OUT/runs/M-seedS --no-progress`` in its own process
(timed from start to exit: data loading, training and the final evaluation), one after the other. A run that
finished is kept (its summary.json and its wall time in report-run.json): rerunning the same command after a crash
or Ctrl-C continues with the runs still missing, and an unfinished run folder is started over (a resumed run's wall
time would not be one run's). OUT/results.json holds every run's numbers, OUT/results.md the table.

Columns, on the test split: k-NN and linear probe of the method's pre-trained encoder (the last pipeline stage that
evaluates an encoder without training a classifier), the classifier it trains (``supervised``, a fine-tune or probe
stage), the scratch baseline of the same budget (multi-stage methods), and the encoder at its initialisation
("random init", evaluated by the same run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

from .machine import describe
from .methods import METHODS

COLUMNS = (  # (key in a run's numbers, table heading)
    ("knn", "k-NN"), ("probe", "linear probe"), ("classifier", "fine-tuned / classifier"),
    ("baseline", "scratch baseline (same budget)"), ("random_knn", "random-init k-NN"),
    ("random_probe", "random-init probe"),
)
README_START, README_END = "<!-- vitfast.report:start -->", "<!-- vitfast.report:end -->"


def run_numbers(method: str, summary: Dict) -> Dict[str, float]:
    """The table's numbers (fractions) of one run's summary.json; a column the method does not have is absent."""
    cls = METHODS[method]
    if "stages" in summary:
        pipeline = [(name, summary["stages"][name]) for name in cls.stages
                    if name in summary["stages"] and name not in cls.baselines]
        baselines = [summary["stages"][name] for name in cls.baselines if name in summary["stages"]]
    else:
        pipeline, baselines = [("", summary)], []
    encoders = [s for _, s in pipeline if "knn_accuracy" in s and ("test_accuracy" not in s or len(pipeline) == 1)]
    classifiers = [s for _, s in pipeline if "test_accuracy" in s]
    initial = next((s["random_init"] for _, s in pipeline if "random_init" in s), {})
    numbers = {}
    if encoders:
        numbers["knn"] = encoders[-1]["knn_accuracy"]
        if "linear_probe" in encoders[-1]:
            numbers["probe"] = encoders[-1]["linear_probe"]["test_accuracy"]
    if classifiers:
        numbers["classifier"] = classifiers[-1]["test_accuracy"]
    if baselines and "test_accuracy" in baselines[-1]:
        numbers["baseline"] = baselines[-1]["test_accuracy"]
    if "knn_accuracy" in initial:
        numbers["random_knn"] = initial["knn_accuracy"]
    if "linear_probe" in initial:
        numbers["random_probe"] = initial["linear_probe"]["test_accuracy"]
    return numbers


def mean_std(values: List[float], scale: float = 1.0, digits: int = 1) -> str:
    """'m ± s' over the seeds (sample standard deviation), '—' when there is no value."""
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(method: str, seed: int, folder: str, extra: List[str]) -> Optional[Dict]:
    """Run (or reuse) one training run; its record {method, seed, wall_seconds, numbers}, None if it failed."""
    record_path = os.path.join(folder, "report-run.json")
    if os.path.isfile(record_path) and os.path.isfile(os.path.join(folder, "summary.json")):
        with open(record_path) as f:
            return json.load(f)
    command = [sys.executable, "-m", "vitfast.train", "--method", method, "--seed", str(seed), "--out", folder,
               "--no-progress", *extra]
    if os.path.isdir(folder) and os.listdir(folder):
        command.append("--overwrite")  # an unfinished run starts over: its wall time must be one run's
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    started = time.perf_counter()
    with open(folder + ".log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = process.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the run too: let it write its checkpoint and stop
            process.wait()
            raise
    wall = time.perf_counter() - started
    if code in (130, 143):
        raise KeyboardInterrupt
    if code != 0:
        return None
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    record = dict(method=method, seed=seed, wall_seconds=wall, numbers=run_numbers(method, summary),
                  command=" ".join(command[1:]))
    with open(record_path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(record_path + ".tmp", record_path)
    return record


def table(records: List[Dict], methods: List[str]) -> str:
    """The markdown table: one row per method, mean ± std over its seeds (accuracies in %)."""
    head = ["method", "seeds", "wall time (s)"] + [title + " (%)" for _, title in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for method in methods:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue
        cells = [f"`{method}`", str(len(rows)), mean_std([r["wall_seconds"] for r in rows], digits=0)]
        cells += [mean_std([r["numbers"][key] for r in rows if key in r["numbers"]], scale=100) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(path: str, text: str) -> None:
    """Replace what lies between the report markers of ``path`` with ``text`` (the markers must be there)."""
    with open(path) as f:
        content = f.read()
    if README_START not in content or README_END not in content:
        raise SystemExit(f"vitfast.report: {path} has no {README_START} ... {README_END} markers")
    before, rest = content.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    with open(path + ".tmp", "w") as f:
        f.write(f"{before}{README_START}\n{text}\n{README_END}{after}")
    os.replace(path + ".tmp", path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitfast.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(sorted(METHODS)), help="comma-separated (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, help="override every method's epochs (smoke tests)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every run (train.py's --set)")
    parser.add_argument("--out", default=os.path.join("reports", "quick-digits"))
    parser.add_argument("--readme", help="also write the table between the report markers of this file")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {', '.join(sorted(METHODS))}")
    extra = ["--preset", args.preset, "--dataset", args.dataset] + (["--epochs", str(args.epochs)] if args.epochs else [])
    extra += [part for item in args.set for part in ("--set", item)]
    command = "python -m vitfast.report " + " ".join(argv if argv is not None else sys.argv[1:])
    jobs = [(seed, method) for seed in args.seeds for method in methods]  # every method once before any repeats
    records, failed, started = [], [], time.perf_counter()
    try:
        for i, (seed, method) in enumerate(jobs, 1):
            folder = os.path.join(args.out, "runs", f"{method}-seed{seed}")
            record = run_one(method, seed, folder, extra)
            if record is None:
                failed.append(folder)
                print(f"[{i}/{len(jobs)}] {method} seed {seed}: FAILED (log: {folder}.log)", flush=True)
                continue
            records.append(record)
            shown = ", ".join(f"{title} {100 * record['numbers'][key]:.1f} %" for key, title in COLUMNS[:3]
                              if key in record["numbers"])
            print(f"[{i}/{len(jobs)}] {method} seed {seed}: {record['wall_seconds']:.0f} s; {shown}", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted; finished runs are kept in {args.out}/runs: run the same command to continue",
              file=sys.stderr)
        return 130
    machine = describe()
    text = (f"{table(records, methods)}\n\nMeasured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
            f"UTC on {machine}; vitfast {_git_commit()}; `{command.strip()}` (preset `{args.preset}`, dataset "
            f"`{args.dataset}`, seeds {' '.join(map(str, args.seeds))}; runs one after the other).")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(records=records, failed=failed, machine=machine), f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    if args.readme:
        write_readme(args.readme, text)
    print(text)
    print(f"{len(records)} runs in {time.perf_counter() - started:.0f} s; table: {os.path.join(args.out, 'results.md')}"
          + (f"; {len(failed)} FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
