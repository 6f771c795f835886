"""The repository's scripts (bench/, tools/) imported as modules, for tests of their functions."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_path(*parts: str) -> str:
    return os.path.join(ROOT, *parts)


def load_script(*parts: str):
    """The module of the script at ROOT/parts (e.g. "bench", "vs_llamacpp.py"), executed afresh."""
    path = script_path(*parts)
    spec = importlib.util.spec_from_file_location(os.path.splitext(parts[-1])[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
