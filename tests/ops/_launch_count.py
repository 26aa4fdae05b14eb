"""Count the GPU launches of a call while running it on the CPU (Triton under the interpreter).

A launch is either a Triton kernel launch (counted at its launch site, ``kernel[grid](...)``, by wrapping
the module's kernels, i.e. those in its AOT_SPECS) or a torch op that would run a kernel on CUDA tensors
(counted with a TorchDispatchMode; allocations, views and metadata ops launch nothing). Ops that the
interpreter itself runs inside a Triton launch are not counted.

    with count_launches(kernels_module, monkeypatch) as launches:
        kernels_module.some_launcher(...)
    assert launches == ["triton:_kernel", "sum"]
"""
import contextlib

from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that allocate or re-view memory without a kernel launch.
NO_LAUNCH = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "as_strided",
    "slice", "select", "t", "transpose", "expand", "detach", "alias", "unsqueeze", "squeeze", "permute", "reshape",
    "_reshape_alias", "lift_fresh", "split", "unbind", "is_same_size", "_local_scalar_dense", "promote_types",
})


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = []
        self.inside_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_triton and name not in NO_LAUNCH:
            self.launches.append(name)
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """Stands in for a @triton.jit kernel at module level: ``kernel[grid](...)`` records one launch."""

    def __init__(self, kernel, name: str, recorder: _Recorder):
        self.kernel, self.name, self.recorder = kernel, name, recorder

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.recorder.launches.append(f"triton:{self.name}")
            self.recorder.inside_triton = True
            try:
                return launch(*args, **kwargs)
            finally:
                self.recorder.inside_triton = False

        return run


@contextlib.contextmanager
def count_launches(module, monkeypatch):
    """Yields the list of launches made inside the block by the launchers of ``module``."""
    recorder = _Recorder()
    for name in {spec.name for spec in module.AOT_SPECS}:
        monkeypatch.setattr(module, name, _CountedKernel(getattr(module, name), name, recorder))
    with recorder:
        yield recorder.launches
    for name in {spec.name for spec in module.AOT_SPECS}:
        monkeypatch.setattr(module, name, getattr(module, name).kernel)
