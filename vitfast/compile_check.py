"""Ahead-of-time compile check of every GPU kernel, on a machine with no GPU.

    python -m vitfast.compile_check            # table; exit code 1 on any compile error, spill or missing mma
    python -m vitfast.compile_check --json     # the same rows as JSON

Triton: every ``AotSpec`` in ``AOT_SPECS`` of every module of ``vitfast.kernels`` is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` for cap 80 (sm_80) and 90 (sm_90a).
Registers and spills come from the ``ptxas -v`` log of that very compile, shared memory from the kernel
metadata, tensor-core use from the SASS (HMMA / HGMMA, via the cuobjdump in the triton wheel) and the PTX
(``mma.sync`` / ``wgmma``). A ``@triton.jit`` function that is neither listed in AOT_SPECS nor called by a
listed kernel is an error: every kernel gets checked.

CUDA: every ``csrc/cuda/*.cu`` is compiled alone with ``nvcc -cubin -Xptxas -v`` for sm_80 and sm_90a;
the same numbers are parsed per kernel. Skipped, with a message, when nvcc or csrc/cuda is missing.

Every compile runs with TRITON_ALWAYS_COMPILE into a throw-away Triton cache. The *results* (the rows) of a build
that passed are kept in ``~/.cache/vitfast/compile-check`` (``VITFAST_COMPILE_CHECK_CACHE`` moves it, ``=0`` or
``--no-cache`` turns it off), under a hash of everything the build depends on: the kernel module's source and the
kernel modules it imports, ``kernels/__init__.py`` and ``_common.py``, this file, the Triton version, the spec's
index and the target (CUDA: every file in csrc/cuda, the nvcc version, the target). Any change to those rebuilds;
a failed build is never cached.
The Triton interpreter must be off (it replaces ``@triton.jit`` at import): when TRITON_INTERPRET is set
this module re-runs itself in a child process without it. Tests call ``run_subprocess()``.
"""
import argparse
import contextlib
import dataclasses
import functools
import glob
import hashlib
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = (80, 90)  # compute capabilities; Triton and nvcc use sm_90a for 90
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]  # as setup.py builds csrc/cuda

_SASS_TC = re.compile(r"\b(HMMA|HGMMA|IMMA|IGMMA|QMMA|UTCHMMA|UTCQMMA)\b")
_PTX_TC = (("wgmma", re.compile(r"\bwgmma\.mma_async\b")), ("mma", re.compile(r"\bmma\.sync\b")))


@dataclasses.dataclass
class Row:
    """One kernel compiled for one target."""

    source: str                 # "triton:masked_patch_embed" or "cuda:masked_patch_embed.cu"
    kernel: str
    variant: str
    target: str                 # "sm_80" / "sm_90a"
    registers: int = None
    smem: int = None            # bytes of shared memory (Triton: dynamic, from metadata; CUDA: static)
    stack: int = None           # bytes of stack frame
    spill_stores: int = None
    spill_loads: int = None
    tensor_cores: str = ""      # SASS opcodes, e.g. "HMMA" / "HGMMA"; PTX names when SASS is unavailable
    expect_tensor_cores: bool = False
    error: str = None
    seconds: float = 0.0

    @property
    def problems(self) -> list:
        if self.error:
            return [self.error]
        out = []
        if self.spill_stores is None or self.spill_loads is None:
            out.append("no ptxas spill report")
        elif self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        if self.expect_tensor_cores and not self.tensor_cores:
            out.append("no tensor-core instructions")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), ok=self.ok, problems=self.problems)


