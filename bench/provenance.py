"""What a benchmark result was measured with: the commit, whether the tree differed from it, the code's digest,
the machine and the versions.

Why: an audit (issue 22) found published tables whose code could not be named; a number that cannot be tied to
code cannot be reproduced, only repeated. The commit comes from git; where the tree was copied without its .git
(a device machine gets the working tree only), from MOE_BENCH_COMMIT / MOE_BENCH_DIRTY set by whoever started the
run, and the digest of the sources lets anyone check afterwards which tree it was (`source_digest` here and on
the commit must agree).
"""

from __future__ import annotations

import os
import subprocess
from importlib.metadata import PackageNotFoundError, version

import torch

from bench.common import ROOT, machine, utc_now, versions
from moe_offload.profile import sources_digest

SOURCE_FOLDERS = ("moe_offload", "bench")  # the code a GPU table measures: the engine and the harness
EXTRA_PACKAGES = ("accelerate", "safetensors", "triton", "numba")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def commit() -> dict:
    """{"commit", "dirty", "commit_source"}: the environment's MOE_BENCH_COMMIT / MOE_BENCH_DIRTY where set (whoever
    started the run knows what it copied: a device machine's tree can carry a stale .git, which named the session's
    first commit, dirty, for a later tree), else HEAD and whether tracked files differ from it (git status), else
    nulls."""
    given = os.environ.get("MOE_BENCH_COMMIT", "").strip()
    if given:
        dirty = os.environ.get("MOE_BENCH_DIRTY", "").strip().lower()
        flag = {"true": True, "1": True, "false": False, "0": False}.get(dirty)
        return {"commit": given, "dirty": flag, "commit_source": "environment"}
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if head else None
    if head and status is not None:
        return {"commit": head.strip(), "dirty": bool(status.strip()), "commit_source": "git"}
    return {"commit": None, "dirty": None, "commit_source": None}


def source_digest() -> str:
    """The digest of every .py file under SOURCE_FOLDERS (moe_offload.profile.sources_digest)."""
    return sources_digest(*(os.path.join(ROOT, folder) for folder in SOURCE_FOLDERS))


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            return int(handle.readline().split()[1]) * 1024  # MemTotal, kB
    except (OSError, ValueError, IndexError):
        return None


def record() -> dict:
    """This invocation's provenance: commit, dirty, source digest, date, machine, versions."""
    info = machine()
    info["ram_bytes"] = _ram_bytes()
    if torch.cuda.is_available():
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    extra = {"cuda": torch.version.cuda}
    for package in EXTRA_PACKAGES:
        try:
            extra[package] = version(package)
        except PackageNotFoundError:
            extra[package] = None
    return {**commit(), "source_digest": source_digest(), "date_utc": utc_now(), "machine": info,
            "versions": {**versions(), **extra}}
