"""The ahead-of-time compile check: every Triton kernel and every csrc/cuda/*.cu compiles for sm_80 and
sm_90a with no register spill, and the GEMM kernels use tensor cores.

The check runs in a child process without TRITON_INTERPRET (the suite runs under the interpreter, which
replaces @triton.jit at import). It runs once per session: 5+ minutes on 2 cores when every kernel is built, seconds
when the rows of unchanged builds come from its cache (vitfast.compile_check: keyed by a hash of every input).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from vitfast import compile_check

TARGETS = ("sm_80", "sm_90a")
CUDA_DIR = os.path.join(compile_check.REPO_ROOT, "csrc", "cuda")
HAVE_NVCC = compile_check.find_nvcc() is not None


def _run(args, env=None):
    if env is None:
        res = compile_check.run_subprocess(args)
    else:
        res = subprocess.run([sys.executable, "-m", "vitfast.compile_check", *args], env=env,
                             cwd=compile_check.REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert "{" in res.stdout, f"no JSON report (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.returncode, json.loads(res.stdout[res.stdout.index("{"):]), res


@pytest.fixture(scope="module")
def report(pytestconfig):
    # The suite's slowest step (~2 min on 2 cores): say what it is doing, also under -q and output capture.
    terminal = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if terminal is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # inside a test the terminal is captured
            terminal.write_line("\n[compile check] building every Triton kernel and .cu file for sm_80 and sm_90a "
                                "(5+ minutes on 2 cores; builds unchanged since they passed are reused) ...")
    code, data, res = _run(["--json"])
    return code, data, res.stderr


def _failures(data):
    return "\n".join(f"{r['source']} {r['kernel']} {r['variant']} {r['target']}: {r['problems']}"
                     for r in data["rows"] if not r["ok"])


def test_check_passes(report):
    code, data, stderr = report
    assert code == 0 and data["ok"], f"compile check failed:\n{_failures(data)}\n{stderr[-2000:]}"


def test_every_aot_spec_compiled_for_every_target_without_spills(report):
    _, data, _ = report
    specs = compile_check.list_aot_specs()
    assert specs, "no AOT_SPECS found in vitfast.kernels"
    rows = {(r["source"], r["kernel"], r["variant"], r["target"]): r for r in data["rows"]}
    for spec in specs:
        for target in TARGETS:
            key = (spec["source"], spec["kernel"], spec["variant"], target)
            assert key in rows, f"{key} missing from the report"
            row = rows[key]
            assert row["error"] is None, f"{key}: {row['error']}"
            assert row["registers"] and row["registers"] <= 255, key
            assert (row["spill_stores"], row["spill_loads"]) == (0, 0), f"{key} spills"


@pytest.mark.parametrize("kernel", ["_mpe_forward_kernel", "_mpe_bwd_params_kernel", "_mpe_bwd_images_kernel"])
def test_fp16_gemm_kernels_use_tensor_cores(report, kernel):
    _, data, _ = report
    rows = [r for r in data["rows"] if r["kernel"] == kernel and r["variant"].startswith("fp16")]
    assert {r["target"] for r in rows} == set(TARGETS), rows
    for r in rows:
        ops = set(r["tensor_cores"].split(","))
        wanted = {"HMMA"} if r["target"] == "sm_80" else {"HGMMA", "HMMA"}
        assert ops & wanted, f"{kernel} {r['variant']} {r['target']}: tensor-core ops {r['tensor_cores']!r}"


def test_every_spec_that_expects_tensor_cores_gets_them(report):
    _, data, _ = report
    for r in data["rows"]:
        if r["expect_tensor_cores"]:
            assert r["tensor_cores"], f"{r['kernel']} {r['variant']} {r['target']} emits no mma/wgmma"


def test_cuda_sources_compile_without_spills(report):
    # Fails (does not skip) when nvcc is here and csrc/cuda exists: the CUDA half must then be checked.
    if not HAVE_NVCC:
        pytest.skip("nvcc not found: the CUDA half of the check is skipped")
    if not os.path.isdir(CUDA_DIR):
        pytest.skip(f"{CUDA_DIR} does not exist")
    _, data, _ = report
    sources = sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))
    assert sources, f"{CUDA_DIR} holds no .cu file"
    for name in sources:
        rows = [r for r in data["rows"] if r["source"] == f"cuda:{name}"]
        assert {r["target"] for r in rows} == set(TARGETS), f"{name}: {rows}"
        for r in rows:
            assert r["error"] is None, f"{name} {r['target']}: {r['error']}"
            assert (r["spill_stores"], r["spill_loads"]) == (0, 0), f"{name} {r['kernel']} {r['target']} spills"


# --- the check can fail -----------------------------------------------------------------------------
BROKEN_TRITON = textwrap.dedent('''
    import triton
    import triton.language as tl
    from vitfast.kernels import AotSpec

    @triton.jit
    def good_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def bad_arange(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)  # BLOCK = 3 is not a power of two: compile error

    @triton.jit
    def forgotten(x_ptr):  # no AOT spec and called by none: reported
        tl.store(x_ptr, 0.0)

    SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    AOT_SPECS = [
        AotSpec(good_copy, SIG, {"BLOCK": 128}, variant="ok"),
        AotSpec(good_copy, SIG, {"BLOCK": 128}, variant="wants mma", tensor_cores=True),
        AotSpec(bad_arange, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 3}, variant="broken"),
    ]
''')

GOOD_CU = 'extern "C" __global__ void good_kernel(float* y) { y[threadIdx.x] = 1.f; }\n'
BROKEN_CU = '__global__ void broken_kernel(float* y) { y[threadIdx.x] = undefined_name; }\n'
# __launch_bounds__(1024, 2) leaves 32 registers; all 96 loads are live at the first store -> spills.
SPILL_CU = textwrap.dedent('''
    extern "C" __global__ void __launch_bounds__(1024, 2) spill_kernel(const float* x, float* y) {
      float v[96];
    #pragma unroll
      for (int i = 0; i < 96; ++i) v[i] = x[threadIdx.x + 1024 * i];
    #pragma unroll
      for (int i = 0; i < 96; ++i) y[threadIdx.x + 1024 * ((i * 37) % 96)] = v[i];
    }
''')


def test_broken_kernels_are_reported(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "toy.py").write_text(BROKEN_TRITON)
    (tmp_path / "cuda").mkdir()
    for name, text in [("good.cu", GOOD_CU), ("broken.cu", BROKEN_CU), ("spill.cu", SPILL_CU)]:
        (tmp_path / "cuda" / name).write_text(text)
    # TRITON_INTERPRET=1 as in the suite: the check must re-run itself without it, not compile nothing.
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (compile_check.REPO_ROOT, env.get("PYTHONPATH")) if p)
    code, data, res = _run(["--json", "--kernels-dir", str(tmp_path / "kernels"), "--cuda-dir",
                            str(tmp_path / "cuda"), "--workers", "2"], env=env)
    assert code != 0 and not data["ok"]
    rows = data["rows"]
    by = lambda kernel, variant="": [r for r in rows if r["kernel"] == kernel and r["variant"] == variant]

    ok_rows = by("good_copy", "ok")
    assert {r["target"] for r in ok_rows} == set(TARGETS) and all(r["ok"] for r in ok_rows), ok_rows
    assert all(r["registers"] > 0 and r["spill_stores"] == 0 for r in ok_rows)
    mma = by("good_copy", "wants mma")
    assert mma and all(not r["ok"] and "no tensor-core instructions" in r["problems"] for r in mma)
    broken = by("bad_arange", "broken")
    assert len(broken) == 2 and all(r["error"] and "compile failed" in r["error"] for r in broken)
    assert any("forgotten" == r["kernel"] and "neither in AOT_SPECS" in r["error"] for r in rows)

    if not HAVE_NVCC:
        return
    good = [r for r in rows if r["source"] == "cuda:good.cu"]
    assert {r["target"] for r in good} == set(TARGETS) and all(r["ok"] and r["kernel"] == "good_kernel" for r in good)
    bad = [r for r in rows if r["source"] == "cuda:broken.cu"]
    assert len(bad) == 2 and all(r["error"] and "nvcc failed" in r["error"] and "undefined_name" in r["error"]
                                 for r in bad)
    spill = [r for r in rows if r["source"] == "cuda:spill.cu"]
    assert len(spill) == 2 and all(r["spill_stores"] > 0 and not r["ok"] for r in spill)


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function 'plain' for 'sm_80'
ptxas info    : Function properties for plain
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_parse_ptxas_log():
    usage = compile_check.parse_ptxas_log(PTXAS_LOG)
    assert usage == {
        "_Z6kernelPf": dict(stack=16, spill_stores=8, spill_loads=4, registers=40, smem=4096),
        "plain": dict(stack=0, spill_stores=0, spill_loads=0, registers=10, smem=0),
    }
    row = compile_check.Row("cuda:x.cu", "kernel", "", "sm_80", **usage["_Z6kernelPf"])
    assert not row.ok and "spills" in row.problems[0]


def test_demangled_names_are_short():
    name = ("void vitfast::cuda::(anonymous namespace)::gather_kernel<__half, 8>"
            "(vitfast::cuda::(anonymous namespace)::Pack<__half, 8> const*, long const*)")
    assert compile_check._short(name) == "gather_kernel<__half, 8>"
    assert compile_check._short("plain") == "plain"


def _kernels_folder(tmp_path):
    folder = tmp_path / "kernels"
    folder.mkdir()
    for name, text in (("__init__.py", "# package\n"), ("_common.py", "X = 1\n"),
                       ("alpha.py", "from ._common import X\n"), ("beta.py", "Y = 2\n")):
        (folder / name).write_text(text)
    return folder


def test_cache_key_follows_every_input_of_a_build(tmp_path):
    folder = _kernels_folder(tmp_path)
    key = lambda index=0, cap=80: compile_check.job_key(("triton", (str(folder), "alpha", index, cap)))
    first = key()
    assert key() == first and key(index=1) != first and key(cap=90) != first
    (folder / "beta.py").write_text("Y = 3\n")  # a module alpha does not import
    assert key() == first
    (folder / "_common.py").write_text("X = 2\n")
    second = key()
    assert second != first
    (folder / "alpha.py").write_text("from ._common import X\n# edited\n")
    assert key() != second


def test_cache_keeps_only_passed_builds(tmp_path):
    passed = compile_check.Row("triton:alpha", "k", "fp16", "sm_80", registers=40, spill_stores=0, spill_loads=0)
    failed = compile_check.Row("triton:alpha", "k", "fp32", "sm_80", registers=40, spill_stores=8, spill_loads=8)
    compile_check._store_rows(str(tmp_path), "a", [passed])
    compile_check._store_rows(str(tmp_path), "b", [passed, failed])
    assert compile_check._cached_rows(str(tmp_path), "a") == [passed]
    assert compile_check._cached_rows(str(tmp_path), "b") is None