# ------------------------------------------------------------------------------------------------
# ptxas / SASS parsing (shared by both halves)
# ------------------------------------------------------------------------------------------------
def parse_ptxas_log(log: str) -> dict:
    """{mangled function name: {registers, smem, stack, spill_stores, spill_loads}} from ``ptxas -v``."""
    out, current = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return out


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def sass_tensor_core_ops(cubin_path: str) -> dict:
    """{function name: sorted tensor-core SASS opcodes} for every function of a cubin; None if no cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return None
    res = subprocess.run([tool, "-sass", cubin_path], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    out, name = {}, None
    for line in res.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = set()
        elif name is not None:
            out[name].update(_SASS_TC.findall(line))
    return {k: ",".join(sorted(v)) for k, v in out.items()}


def ptx_tensor_core_ops(ptx: str) -> str:
    return ",".join(name for name, pattern in _PTX_TC if pattern.search(ptx))


def _target_name(cap: int) -> str:
    return f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"


# ------------------------------------------------------------------------------------------------
# Triton half
# ------------------------------------------------------------------------------------------------
def _package_kernels_dir() -> str:
    _ensure_kernels_package()
    return os.path.dirname(os.path.abspath(sys.modules["vitfast.kernels"].__file__))


def _ensure_kernels_package() -> None:
    """Make ``vitfast.kernels`` importable; bind the repo's kernels/ folder when vitfast is not installed."""
    if "vitfast.kernels" in sys.modules:
        return
    try:
        importlib.import_module("vitfast.kernels")
    except ImportError:
        kernels_dir = os.path.join(REPO_ROOT, "kernels")
        spec = importlib.util.spec_from_file_location("vitfast.kernels", os.path.join(kernels_dir, "__init__.py"),
                                                      submodule_search_locations=[kernels_dir])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["vitfast.kernels"] = pkg
        spec.loader.exec_module(pkg)


def _load_module(kernels_dir: str, stem: str):
    """Import kernels_dir/stem.py: as vitfast.kernels.<stem> when kernels_dir is the package folder, else
    as a standalone module (tests point the check at temporary folders; those may import vitfast.kernels)."""
    _ensure_kernels_package()
    if os.path.abspath(kernels_dir) == _package_kernels_dir():
        return importlib.import_module(f"vitfast.kernels.{stem}")
    name = f"_vitfast_aot_{abs(hash(os.path.abspath(kernels_dir)))}_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(kernels_dir, stem + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _kernel_modules(kernels_dir: str) -> list:
    return [stem for stem in (os.path.splitext(os.path.basename(p))[0]
                              for p in sorted(glob.glob(os.path.join(kernels_dir, "*.py"))))
            if not stem.startswith("_")]


def list_aot_specs(kernels_dir: str = None) -> list:
    """[{source, kernel, variant, tensor_cores}] for every AotSpec of every kernels module; safe to call
    under the interpreter (it only imports), so tests can check the report covers every entry."""
    kernels_dir = os.path.abspath(kernels_dir or _package_kernels_dir())
    return [dict(source=f"triton:{stem}", kernel=spec.name, variant=spec.variant, tensor_cores=spec.tensor_cores)
            for stem in _kernel_modules(kernels_dir)
            for spec in getattr(_load_module(kernels_dir, stem), "AOT_SPECS", ())]


def _jit_functions(module) -> dict:
    from triton.runtime.jit import JITFunction

    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, JITFunction) and getattr(obj, "__module__", module.__name__) == module.__name__}


def collect_triton_jobs(kernels_dir: str) -> tuple:
    """([(kernels_dir, stem, spec index, cap, label)], [error Row]) for every module of kernels_dir."""
    jobs, errors = [], []
    for stem in _kernel_modules(kernels_dir):
        source = f"triton:{stem}"
        try:
            module = _load_module(kernels_dir, stem)
        except Exception as exc:  # an import error is a failure of the check, not a crash
            errors.append(Row(source, "<import>", "", "-", error=f"import failed: {type(exc).__name__}: {exc}"))
            continue
        jit = _jit_functions(module)
        specs = getattr(module, "AOT_SPECS", None)
        if specs is None:
            if jit:
                errors.append(Row(source, "<module>", "", "-", error="defines @triton.jit kernels but no AOT_SPECS"))
            continue
        # Helpers reached (transitively) from a listed kernel are compiled with it.
        reached, frontier = set(), [spec.kernel for spec in specs]
        while frontier:
            src = getattr(frontier.pop(), "src", "")
            for name, fn in jit.items():
                if name not in reached and re.search(rf"\b{name}\s*\(", src):
                    reached.add(name)
                    frontier.append(fn)
        for name in sorted(set(jit) - {spec.name for spec in specs} - reached):
            errors.append(Row(source, name, "", "-",
                              error="@triton.jit function neither in AOT_SPECS nor called by one"))
        for index, spec in enumerate(specs):
            for cap in TARGETS:
                jobs.append((kernels_dir, stem, index, cap))
    return jobs, errors


