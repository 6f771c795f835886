"""The repository's scripts for tests of their functions: bench/ is a package run from the repository root
(`python -m bench.<script>`), imported here as such; tools/ scripts are loaded by path."""

import importlib
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python -m pytest` from the root has it first; a bare `pytest` does not
    sys.path.append(ROOT)


def script_path(*parts: str) -> str:
    return os.path.join(ROOT, *parts)


def load_script(*parts: str):
    """The module of the script at ROOT/parts (e.g. "tools", "routing_report.py"), executed afresh."""
    path = script_path(*parts)
    spec = importlib.util.spec_from_file_location(os.path.splitext(parts[-1])[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_module(name: str):
    """bench.<name> (e.g. "harness", "llamacpp.run_llama_bench")."""
    return importlib.import_module(f"bench.{name}")


def run_bench(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m bench.<name> <args>` from the repository root, as the scripts are run; output captured."""
    return subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
