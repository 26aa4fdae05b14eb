"""One command for the first GPU session: is every fused op right, repeatable, within the launch limits, and fast?

    python -m vitfast.gpu_check --out gpu_check.json     # on a machine with a GPU, < 8 minutes on one GPU
    python -m vitfast.gpu_check --smoke --out smoke.json # tiny shapes on the CPU, Triton under the interpreter

Sections of the JSON report (exit code 1 when any row has ok = false, 2 when it cannot run):

  accuracy       every op x backend (triton, cuda where the op has it) x dtype (fp32 at "highest" = IEEE dots,
                 tf32 = fp32 at "high", fp16, bf16) x shape (the benchmark shapes and ragged ones): the output and
                 every gradient against autograd of the float64 reference on the same rounded inputs
                 (normwise error against a band per dtype, ``cases.TOLERANCES``; ratio = error / band)
  repeatability  10 forward + backward passes give bitwise equal outputs and gradients (fp32, bf16)
  limits         grid axes past 65535 programs and tensors past 2^31 elements (``limits.py``)
  timing         fused vs eager reference vs torch.compile(reference), bf16 then fp32 (--timing-dtypes): CUDA-event
                 times and peak memory above the floor (inputs + their gradients); cases that would start after
                 --budget-s (450 s) are skipped and listed

A backend that does not take a dtype (its declaration in vitfast/ops) is skipped for it, never run through a
fallback. ``--smoke`` runs the ragged shapes only, the limits scaled down and torch.compile(backend="eager"); with
no GPU it runs on the CPU with backends triton (interpreter) and cpu, without Triton timings. The report's
``skipped`` list says what a run could not check. ``--ops`` and ``--sections`` narrow a run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SECTIONS = ("accuracy", "repeatability", "limits", "timing")
OPS = ("masked_patch_embed", "masked_pixel_loss", "relation_loss", "relation_mlp_loss", "contrastive_loss",
       "dino_loss", "nn_topk")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m vitfast.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--out", default="gpu_check.json", help="path of the JSON report")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per implementation (20; smoke 1)")
    parser.add_argument("--timing-dtypes", default="bf16,fp32", help="dtypes of the timing section, in order")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="timing cases that would start later than this after the start are skipped")
    args = parser.parse_args(argv)
    args.ops, args.sections = args.ops.split(","), args.sections.split(",")
    for name, given, known in (("--ops", args.ops, OPS), ("--sections", args.sections, SECTIONS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"{name}: unknown {unknown}; expected a subset of {list(known)}")
    return args


def _device(smoke: bool):
    """The device to check on, or an error line."""
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda"), None
    if not smoke:
        return None, "no GPU is visible: the full check needs one (run with --smoke for the CPU version)"
    if not _interpreting():
        return None, "the CPU smoke run needs TRITON_INTERPRET=1 set before vitfast is imported (main() does it)"
    return torch.device("cpu"), None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def run(args) -> dict:
    device, error = _device(args.smoke)
    if error:
        return {"ok": False, "error": error}
    import torch

    from . import cases, checks, limits

    selected = {name: case for name, case in cases.CASES.items() if name in args.ops}
    cases.CASES.clear()
    cases.CASES.update(selected)  # the sections iterate over CASES
    gpu = device.type == "cuda"
    big = gpu and not args.smoke  # benchmark shapes, limits at full size
    skipped = []
    if args.smoke:
        skipped += ["benchmark shapes (--smoke: ragged shapes only); torch.compile runs with backend='eager'",
                    "repeatability: 2 passes instead of 10; timing: one shape per op, one round",
                    "limits at full size (run scaled down: they prove no limit)"]
    if not gpu:
        skipped += ["cuda backend (needs a GPU)", "tf32 (the interpreter computes fp32 dots in IEEE fp32 either way)",
                    "triton timings (the interpreter's time means nothing)",
                    "peak memory on the GPU (CPU rows use the profiler's timeline)"]
        from .. import triton_interpreter  # bf16 under the interpreter as a GPU computes it (dot, casts)
        mended = [name for name, applied in triton_interpreter.mend().items() if applied]
        if mended:
            skipped.append(f"nothing for bf16: the interpreter's {' and '.join(mended)} mended "
                           "(vitfast.triton_interpreter)")
    shapes_of = (lambda c: list(c.shapes)) if big else (lambda c: [s for s in c.shapes if s.startswith("ragged")])
    bench_shapes = (lambda c: [s for s in c.shapes if s.startswith("bench")]) if big else shapes_of
    report = {"command": "python -m vitfast.gpu_check " + " ".join(args.argv), "smoke": args.smoke,
              "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({platform.processor() or 'unknown'})",
              "torch": torch.__version__, "python": platform.python_version(),
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "tolerances_normwise": dict(cases.TOLERANCES),
              "skipped": skipped, "sections": {}, "elapsed_s": {}}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    begin = time.time()
    sections = {
        "accuracy": lambda: checks.accuracy(device, shapes_of, [d for d in cases.DTYPES if gpu or d != "tf32"]),
        "repeatability": lambda: checks.repeatability(device, bench_shapes, ["fp32", "bf16"] if gpu else ["fp32"],
                                                      runs=10 if big else 2),
        "limits": lambda: limits.limits(device, full=big),
        "timing": lambda: checks.timings(device, bench_shapes if big else (lambda c: shapes_of(c)[:1]),
                                         args.timing_dtypes.split(",") if gpu else ["fp32"],
                                         args.rounds or (20 if big else 1), None if big else "eager",
                                         deadline=begin + args.budget_s),
    }
    for name in args.sections:
        start = time.time()
        report["sections"][name] = sections[name]()
        report["elapsed_s"][name] = round(time.time() - start, 1)
        print(f"gpu_check: {name}: {_tally(report['sections'][name])} ({report['elapsed_s'][name]} s)", flush=True)
    report["elapsed_s"]["total"] = round(time.time() - begin, 1)
    report["failures"] = [row for rows in report["sections"].values() for row in rows if row.get("ok") is False
                          or "error" in row]
    report["ok"] = not report["failures"]
    return report


def _tally(rows) -> str:
    passed = sum(r.get("ok") is True for r in rows)
    failed = sum(r.get("ok") is False or "error" in r for r in rows)
    skipped = sum(r.get("ok") is None and "error" not in r and "skipped" in r for r in rows)
    return f"{len(rows)} rows, {passed} ok, {failed} failed, {skipped} skipped"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    args.argv = argv
    import torch
    if args.smoke and not torch.cuda.is_available() and not _interpreting():
        # triton.jit and triton.language read TRITON_INTERPRET when they are imported, which importing vitfast
        # (hence torch's triton integration) already did: run again in a process that has it from the start.
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "vitfast.gpu_check", *argv], env=env)
    report = run(args)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    if "error" in report:
        print(f"gpu_check: {report['error']}", file=sys.stderr)
        return 2
    for row in report["failures"]:
        print("FAILED:", json.dumps(row, default=str)[:400], file=sys.stderr)
    print(f"gpu_check: {'ok' if report['ok'] else 'FAILED'}; report in {args.out} "
          f"({report['elapsed_s']['total']} s)")
    return 0 if report["ok"] else 1