def _compile_triton(job) -> Row:
    kernels_dir, stem, index, cap = job
    started = time.time()
    row = Row(f"triton:{stem}", "?", "", _target_name(cap))
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        spec = _load_module(kernels_dir, stem).AOT_SPECS[index]
        row.kernel, row.variant, row.expect_tensor_cores = spec.name, spec.variant, spec.tensor_cores
        arg_names = spec.kernel.arg_names
        unknown = [a for a in list(spec.signature) + list(spec.aligned) + list(spec.constexprs) if a not in arg_names]
        if unknown:
            raise ValueError(f"AotSpec names unknown arguments {unknown}")
        attrs = {(arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
        src = ASTSource(spec.kernel, spec.signature, spec.constexprs, attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints the ptxas -v log here
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                      options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        usage = parse_ptxas_log(log.getvalue())
        usage = usage.get(spec.name) or next(iter(usage.values()), {})
        for key in ("registers", "stack", "spill_stores", "spill_loads"):
            setattr(row, key, usage.get(key))
        row.smem = compiled.metadata.shared
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = sass_tensor_core_ops(f.name)
        row.tensor_cores = ",".join(sass.values()) if sass is not None else ptx_tensor_core_ops(compiled.asm["ptx"])
    except Exception as exc:
        row.error = f"compile failed: {type(exc).__name__}: {str(exc).strip()[-2000:]}"
    row.seconds = round(time.time() - started, 2)
    return row


# ------------------------------------------------------------------------------------------------
# CUDA half
# ------------------------------------------------------------------------------------------------
def find_nvcc() -> str:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def _demangle(names: list) -> dict:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return dict(zip(names, out)) if res.returncode == 0 and len(out) == len(names) else {n: n for n in names}


def _short(name: str) -> str:
    """`void ns::(anonymous namespace)::kernel<float, 4>(const float*, ...)` -> `kernel<float, 4>`."""
    name = re.sub(r"^void\s+", "", name.replace("(anonymous namespace)::", ""))
    depth, cut, scope = 0, len(name), 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if depth == 0 and ch == "(":
            cut = i
            break
        if depth == 0 and name.startswith("::", i):
            scope = i + 2
    return name[scope:cut]


def _compile_cuda(job) -> list:
    nvcc, cu_path, cap = job
    started = time.time()
    source = f"cuda:{os.path.basename(cu_path)}"
    target = _target_name(cap)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "out.cubin")
        includes = [f"-I{os.path.dirname(cu_path)}", f"-I{os.path.dirname(os.path.dirname(cu_path))}"]
        cmd = [nvcc, f"-arch={target}", "-cubin", "-Xptxas", "-v", *NVCC_FLAGS, *includes, "-o", cubin, cu_path]
        res = subprocess.run(cmd, capture_output=True, text=True)
        seconds = round(time.time() - started, 2)
        if res.returncode != 0:
            log = (res.stderr + res.stdout).strip()
            return [Row(source, "<nvcc>", "", target, error=f"nvcc failed ({res.returncode}): {log[-2000:]}",
                        seconds=seconds)]
        usage = parse_ptxas_log(res.stderr + res.stdout)
        sass = sass_tensor_core_ops(cubin) or {}
    if not usage:
        return [Row(source, "<nvcc>", "", target, error="no __global__ kernel found in the ptxas log", seconds=seconds)]
    names = _demangle(sorted(usage))
    rows = []
    for mangled in sorted(usage, key=lambda n: names[n]):
        u = usage[mangled]
        rows.append(Row(source, _short(names[mangled]), "", target, registers=u.get("registers"), smem=u.get("smem"),
                        stack=u.get("stack"), spill_stores=u.get("spill_stores"), spill_loads=u.get("spill_loads"),
                        tensor_cores=sass.get(mangled, ""), seconds=seconds))
    return rows


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def _worker_init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def _run_job(job):
    return _compile_cuda(job[1]) if job[0] == "cuda" else [_compile_triton(job[1])]


def cache_dir() -> str:
    """Where passed builds' rows are kept; None when caching is off (VITFAST_COMPILE_CHECK_CACHE=0)."""
    where = os.environ.get("VITFAST_COMPILE_CHECK_CACHE")
    if where == "0":
        return None
    return where or os.path.join(os.path.expanduser("~"), ".cache", "vitfast", "compile-check")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout


def job_key(job) -> str:
    """A hash of every input that decides the job's rows (see the module doc)."""
    import triton

    digest = hashlib.sha256(_read(os.path.abspath(__file__)))
    kind, spec = job
    if kind == "cuda":
        nvcc, cu_path, cap = spec
        folder = os.path.dirname(cu_path)
        parts = [os.path.basename(cu_path), _nvcc_version(nvcc), str(cap), " ".join(NVCC_FLAGS)]
        files = sorted(glob.glob(os.path.join(folder, "*")))
    else:
        kernels_dir, stem, index, cap = spec
        parts = [stem, triton.__version__, str(index), str(cap)]
        source = _read(os.path.join(kernels_dir, f"{stem}.py")).decode()
        imported = set(re.findall(r"(?:from\s+\.|vitfast\.kernels\.)(\w+)", source)) | {stem, "_common", "__init__"}
        files = sorted(p for p in (os.path.join(kernels_dir, f"{name}.py") for name in imported) if os.path.exists(p))
    for part in parts:
        digest.update(part.encode() + b"\0")
    for path in files:
        digest.update(os.path.basename(path).encode() + b"\0" + _read(path) + b"\0")
    return digest.hexdigest()[:32]


def _cached_rows(folder: str, key: str):
    try:
        with open(os.path.join(folder, f"{key}.json")) as f:
            fields = {f.name for f in dataclasses.fields(Row)}
            return [Row(**{k: v for k, v in row.items() if k in fields}) for row in json.load(f)]
    except (OSError, ValueError, TypeError):
        return None


def _store_rows(folder: str, key: str, rows: list) -> None:
    if not rows or not all(r.ok for r in rows):
        return
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f"{key}.json.{os.getpid()}")
    with open(temporary, "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f)
    os.replace(temporary, os.path.join(folder, f"{key}.json"))


def run_check(kernels_dir: str = None, cuda_dir: str = None, workers: int = None, cuda: bool = True,
              triton: bool = True, cache: bool = True) -> tuple:
    """Compile everything (reusing the rows of passed builds whose inputs are unchanged, unless ``cache`` is off);
    returns (rows, notes). Must run where TRITON_INTERPRET is off."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the AOT compile check needs TRITON_INTERPRET unset; use run_subprocess()")
    kernels_dir = os.path.abspath(kernels_dir or _package_kernels_dir())
    cuda_dir = os.path.abspath(cuda_dir or os.path.join(REPO_ROOT, "csrc", "cuda"))
    rows, notes, jobs = [], [], []
    if triton:
        triton_jobs, errors = collect_triton_jobs(kernels_dir)
        rows += errors
        jobs += [("triton", j) for j in triton_jobs]
        if not triton_jobs and not errors:
            notes.append(f"no Triton kernels with AOT_SPECS under {kernels_dir}")
    if cuda:
        nvcc = find_nvcc()
        sources = sorted(glob.glob(os.path.join(cuda_dir, "*.cu"))) if os.path.isdir(cuda_dir) else []
        if nvcc is None:
            notes.append("CUDA part skipped: nvcc not found")
        elif not os.path.isdir(cuda_dir):
            notes.append(f"CUDA part skipped: no folder {cuda_dir}")
        elif not sources:
            notes.append(f"CUDA part: no .cu files in {cuda_dir}")
        jobs = [("cuda", (nvcc, cu, cap)) for cu in sources for cap in TARGETS] + jobs if nvcc else jobs
    folder = cache_dir() if cache else None
    keys = [job_key(job) for job in jobs] if folder else [None] * len(jobs)
    cached = [_cached_rows(folder, key) if key else None for key in keys]
    todo = [(job, key) for job, key, hit in zip(jobs, keys, cached) if hit is None]
    rows += [row for hit in cached if hit is not None for row in hit]
    if folder and len(todo) < len(jobs):
        notes.append(f"{len(jobs) - len(todo)} of {len(jobs)} builds unchanged since they passed: rows reused from "
                     f"{folder} (--no-cache rebuilds them)")
    workers = max(1, min(len(todo), workers or min(8, os.cpu_count() or 1)))
    if todo:
        with tempfile.TemporaryDirectory(prefix="vitfast-aot-") as triton_cache:
            # spawn: each worker imports triton fresh, with the interpreter off and a throw-away cache.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(triton_cache,)) as pool:
                for (job, key), result in zip(todo, pool.map(_run_job, [job for job, _ in todo])):
                    rows += result
                    if key:
                        _store_rows(folder, key, result)
    order = {name: i for i, name in enumerate(_target_name(c) for c in TARGETS)}
    rows.sort(key=lambda r: (r.source.startswith("cuda"), r.source, r.kernel, r.variant, order.get(r.target, -1)))
    return rows, notes


def format_table(rows: list, notes: list = ()) -> str:
    header = ["source", "kernel", "variant", "target", "regs", "smem", "stack", "spill st/ld", "tensor cores", "s",
              "status"]
    fmt = lambda v: "-" if v is None else str(v)
    body = [[r.source, r.kernel, r.variant, r.target, fmt(r.registers), fmt(r.smem), fmt(r.stack),
             "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}",
             r.tensor_cores or ("none" if r.error is None else "-"), f"{r.seconds:.1f}",
             "ok" if r.ok else "FAIL: " + "; ".join(r.problems).splitlines()[0][:120]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths])] + [line(b) for b in body]
    failed = [r for r in rows if not r.ok]
    out.append(f"{len(rows)} kernel builds, {len(failed)} failed")
    out += [f"note: {n}" for n in notes]
    for r in failed:
        if r.error:
            out.append(f"\n{r.source} {r.kernel} {r.variant} {r.target}:\n{r.error}")
    return "\n".join(out)


def _clean_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env


def run_subprocess(args=(), timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run ``python -m vitfast.compile_check *args`` in a child without TRITON_INTERPRET (for tests)."""
    return subprocess.run([sys.executable, "-m", "vitfast.compile_check", *args], env=_clean_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitfast.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--kernels-dir", help="folder of Triton kernel modules (default: vitfast.kernels)")
    parser.add_argument("--cuda-dir", help="folder of .cu files (default: <repo>/csrc/cuda)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc half")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton half")
    parser.add_argument("--workers", type=int, help="compile processes (default: CPU count, at most 8)")
    parser.add_argument("--no-cache", action="store_true", help="rebuild everything (ignore and keep no cached rows)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "vitfast.compile_check", *argv], env=_clean_env()).returncode
    started = time.time()
    rows, notes = run_check(args.kernels_dir, args.cuda_dir, args.workers, cuda=not args.no_cuda,
                            triton=not args.no_triton, cache=not args.no_cache)
    ok = all(r.ok for r in rows)
    if args.json:
        print(json.dumps(dict(ok=ok, seconds=round(time.time() - started, 1), notes=notes,
                              rows=[r.as_dict() for r in rows]), indent=1))
    else:
        print(format_table(rows, notes))
        print(f"total {time.time() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
