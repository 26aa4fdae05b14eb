"""Re-measures the errors behind TOLERANCES in tests/ops/conftest.py and prints the table.

    python tests/ops/measure_errors.py                       # every op test (minutes: Triton runs interpreted)
    python tests/ops/measure_errors.py -k "cpu or torch"     # extra arguments go to pytest
    python tests/ops/measure_errors.py --ops dino_loss,nn_topk  # those ops' test files only, and only their rows

The op tests run with VITFAST_MEASURE_ERRORS set: assert_close then records the normwise error
max|actual - expected| / max|expected| of every comparison (against the float64 reference) instead of checking it.
Per (op, backend, dtype, kind) this prints the largest error, the band now in the table and the band conftest's rule
proposes (conftest.proposed_band: FACTOR x measured, at least half an ulp, two significant digits; measured rounded
up to two digits), as lines to paste into TOLERANCES,
and flags rows whose band is exceeded ("FAILS") or more than twice the proposed one ("wide"). Rows listed in
conftest.UNMEASURED (backends that cannot run here) get the cpu row's numbers.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import conftest  # noqa: E402  (tests/ops/conftest.py: the table and the band rule)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def test_files(ops):
    """tests/ops/test_<op>.py and test_<op>_*.py of each op (all of tests/ops without ops)."""
    if not ops:
        return [HERE]
    unknown = [op for op in ops if op not in conftest.OPS]
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {unknown}; known: {', '.join(conftest.OPS)}")
    names = sorted(os.listdir(HERE))
    return [os.path.join(HERE, n) for n in names if n.endswith(".py") and conftest.op_of_module(n[:-3]) in ops]


def run_tests(pytest_args, ops=()):
    """Runs the op tests (of ``ops``; all without) in measuring mode; returns the recorded rows."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as log:
        env = dict(os.environ, **{conftest.MEASURE_ENV: log.name})
        command = [sys.executable, "-m", "pytest", *test_files(ops), "-q", "-p", "no:cacheprovider", *pytest_args]
        print("$", " ".join(command), file=sys.stderr)
        # pytest's report to stderr: stdout carries the table only.
        result = subprocess.run(command, env=env, cwd=os.path.dirname(os.path.dirname(HERE)), stdout=sys.stderr)
        if result.returncode not in (0, 1):  # 1: some test failed for another reason; its comparisons still count
            raise SystemExit(f"pytest exited with {result.returncode}")
        return [json.loads(line) for line in log]


def largest_errors(rows):
    worst = {}
    for row in rows:
        if row["op"] is None or row["backend"] is None:
            continue  # no table row to measure (a comparison whose backend the fixture cannot tell)
        key = (row["op"], row["backend"], row["dtype"], row["kind"])
        if key not in worst or not row["error"] <= worst[key][0]:  # NaN and inf win: they must be seen
            worst[key] = (row["error"], row["test"])
    return worst


def split_ops(argv):
    """(ops, the rest for pytest) from ``--ops a,b`` / ``--ops=a,b`` anywhere in argv."""
    ops, rest, args = [], [], iter(argv)
    for arg in args:
        if arg == "--ops" or arg.startswith("--ops="):
            value = arg.split("=", 1)[1] if "=" in arg else next(args, "")
            ops += [op for op in value.split(",") if op]
        else:
            rest.append(arg)
    return ops, rest


def main(argv):
    ops, pytest_args = split_ops(argv)
    worst = largest_errors(run_tests(pytest_args, ops))
    if ops:  # only the rows of these ops (the other ops' tests did not run)
        worst = {key: value for key, value in worst.items() if key[0] in ops}
    print("# (op, backend, dtype, kind): (band, measured) proposed from this run; '#' notes compare with the table")
    table = {(op, backend, str(dtype).replace("torch.", ""), kind) for op, backend, dtype, kind in conftest.TOLERANCES
             if not ops or op in ops}
    order = lambda k: (k[0], conftest.BACKENDS.index(k[1]), list(DTYPES).index(k[2]), k[3])
    keys = sorted(set(worst) | table, key=order)
    for op, backend, dtype_name, kind in keys:
        dtype = DTYPES[dtype_name]
        current = conftest.TOLERANCES.get((op, backend, dtype, kind))
        key = f'("{op}", "{backend}", {SHORT[dtype_name]}, "{kind}")'
        if (op, backend, dtype_name, kind) not in worst:
            if (op, backend, dtype, kind) in conftest.UNMEASURED and (op, "cpu", dtype_name, kind) in worst:
                measured = conftest.round_up(worst[(op, "cpu", dtype_name, kind)][0])  # the cpu row's
                band = conftest.proposed_band(measured, dtype)
                print(f"    {key}: ({band:.2g}, {measured:.2g}),  # UNMEASURED: the cpu row's")
            else:
                print(f"    {key}: {current},  # not measured in this run")
            continue
        measured, test = worst[(op, backend, dtype_name, kind)]
        note = ""
        if current is not None and not measured <= current[0]:
            note = f"  # FAILS the band {current[0]:.2g} now in the table"
        elif current is not None and current[0] > 2 * conftest.proposed_band(conftest.round_up(measured), dtype):
            note = f"  # wide: the table's band {current[0]:.2g} is > 2x the proposed one"
        measured = conftest.round_up(measured)
        print(f"    {key}: ({conftest.proposed_band(measured, dtype):.2g}, {measured:.2g}),{note}  # worst: {test}")


if __name__ == "__main__":
    main(sys.argv[1:])
