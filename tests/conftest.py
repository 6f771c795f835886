import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import make_checkpoint  # noqa: E402


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


# Without a GPU, Triton kernels run in its interpreter; this must be set before anything imports triton.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(autouse=True, scope="session")
def _private_profile_dir(tmp_path_factory):
    """Tuning profiles (moe_offload/profile.py) go to a folder of the test session's, never the user's cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
