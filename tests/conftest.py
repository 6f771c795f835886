import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import make_checkpoint  # noqa: E402


@pytest.fixture
def ieee_fp32():
    """fp32 comparisons without TF32 on either side (monkeypatch cannot restore cuBLASModule attributes)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(arch, layout="per_expert", max_shard_size=None) -> path, cached per argument set."""
    made: dict[tuple, str] = {}

    def make(arch: str, layout: str = "per_expert", max_shard_size: str | None = None) -> str:
        key = (arch, layout, max_shard_size)
        if key not in made:
            path = str(tmp_path_factory.mktemp(f"{arch}-{layout}"))
            made[key] = make_checkpoint(arch, path, layout=layout, max_shard_size=max_shard_size)
        return made[key]

    return make


def _patch_lang_once_per_launch() -> None:
    """Triton's interpreter re-patches triton.language (inspect.getmembers over tl, tl.core, tl.math, tl.tensor)
    on every call of a @triton.jit helper inside a kernel, although the launch (GridExecutor) already patched
    those very modules and restores them when it ends: the helper's patch sets the same stateless stand-ins
    again and is never restored itself (InterpretedFunction.__call__ drops its scope). On this suite's kernels
    that re-patching was a quarter of the interpreter's time. Here a helper's call skips it when the running
    launch has patched every language module the helper's globals see; launches, and helpers that see another
    module, go through Triton's own _patch_lang. The kernels run the same interpreted ops either way. Without
    the private names this relies on, nothing is changed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    helper = getattr(getattr(interpreter, "InterpretedFunction", None), "__call__", None)
    if original is None or helper is None or not hasattr(interpreter, "_LangPatchScope") \
            or getattr(original, "once_per_launch", False):
        return
    state = threading.local()  # per thread (the language modules are shared; Triton's launches are not)

    def running() -> tuple[list, list]:
        """This thread's running launches (the language modules each patched: ids) and helper-call depth [n]."""
        if not hasattr(state, "launches"):
            state.launches, state.helpers = [], [0]
        return state.launches, state.helpers

    def languages(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    class LaunchScope:
        def __init__(self, scope, patched: set[int]):
            self.scope, self.patched = scope, patched
            running()[0].append(self)

        def restore(self) -> None:
            try:
                self.scope.restore()
            finally:
                launches = running()[0]
                launches.pop(next(i for i, s in enumerate(launches) if s is self))

    def patch_lang(fn):
        launches, helpers = running()
        if not helpers[0]:  # a launch: patched here, restored when it ends
            return LaunchScope(original(fn), languages(fn))
        if launches and languages(fn) <= launches[-1].patched:  # already patched by the running launch
            return interpreter._LangPatchScope()
        return original(fn)

    def call_helper(self, *args, **kwargs):
        helpers = running()[1]
        helpers[0] += 1
        try:
            return helper(self, *args, **kwargs)
        finally:
            helpers[0] -= 1

    patch_lang.once_per_launch = True
    interpreter._patch_lang = patch_lang
    interpreter.InterpretedFunction.__call__ = call_helper


# Without a GPU, Triton kernels run in its interpreter; this must be set before anything imports triton.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        _patch_lang_once_per_launch()
except ImportError:
    pass


@pytest.fixture(autouse=True, scope="session")
def _private_profile_dir(tmp_path_factory):
    """Tuning profiles (moe_offload/profile.py) go to a folder of the test session's, never the user's cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
